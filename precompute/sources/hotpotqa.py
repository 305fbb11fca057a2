"""HotpotQA questions with their context paragraphs: IRCoT, Hugging Face ``hotpot_qa`` and original layouts.

Accepted rows (``.jsonl``, ``.json``, ``.parquet``; a file or a folder of them, one split per file,
named by the file: ``dev_subsampled.jsonl`` → "dev", default "dev")::

    IRCoT     {"question_id", "question_text", "contexts": [{"id", "title", "paragraph_text", "is_supporting"}]}
    HF        {"id", "question", "context": {"title": [..], "sentences": [[..]]},
               "supporting_facts": {"title": [..], "sent_id": [..]}}
    original  {"_id", "question", "context": [[title, [sentences]]], "supporting_facts": [[title, sent_id]]}

Passages are the context paragraphs, text ``join_title(title, paragraph)`` (sentences joined with
"", as they carry their own leading spaces). **Passage ids are content ids** (``text_id``): IRCoT's
context ids are positions within a question ("0".."9"), not paragraph ids, so the same id names
4,858 different paragraphs in the dev sample. Content ids make a paragraph shared by several
questions one passage. Supporting paragraphs are the positives (qrels grade 1); the others are the
hard negatives (distractors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Qrels, Source, SourceOptions, TextRecord, TrainExample, join_title, text_id
from .ledger import unique_records
from .reading import check_role, files_by_split, is_record_file, iter_objects, require_path

__all__ = ["HotpotQASource", "Question", "parse_question"]

EXPECT = "a HotpotQA file (.jsonl/.json/.parquet, IRCoT or hotpot_qa layout) or a folder of them"


@dataclass(frozen=True, slots=True)
class Question:
    """One HotpotQA question: id, text, and its context paragraphs as (title, paragraph, supporting)."""

    id: str
    text: str
    contexts: tuple[tuple[str, str, bool], ...]


def parse_question(obj: dict[str, Any]) -> Question:
    """A :class:`Question` from a row of any accepted layout.

    Raises:
        ValueError: the row matches no layout (the message says what is missing).
    """
    text = obj.get("question_text", obj.get("question"))
    if not isinstance(text, str):
        raise ValueError("no 'question_text' or 'question' string")
    qid = obj.get("question_id", obj.get("id", obj.get("_id")))
    qid = str(qid) if qid is not None else text_id("query", text)
    if "contexts" in obj:
        contexts = tuple((c["title"], c["paragraph_text"], bool(c["is_supporting"])) for c in obj["contexts"])
        return Question(qid, text, contexts)
    context, facts = obj.get("context"), obj.get("supporting_facts")
    if isinstance(context, dict) and isinstance(facts, dict):  # HF: columns of lists
        supporting = set(facts["title"])
        pairs = zip(context["title"], context["sentences"], strict=True)
        return Question(qid, text, tuple((t, "".join(s), t in supporting) for t, s in pairs))
    if isinstance(context, list) and isinstance(facts, list):  # original: lists of pairs
        supporting = {f[0] for f in facts}
        return Question(qid, text, tuple((t, "".join(s), t in supporting) for t, s in context))
    raise ValueError("no 'contexts' (IRCoT) or 'context' + 'supporting_facts' (hotpot_qa)")


class HotpotQASource(Source):
    """HotpotQA (``hotpotqa:PATH``): questions, their paragraphs, supporting paragraphs as positives.

    Example:
        >>> src = HotpotQASource("hotpotqa:dev_subsampled.jsonl", "dev_subsampled.jsonl", SourceOptions())
        >>> ex = next(src.training_examples("dev"))
        >>> len(ex.positive_ids), len(ex.negative_ids)
        (2, 8)
    """

    kind = "hotpotqa"

    @classmethod
    def reads_file(cls, path: Path, root: Path) -> bool:
        """The record files directly in the folder (:func:`.reading.is_record_file`)."""
        return is_record_file(path, root)

    def __init__(self, spec: str, location: str, options: SourceOptions) -> None:
        super().__init__(spec, location, options)
        root = require_path(Path(location), self.kind, EXPECT)
        missing = f"No .jsonl/.json/.parquet files in '{root}'; hotpotqa: expects {EXPECT}."
        self.files = files_by_split(root, "dev", missing)

    def _questions(self, split: str | None = None) -> Iterator[tuple[str, Question]]:
        for name, paths in self.files.items():
            if split is not None and name != split:
                continue
            for path in paths:
                for origin, obj in iter_objects(path, self):
                    try:
                        question = parse_question(obj)
                    except (ValueError, KeyError, TypeError) as e:
                        self.reject(origin, f"not a HotpotQA question: {e}", f"Expected {EXPECT}.")
                        continue
                    yield origin, question

    def _paragraphs(self, origin: str, q: Question) -> Iterator[tuple[str, str, bool]]:
        """(id, text, supporting) of ``q``'s paragraphs; empty ones are rejected."""
        for title, paragraph, supporting in q.contexts:
            text = join_title(title, paragraph, self.options.title_join)
            if text:
                yield text_id("passage", text), text, supporting
            else:
                self.reject(origin, f"empty paragraph under title {title!r} in question {q.id!r}")

    def iter_texts(self, role: str | None = None) -> Iterator[TextRecord]:
        """Every question, and every distinct context paragraph."""
        check_role(role)
        return unique_records(self._records(role), self, role)

    def _records(self, role: str | None) -> Iterator[TextRecord]:
        for origin, q in self._questions():
            if role in (None, "query"):
                if q.text.strip():
                    yield TextRecord(q.id, q.text, "query", origin)
                else:
                    self.reject(origin, f"empty question {q.id!r}")
            if role in (None, "passage"):
                for pid, text, _ in self._paragraphs(origin, q):
                    yield TextRecord(pid, text, "passage", origin)

    def splits(self) -> list[str]:
        """One split per file, named by the file ("dev" by default)."""
        return sorted(self.files)

    def qrels(self, split: str | None = None) -> Qrels:
        """Supporting paragraphs of each question, grade 1 (None: every split; an unknown split: {})."""
        qrels: Qrels = {}
        for _, q, positives, _ in self._judged(split):
            qrels.setdefault(q.id, {}).update(dict.fromkeys(positives, 1))
        return qrels

    def training_examples(self, split: str | None = None) -> Iterator[TrainExample]:
        """One example per question: supporting paragraphs as positives, the distractors as negatives."""
        return (TrainExample(q.id, pos, neg) for _, q, pos, neg in self._judged(split) if pos)

    def _judged(self, split: str | None) -> Iterator[tuple[str, Question, tuple[str, ...], tuple[str, ...]]]:
        for origin, q in self._questions(split):
            flags = [(pid, supporting) for pid, _, supporting in self._paragraphs(origin, q)]
            positives = tuple(dict.fromkeys(pid for pid, supporting in flags if supporting))
            negatives = tuple(
                dict.fromkeys(pid for pid, supporting in flags if not supporting and pid not in positives)
            )
            yield origin, q, positives, negatives
