"""BEIR folders: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, optional ``hard_negatives.jsonl``.

Layout (https://github.com/beir-cellar/beir)::

    scifact/
      corpus.jsonl     {"_id": "4983", "title": "...", "text": "...", "metadata": {...}}
      queries.jsonl    {"_id": "0", "text": "...", "metadata": {...}}
      qrels/train.tsv  query-id<TAB>corpus-id<TAB>score   (CRLF line ends; some copies have no header)
      hard_negatives.jsonl (ddx's own) {"query-id": "0", "pos": ["31715818"], "neg": ["...", ...]}

Passage text is ``join_title(title, text, options.title_join)``. ``.jsonl.gz`` variants are read too.
BEIR has no negatives: ``training_examples`` gives positives only, plus the negatives of
``hard_negatives.jsonl`` when the folder has one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import Qrels, Source, SourceOptions, TextRecord, TrainExample, join_title
from .errors import BadSourceError
from .ledger import unique_records
from .reading import (
    check_role,
    chosen_splits,
    iter_json_lines,
    merge_qrels,
    positives_only,
    read_qrels,
    require_dir,
)

__all__ = ["BeirSource", "find_file", "with_negatives"]

EXPECT = "a BEIR folder with corpus.jsonl (and usually queries.jsonl and qrels/<split>.tsv)"
HardNegatives = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]  # query id -> (its "pos", its "neg")


def find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or its gzipped twin ``folder/name.gz``, whichever exists (plain first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def field_text(obj: dict[str, Any], name: str) -> str | None:
    """``obj[name]`` as a string ("" for null); None when it is missing or not a string/number."""
    value = obj.get(name)
    if value is None:
        return "" if name in obj else None
    return str(value) if isinstance(value, str | int | float) else None


def with_negatives(example: TrainExample, also_positive: tuple[str, ...], negatives: tuple[str, ...]) -> TrainExample:
    """``example`` with ``negatives`` added, minus its positives and ``also_positive``, deduplicated."""
    excluded = {*example.positive_ids, *also_positive}
    kept = dict.fromkeys(n for n in negatives if n not in excluded)
    return TrainExample(example.query_id, example.positive_ids, tuple(kept))


class BeirSource(Source):
    """A BEIR folder (``beir:PATH``): passages, queries, graded qrels per split, optional hard negatives.

    Example:
        >>> src = BeirSource("beir:data/scifact", "data/scifact", SourceOptions())
        >>> src.splits()
        ['test', 'train']
        >>> sum(1 for _ in src.iter_texts("passage"))
        5183
    """

    kind = "beir"
    FILES = frozenset(f"{n}.jsonl{gz}" for n in ("corpus", "queries", "hard_negatives") for gz in ("", ".gz"))

    @classmethod
    def reads_file(cls, path: Path, root: Path) -> bool:
        """corpus, queries and hard_negatives (``.jsonl[.gz]``) and ``qrels/*.tsv``."""
        rel = path.relative_to(root).parts
        if len(rel) == 2:
            return rel[0] == "qrels" and rel[1].endswith(".tsv")
        return len(rel) == 1 and rel[0] in cls.FILES

    def __init__(self, spec: str, location: str, options: SourceOptions) -> None:
        super().__init__(spec, location, options)
        self.folder = require_dir(Path(location), self.kind, EXPECT)
        corpus = find_file(self.folder, "corpus.jsonl")
        if corpus is None:
            raise BadSourceError(
                f"BEIR folder '{self.folder}' has no corpus.jsonl; corpus.jsonl is required "
                '(one {"_id", "title", "text"} object per line). Point beir: at the dataset\'s own folder.'
            )
        self.corpus_path = corpus
        self.queries_path = find_file(self.folder, "queries.jsonl")
        self.hard_negatives_path = find_file(self.folder, "hard_negatives.jsonl")
        qrels_dir = self.folder / "qrels"
        files = sorted(qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
        self.qrels_paths = {p.stem: p for p in files}

    def iter_texts(self, role: str | None = None) -> Iterator[TextRecord]:
        """Passages of corpus.jsonl, then queries of queries.jsonl; each id once."""
        check_role(role)
        return unique_records(self._records(role), self, role)

    def _records(self, role: str | None) -> Iterator[TextRecord]:
        if role in (None, "passage"):
            yield from self._read(self.corpus_path, "passage")
        if role in (None, "query") and self.queries_path is not None:
            yield from self._read(self.queries_path, "query")

    def _read(self, path: Path, role: str) -> Iterator[TextRecord]:
        for origin, obj in iter_json_lines(path, self):
            rid, text = obj.get("_id"), field_text(obj, "text")
            if rid is None or isinstance(rid, dict | list) or str(rid).strip() == "":
                self.reject(origin, "missing '_id'", 'Each line needs {"_id": ..., "text": ...}.')
                continue
            if text is None:
                self.reject(origin, f"missing or non-string 'text' for id {rid!r}")
                continue
            if role == "passage":
                text = join_title(field_text(obj, "title"), text, self.options.title_join)
            if not text.strip():
                self.reject(origin, f"empty text for id {rid!r}")
                continue
            yield TextRecord(str(rid), text, role, origin)

    def splits(self) -> list[str]:
        """Names of the qrels files (``qrels/test.tsv`` → "test"), sorted."""
        return sorted(self.qrels_paths)

    def qrels(self, split: str | None = None) -> Qrels:
        """Graded judgments of ``qrels/<split>.tsv``; None merges every split, an unknown split gives {}.

        Raises:
            BadSourceError: a malformed qrels line (unless skip_bad).
        """
        return merge_qrels(read_qrels(self.qrels_paths[s], self) for s in chosen_splits(split, self.splits()))

    def training_examples(self, split: str | None = None) -> Iterator[TrainExample]:
        """One example per query of ``split`` with a positive judgment (None: every split).

        Positives are the passages judged > 0 (in file order); negatives come from
        ``hard_negatives.jsonl`` (its "neg" list, minus the positives and its own "pos"),
        else none.

        Raises:
            BadSourceError: as :meth:`qrels`, or a malformed hard_negatives.jsonl line.
        """
        qrels = self.qrels(split)
        negatives = self._hard_negatives() if self.hard_negatives_path is not None else {}
        return (with_negatives(ex, *negatives.get(ex.query_id, ((), ()))) for ex in positives_only(qrels))

    def _hard_negatives(self) -> HardNegatives:
        assert self.hard_negatives_path is not None
        lists: dict[str, tuple[list[str], list[str]]] = {}  # appended per line: a query on many lines stays linear
        for origin, obj in iter_json_lines(self.hard_negatives_path, self):
            qid, pos, neg = obj.get("query-id"), obj.get("pos", []), obj.get("neg")
            if qid is None or not isinstance(neg, list) or not isinstance(pos, list):
                self.reject(origin, 'expected {"query-id": str, "pos": [ids], "neg": [ids]}')
                continue
            both = lists.setdefault(str(qid), ([], []))
            both[0].extend(map(str, pos))
            both[1].extend(map(str, neg))
        return {qid: (tuple(pos), tuple(neg)) for qid, (pos, neg) in lists.items()}
