"""Natural Questions in DPR's retriever-training layout (``biencoder-nq-train.json`` and kin).

One record per question, as a JSON array (DPR ships it so; loaded whole), JSON lines or parquet::

    {"question": "...", "answers": [...],
     "positive_ctxs": [{"title": "...", "text": "...", "passage_id": "628725"}, ...],
     "negative_ctxs": [...], "hard_negative_ctxs": [...]}

PATH is one such file or a folder of them, one split per file named by the file
(``biencoder-nq-dev.json`` → "dev", default "train"). Passage ids are ``passage_id`` (or ``psg_id``,
``id``, ``_id``), else the content id of the joined text. Query ids are the record's ``id``/``qid``
when present, else the question's content id: a per-file index would give "0" to a train and a
dev question alike. Examples take positives from ``positive_ctxs`` and negatives from
``hard_negative_ctxs`` then ``negative_ctxs``; DPR questions without a positive give no example.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import Qrels, Source, SourceOptions, TextRecord, TrainExample, join_title, text_id
from .ledger import unique_records
from .reading import check_role, files_by_split, is_record_file, iter_objects, require_path

__all__ = ["NQSource"]

EXPECT = "a DPR-style NQ file (.json/.jsonl/.parquet with question, positive_ctxs, ...) or a folder of them"
CTX_FIELDS = ("positive_ctxs", "hard_negative_ctxs", "negative_ctxs")
ID_FIELDS = ("passage_id", "psg_id", "id", "_id")


class NQSource(Source):
    """DPR-style Natural Questions (``nq:PATH``): questions, their contexts, positives and hard negatives.

    Example:
        >>> src = NQSource("nq:biencoder-nq-dev.json", "biencoder-nq-dev.json", SourceOptions())
        >>> next(src.training_examples("dev")).positive_ids
        ('628725',)
    """

    kind = "nq"

    @classmethod
    def reads_file(cls, path: Path, root: Path) -> bool:
        """The record files directly in the folder (:func:`.reading.is_record_file`)."""
        return is_record_file(path, root)

    def __init__(self, spec: str, location: str, options: SourceOptions) -> None:
        super().__init__(spec, location, options)
        root = require_path(Path(location), self.kind, EXPECT)
        missing = f"No .json/.jsonl/.parquet files in '{root}'; nq: expects {EXPECT}."
        self.files = files_by_split(root, "train", missing)

    def _rows(self, split: str | None = None) -> Iterator[tuple[str, str, str, dict[str, list[TextRecord]]]]:
        """(origin, query id, question, {ctx field: passage records}) of each well-formed record."""
        for name, paths in self.files.items():
            if split is not None and name != split:
                continue
            for path in paths:
                for origin, obj in iter_objects(path, self):
                    question = obj.get("question")
                    if not isinstance(question, str) or not question.strip():
                        self.reject(origin, "missing or empty 'question'", f"Expected {EXPECT}.")
                        continue
                    qid = next((str(obj[k]) for k in ("id", "qid", "question_id") if obj.get(k) is not None), None)
                    ctxs = {f: list(self._contexts(origin, obj.get(f) or [])) for f in CTX_FIELDS}
                    yield origin, qid or text_id("query", question), question, ctxs

    def _contexts(self, origin: str, ctxs: list[Any]) -> Iterator[TextRecord]:
        for ctx in ctxs:
            if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
                self.reject(origin, 'a context without a "text" string')
                continue
            text = join_title(ctx.get("title"), ctx["text"], self.options.title_join)
            if not text:
                self.reject(origin, "empty context text")
                continue
            pid = next((str(ctx[k]) for k in ID_FIELDS if ctx.get(k) not in (None, "")), None)
            yield TextRecord(pid or text_id("passage", text), text, "passage", origin)

    def iter_texts(self, role: str | None = None) -> Iterator[TextRecord]:
        """Every question, and every context (positive, hard negative, negative) once per id."""
        check_role(role)
        return unique_records(self._records(), self, role)

    def _records(self) -> Iterator[TextRecord]:
        for origin, qid, question, ctxs in self._rows():
            yield TextRecord(qid, question, "query", origin)
            for field in CTX_FIELDS:
                yield from ctxs[field]

    def splits(self) -> list[str]:
        """One split per file, named by the file ("train" by default)."""
        return sorted(self.files)

    def qrels(self, split: str | None = None) -> Qrels:
        """Positive contexts of each question, grade 1 (None: every split; an unknown split: {})."""
        qrels: Qrels = {}
        for _, qid, _, ctxs in self._rows(split):
            if ctxs["positive_ctxs"]:
                qrels.setdefault(qid, {}).update({r.id: 1 for r in ctxs["positive_ctxs"]})
        return qrels

    def training_examples(self, split: str | None = None) -> Iterator[TrainExample]:
        """One example per question with a positive: positives, then hard negatives + negatives (deduped)."""
        return (ex for _, qid, _, ctxs in self._rows(split) if (ex := self._example(qid, ctxs)) is not None)

    @staticmethod
    def _example(qid: str, ctxs: dict[str, list[TextRecord]]) -> TrainExample | None:
        positives = tuple(dict.fromkeys(r.id for r in ctxs["positive_ctxs"]))
        if not positives:
            return None
        negatives = (r.id for f in CTX_FIELDS[1:] for r in ctxs[f] if r.id not in positives)
        return TrainExample(qid, positives, tuple(dict.fromkeys(negatives)))
