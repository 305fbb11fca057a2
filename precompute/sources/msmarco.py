"""MS MARCO passage files, recognised by name, in a folder (searched recursively) or given one by one.

==========================================  ==========================  ===========================
file                                        lines                       gives
==========================================  ==========================  ===========================
``collection.tsv``, ``*collection*/raw.tsv``  ``pid<TAB>passage``         passages
``queries*.tsv``, ``*quer*/raw.tsv``          ``qid<TAB>query``           queries
``qrels.<split>.tsv``, ``qrels/<split>.tsv``  ``qid 0 pid rel`` / BEIR    qrels of ``<split>``
``triples*.tsv``, ``triplets/raw.tsv``        ``query<TAB>pos<TAB>neg``   texts + "train" examples
``qidpidtriples*.tsv``                        ``qid<TAB>pos_pid<TAB>neg``  "train" examples
``*hard-negatives*.jsonl``                    sentence-transformers'      "train" examples
==========================================  ==========================  ===========================

Every name may end in ``.gz``. Split names keep their dots (``qrels.dev.small.tsv`` is split
"dev.small", not "dev": the two differ, 6,980 vs 55,578 queries).

**No CSV quoting.** Passages hold raw ``"`` characters that quote-aware readers (pandas, the csv
module, pyarrow) silently merge across lines or drop. Each line is split on its first tab(s) and the
text kept exactly, minus the line ending; no row is ever dropped without a reject. Texts are read as
columns, a chunk of lines at a time: polars splits plain chunks (``quote_char=None``: quotes, inner
``\r`` and ``\x85`` stay text), and a chunk with anything unusual (a blank field, a missing or extra
tab, bad UTF-8) is read line by line by the reference reader, which rejects exactly the bad lines
(:mod:`.tab_lines`). ``iter_texts`` is the same blocks as records.

Text triples have no ids: queries and passages get ``text_id(role, text)``. Training examples
stream: consecutive lines with the same (query, positive) merge their negatives, so a file grouped
by query (qidpidtriples) gives one example per (query, positive) with all its negatives, and a
shuffled file (triples.train.small.tsv, 39.8 M lines) gives one example per line, in constant memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import polars as pl

from storage.keys import KEY_DTYPE, KeySet, content_keys

from .base import LineOrigins, Qrels, Source, SourceOptions, TextBlock, TextRecord, TrainExample, text_id
from .errors import BadSourceError
from .ledger import IdLedger
from .reading import (
    Rejects,
    check_role,
    chosen_splits,
    chunk_lines,
    iter_chunks,
    iter_json_lines,
    iter_lines,
    merge_qrels,
    positives_only,
    read_qrels,
    require_path,
)
from .tab_lines import WHITESPACE, LineRejects, tab_fields

__all__ = ["MsMarcoFile", "MsMarcoSource", "classify_msmarco"]

EXPECT = "an MS MARCO folder or file (collection.tsv, queries*.tsv, qrels.*.tsv, triples*.tsv, ...)"
TRAINING_ROLES = ("triples", "id_triples", "hard_negatives")


@dataclass(frozen=True, slots=True)
class MsMarcoFile:
    """One recognised file: what it holds ("collection", "queries", "qrels", "triples", "id_triples",
    "hard_negatives") and the split its judgments or examples belong to ("" for texts only)."""

    path: Path
    role: str
    split: str = ""


def classify_msmarco(path: Path) -> MsMarcoFile | None:
    """What an MS MARCO file holds, from its name and its folder's name; None when unrecognised."""
    base = path.name.lower().removesuffix(".gz")
    parent = path.parent.name.lower()
    stem, ext = os.path.splitext(base)
    if ext == ".jsonl" and "hard-negatives" in base:
        return MsMarcoFile(path, "hard_negatives", "train")
    if ext not in (".tsv", ".txt"):
        return None
    if base == "collection.tsv" or (base == "raw.tsv" and "collection" in parent):
        return MsMarcoFile(path, "collection")
    if base.startswith("qidpidtriples"):
        return MsMarcoFile(path, "id_triples", "train")
    if base.startswith("triples") or (base == "raw.tsv" and parent.startswith("triple")):
        return MsMarcoFile(path, "triples", "train")
    if base.startswith("queries") or (base == "raw.tsv" and "quer" in parent):
        return MsMarcoFile(path, "queries")
    if base.startswith("qrels"):  # qrels.dev.small.tsv -> "dev.small"
        return MsMarcoFile(path, "qrels", stem.removeprefix("qrels").lstrip(".") or "all")
    if parent == "qrels" or "qrels" in base:  # qrels/test.tsv (BEIR style), 2019qrels-pass.txt
        return MsMarcoFile(path, "qrels", stem)
    return None


class MsMarcoSource(Source):
    """MS MARCO passage ranking files (``msmarco:PATH``): collection, queries, qrels, triples, hard negatives.

    Example:
        >>> src = MsMarcoSource("msmarco:data/msmarco", "data/msmarco", SourceOptions())
        >>> next(src.iter_texts("passage"))
        TextRecord(id='0', text='The presence of communication amid ...', role='passage', origin='...:1')
    """

    kind = "msmarco"

    @classmethod
    def reads_file(cls, path: Path, root: Path) -> bool:
        """Files recognised by name (:func:`classify_msmarco`) outside hidden folders."""
        hidden = any(p.startswith(".") for p in path.relative_to(root).parts[:-1])
        return not hidden and classify_msmarco(path) is not None

    def __init__(self, spec: str, location: str, options: SourceOptions) -> None:
        super().__init__(spec, location, options)
        root = require_path(Path(location), self.kind, EXPECT)
        self.files = self._discover(root)

    def _discover(self, root: Path) -> list[MsMarcoFile]:
        if root.is_file():
            found = classify_msmarco(root)
            if found is None:
                raise BadSourceError(
                    f"Cannot tell what MS MARCO file '{root}' holds from its name; msmarco: expects {EXPECT}. "
                    "Rename it, or read it as a table: tsv:PATH?id=...&text=... (tsv: needs a header line)."
                )
            return [found]
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [f for name in sorted(names) if (f := classify_msmarco(Path(folder) / name)) is not None]
        if not files:
            raise BadSourceError(f"No MS MARCO files found under '{root}'; msmarco: expects {EXPECT}.")
        return files

    def _of(self, *roles: str, split: str | None = None) -> list[MsMarcoFile]:
        return [f for f in self.files if f.role in roles and (split is None or f.split == split)]

    def iter_texts(self, role: str | None = None) -> Iterator[TextRecord]:
        """Collection passages, queries, then the texts of text triples, streamed a block at a time."""
        check_role(role)
        return chain.from_iterable(block.records() for block in self._blocks(role))

    def iter_text_blocks(self, role: str | None = None) -> Iterator[TextBlock]:
        """The texts of :meth:`iter_texts` as columns (a triples chunk gives its queries, then its passages)."""
        check_role(role)
        return self._blocks(role)

    def _blocks(self, role: str | None) -> Iterator[TextBlock]:
        ledger = IdLedger()
        for block, bad in self._read_blocks(role):
            yield from ledger.admit_block(block, self, bad)

    def _read_blocks(self, role: str | None) -> Iterator[tuple[TextBlock, list[tuple[int, str, str, str]]]]:
        """Blocks straight from the files, each with the rejects of its lines (ids not yet deduplicated)."""
        if role in (None, "passage"):
            for f in self._of("collection"):
                yield from self._id_text_blocks(f.path, "passage")
        if role in (None, "query"):
            for f in self._of("queries"):
                yield from self._id_text_blocks(f.path, "query")
        seen = {"query": KeySet(), "passage": KeySet()}  # texts of text triples already given, by content
        for f in self._of("triples"):
            yield from self._triple_blocks(f.path, role, seen)

    def _id_text_blocks(self, path: Path, role: str) -> Iterator[tuple[TextBlock, list[tuple[int, str, str, str]]]]:
        for first, chunk in iter_chunks(path):
            columns = tab_fields(chunk, 2)
            if columns is None:
                yield self._id_text_lines(chunk, first, path, role)
                continue
            ids, texts = columns[0].str.strip_chars(WHITESPACE).to_list(), columns[1].to_list()
            yield TextBlock(role, ids, texts, LineOrigins(str(path), np.arange(first, first + len(ids)))), []

    def _id_text_lines(
        self, chunk: bytes, first: int, path: Path, role: str
    ) -> tuple[TextBlock, list[tuple[int, str, str, str]]]:
        """The reference reading of an ``id<TAB>text`` chunk, line by line (any chunk that is not plain)."""
        log, ids, texts, lines = LineRejects(), [], [], []
        for n, line in chunk_lines(chunk, first, path, log):
            rid, tab, text = line.partition("\t")
            if not tab:
                log.reject(f"{path}:{n}", f"expected 'id<TAB>text', found no tab in {line[:60]!r}")
            elif not rid.strip():
                log.reject(f"{path}:{n}", "empty id")
            elif not text.strip():
                log.reject(f"{path}:{n}", f"empty text for id {rid!r}")
            else:
                ids.append(rid.strip())
                texts.append(text)
                lines.append(n)
                log.rows += 1
        return TextBlock(role, ids, texts, LineOrigins(str(path), np.array(lines, np.int64))), log.items

    def _triple_blocks(
        self, path: Path, role: str | None, seen: dict[str, KeySet]
    ) -> Iterator[tuple[TextBlock, list[tuple[int, str, str, str]]]]:
        """Per chunk, a block of its queries and one of its passages (positive, negative, line by line).

        A text triple's id is its content key, so a text given before is the same id again: those are
        dropped by a 128-bit polars hash of the text before any key is computed (most of the 119 M
        texts of MS MARCO's 39.8 M lines are repeats). The chunk's rejects go with its first block:
        rows of a passage block count two a line.
        """
        for first, chunk in iter_chunks(path):
            columns = tab_fields(chunk, 3)
            if columns is None:
                log = LineRejects()
                rows = list(self._triple_lines(chunk, first, path, log))
                columns = [pl.Series([r[k] for r in rows], dtype=pl.String) for k in (1, 2, 3)]
                lines, bad = np.array([r[0] for r in rows], np.int64), log.items
            else:
                lines, bad = np.arange(first, first + len(columns[0])), []
            if role in (None, "query"):
                block, fresh = _fresh_block("query", columns[0], LineOrigins(str(path), lines), seen["query"])
                yield block, _moved(bad, fresh, 1)
                bad = []
            if role in (None, "passage"):
                both = pl.select(pl.concat_list(columns[1], columns[2]).explode()).to_series()  # pos, neg, pos, ...
                origins = LineOrigins(str(path), np.repeat(lines, 2))
                block, fresh = _fresh_block("passage", both, origins, seen["passage"])
                yield block, _moved(bad, fresh, 2)

    def _triple_ids(self, path: Path) -> Iterator[tuple[str, str, str]]:
        """``(text_id(query), text_id(positive), text_id(negative))`` of each line, keys hashed a chunk at a time."""
        for first, chunk in iter_chunks(path):
            columns = tab_fields(chunk, 3)
            if columns is None:  # line by line, rejects in stream order
                for _, q, p, x in self._triple_lines(chunk, first, path, self):
                    yield text_id("query", q), text_id("passage", p), text_id("passage", x)
                continue
            queries, pos, neg = (c.to_list() for c in columns)
            yield from zip(_hex_ids("query", queries), _hex_ids("passage", pos), _hex_ids("passage", neg), strict=True)

    def _triple_lines(self, chunk: bytes, first: int, path: Path, log: Rejects) -> Iterator[tuple[int, str, str, str]]:
        """The reference reading of a ``query<TAB>positive<TAB>negative`` chunk: ``(line, query, positive,
        negative)``, bad lines sent to ``log`` (with a :class:`LineRejects`, bump its rows per line yielded)."""
        for n, line in chunk_lines(chunk, first, path, log):
            parts = line.split("\t", 2)
            if len(parts) != 3:
                reason = f"expected 3 tab-separated fields (query, positive, negative), got {len(parts)}"
                log.reject(f"{path}:{n}", reason)
            elif not all(p.strip() for p in parts):
                log.reject(f"{path}:{n}", "empty query, positive or negative")
            else:
                if isinstance(log, LineRejects):
                    log.rows += 1
                yield n, parts[0], parts[1], parts[2]

    def splits(self) -> list[str]:
        """Splits with qrels or training files, sorted (training files are "train")."""
        return sorted({f.split for f in self._of("qrels", *TRAINING_ROLES)})

    def qrels(self, split: str | None = None) -> Qrels:
        """Judgments of every qrels file of ``split`` merged (None: every split; an unknown split: {}).

        Raises:
            BadSourceError: a malformed line (unless skip_bad).
        """
        names = chosen_splits(split, self.splits())
        return merge_qrels(read_qrels(f.path, self) for f in self._of("qrels") if f.split in names)

    def training_examples(self, split: str | None = None) -> Iterator[TrainExample]:
        """Examples of ``split`` (None: every split) from its triples, id triples and hard-negative
        files, in that order; from its qrels (positives only) when it has none of those.

        Raises:
            BadSourceError: a malformed line (unless skip_bad).
        """
        return chain.from_iterable(self._split_examples(name) for name in chosen_splits(split, self.splits()))

    def _split_examples(self, split: str) -> Iterator[TrainExample]:
        files = sorted(self._of(*TRAINING_ROLES, split=split), key=lambda f: TRAINING_ROLES.index(f.role))
        return self._from_files(files) if files else positives_only(self.qrels(split))

    def _from_files(self, files: list[MsMarcoFile]) -> Iterator[TrainExample]:
        for f in files:
            if f.role == "hard_negatives":
                yield from self._hard_negatives(f.path)
            elif f.role == "triples":
                yield from group_triples(self._triple_ids(f.path))
            else:
                yield from group_triples(self._id_triples(f.path))

    def _id_triples(self, path: Path) -> Iterator[tuple[str, str, str]]:
        for origin, line in iter_lines(path, self):
            parts = line.split()
            if len(parts) != 3:
                self.reject(origin, f"expected 3 ids (qid, positive pid, negative pid), got {len(parts)}")
            else:
                yield parts[0], parts[1], parts[2]

    def _hard_negatives(self, path: Path) -> Iterator[TrainExample]:
        for origin, obj in iter_json_lines(path, self):
            qid, pos, neg = obj.get("qid"), obj.get("pos"), obj.get("neg", {})
            if qid is None or not isinstance(pos, list) or not pos or not isinstance(neg, dict | list):
                self.reject(origin, 'expected {"qid": id, "pos": [pids], "neg": {"<system>": [pids]}}')
                continue
            positives = tuple(dict.fromkeys(map(str, pos)))
            systems = neg.values() if isinstance(neg, dict) else [neg]
            negatives = dict.fromkeys(map(str, chain.from_iterable(systems)))  # one str() an id: ~600 a line
            for p in positives:
                negatives.pop(p, None)
            yield TrainExample(str(qid), positives, tuple(negatives))


def group_triples(triples: Iterable[tuple[str, str, str]]) -> Iterator[TrainExample]:
    """Merge consecutive (query, positive, negative) id triples of one (query, positive) into one example.

    Example:
        >>> [e.negative_ids for e in group_triples([("q", "p", "a"), ("q", "p", "b"), ("q", "r", "a")])]
        [('a', 'b'), ('a',)]
    """
    current: tuple[str, str] | None = None
    negatives: dict[str, None] = {}
    for qid, pos, neg in triples:
        if (qid, pos) != current:
            if current is not None:
                yield TrainExample(current[0], (current[1],), tuple(negatives))
            current, negatives = (qid, pos), {}
        if neg != pos:
            negatives[neg] = None
    if current is not None:
        yield TrainExample(current[0], (current[1],), tuple(negatives))


def _fresh_block(role: str, texts: pl.Series, origins: LineOrigins, seen: KeySet) -> tuple[TextBlock, np.ndarray]:
    """The texts not in ``seen`` (first occurrences only) as a block with ids ``text_id(role, text)``, and
    the mask of the rows kept."""
    hashes = np.stack([texts.hash(seed=1).to_numpy(), texts.hash(seed=2).to_numpy()], axis=1)
    fresh = seen.add_new(np.ascontiguousarray(hashes).view(KEY_DTYPE).ravel())
    kept = texts.filter(pl.Series(fresh)).to_list()
    keys = content_keys(role, kept)
    return TextBlock(role, _hex(keys), kept, origins.take(np.flatnonzero(fresh)), keys), fresh


def _moved(bad: list[tuple[int, str, str, str]], kept: np.ndarray, per_line: int) -> list[tuple[int, str, str, str]]:
    """Rejects of a chunk re-pointed at a block that keeps ``kept`` of its ``per_line`` rows a line."""
    before = np.concatenate([[0], np.cumsum(kept)])
    return [(int(before[per_line * row]), origin, reason, fix) for row, origin, reason, fix in bad]


def _hex_ids(role: str, texts: list[str]) -> list[str]:
    """``[text_id(role, t) for t in texts]``, hashed in one call."""
    return _hex(content_keys(role, texts))


def _hex(keys: np.ndarray) -> list[str]:
    hexed = keys.tobytes().hex()
    return [hexed[i : i + 32] for i in range(0, len(hexed), 32)]
