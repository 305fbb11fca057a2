"""What every data source gives ddx: texts with roles, and where the format has them, qrels and
training examples (query, positives, hard negatives).

Sources stream: ``iter_texts`` yields one record at a time, so precompute's memory does not grow
with the corpus (MS MARCO's 8.8 M passages never sit in a Python list). ``iter_text_blocks`` streams
the same texts as columns (:class:`TextBlock`: ids, texts, origins and content keys of up to tens of
thousands of texts of one role), which is how precompute's first pass and evaluation read them: no
Python object per text beyond its strings, and origins formatted only for an error message. Qrels
and training examples are small next to the corpus and are returned whole.

Ids are the source's own (BEIR ``_id``, MS MARCO pid/qid, HotpotQA context id). Formats that have
no ids (MS MARCO text triples) use the text's content key in hex. Ids never reach the store: the
store is keyed by content, ids map to keys in the experiment's tables.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from pathlib import Path

import numpy as np

from storage.errors import DdxError
from storage.keys import content_key, content_keys, key_hex

from .errors import BadSourceError, shown

__all__ = [
    "LineOrigins",
    "Qrels",
    "Source",
    "SourceOptions",
    "TextBlock",
    "TextRecord",
    "TrainExample",
    "blocks_from_records",
    "join_title",
    "text_id",
]

Qrels = dict[str, dict[str, int]]  # query id -> {passage id: graded relevance}


@dataclass(frozen=True, slots=True)
class TextRecord:
    """One text for the teacher: its source id, the exact text (no prompt) and its role."""

    id: str
    text: str
    role: str  # "query" or "passage"
    origin: str = ""  # "file:line" (or dataset:row) for error messages


class LineOrigins:
    """Origins ``path:LINE`` of rows read from one text file, kept as line numbers until a message needs one."""

    __slots__ = ("lines", "path")

    def __init__(self, path: str, lines: np.ndarray) -> None:
        self.path, self.lines = path, lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, row: int) -> str:
        return f"{self.path}:{self.lines[row]}"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.path}:{n}" for n in self.lines.tolist())

    def take(self, rows: np.ndarray) -> LineOrigins:
        return LineOrigins(self.path, self.lines[rows])


Origins = LineOrigins | Sequence[str]


class TextBlock:
    """Consecutive texts of one role as columns: ids, exact texts, origins, and their content keys on demand.

    Example:
        >>> block = TextBlock("passage", ["7"], ["A passage."], ["corpus.jsonl:1"])
        >>> block.keys().dtype, [r.id for r in block.records()]
        (dtype('S16'), ['7'])
    """

    __slots__ = ("_keys", "ids", "origins", "role", "texts")

    def __init__(
        self, role: str, ids: list[str], texts: list[str], origins: Origins, keys: np.ndarray | None = None
    ) -> None:
        self.role, self.ids, self.texts, self.origins, self._keys = role, ids, texts, origins, keys

    def __len__(self) -> int:
        return len(self.texts)

    def keys(self) -> np.ndarray:
        """Content keys of the texts (``S16``), computed once (~1 µs a passage)."""
        if self._keys is None:
            self._keys = content_keys(self.role, self.texts)
        return self._keys

    def take(self, rows: np.ndarray) -> TextBlock:
        """The rows ``rows`` (positions, in order) as a new block."""
        if len(rows) == len(self) and (len(rows) == 0 or rows[-1] == len(self) - 1):
            return self  # every row, in order (rows are increasing)
        at = rows.tolist()
        origins = self.origins.take(rows) if isinstance(self.origins, LineOrigins) else [self.origins[i] for i in at]
        keys = None if self._keys is None else self._keys[rows]
        return TextBlock(self.role, [self.ids[i] for i in at], [self.texts[i] for i in at], origins, keys)

    def records(self) -> Iterator[TextRecord]:
        """The rows as records."""
        return map(TextRecord, self.ids, self.texts, repeat(self.role), iter(self.origins))

    def first_blank(self) -> int | None:
        """Row of the first empty or whitespace-only text, or None."""
        return next((i for i, t in enumerate(self.texts) if not t.strip()), None)


def blocks_from_records(records: Iterable[TextRecord], size: int = 8192) -> Iterator[TextBlock]:
    """Records as blocks of at most ``size``, one block per role present in each run of ``size`` records.

    The order within a role is kept; a query and a passage may trade places (they are separate id spaces).
    """
    stream = iter(records)
    while chunk := list(islice(stream, size)):
        for role in ("query", "passage"):
            rows = [r for r in chunk if r.role == role]
            if rows:
                yield TextBlock(role, [r.id for r in rows], [r.text for r in rows], [r.origin for r in rows])


@dataclass(frozen=True, slots=True)
class TrainExample:
    """A phase-2 example: one query, its positive passages, its hard negatives (source ids)."""

    query_id: str
    positive_ids: tuple[str, ...]
    negative_ids: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SourceOptions:
    """How sources read their files; shared by every source of a run."""

    # Skip malformed lines and empty texts (counted in ``Source.bad``) instead of stopping.
    skip_bad: bool = False
    # How a passage title joins its text. Part of the text fed to the teacher, hence of the key.
    # "{title} {text}" is what MTEB/BEIR evaluation does; an empty title leaves the bare text.
    title_join: str = "{title} {text}"
    # Column mapping for generic tables and HF datasets: ddx field -> column name
    # (fields: id, text, title, query, positive, negative, query_id, passage_id, score).
    columns: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "{text}" not in self.title_join:
            raise DdxError(f"SourceOptions.title_join must contain '{{text}}', got {self.title_join!r}.")


def join_title(title: str | None, text: str, rule: str) -> str:
    """Passage text as fed to the teacher: ``rule`` applied when a title exists, else ``text``."""
    title = (title or "").strip()
    if not title:
        return text.strip()
    return rule.format(title=title, text=text).strip()


def text_id(role: str, text: str) -> str:
    """Id for formats without ids: the text's content key in hex (stable across runs)."""
    return key_hex(content_key(role, text))


class Source(ABC):
    """A readable data set. Subclasses set ``kind`` and implement the abstract methods.

    Attributes:
        spec: the string the user gave (``beir:path/to/scifact``).
        name: short display name (the folder or dataset name).
        bad: origins ("file:line: reason") of records skipped under ``skip_bad``.
    """

    kind: str = ""
    mirror: Path | None = None  # the local copy read for a remote location (``s3://...``; set by parse_source)

    @classmethod
    def reads_file(cls, path: Path, root: Path) -> bool:
        """Whether this kind, given the folder ``root``, reads its file ``path``: what a local copy of a remote
        folder holds (:mod:`.remote`). Every file by default."""
        return True

    def __init__(self, spec: str, location: str, options: SourceOptions) -> None:
        self.spec = spec
        self.location = location
        self.options = options
        self.name = Path(location.rstrip("/")).name or location
        self.bad: list[str] = []

    @abstractmethod
    def iter_texts(self, role: str | None = None) -> Iterator[TextRecord]:
        """Every text of ``role`` (both roles when None), streamed, each exactly once per id."""

    def iter_text_blocks(self, role: str | None = None) -> Iterator[TextBlock]:
        """The texts of :meth:`iter_texts` as blocks of one role each (the order within a role kept).

        Sources that read columns override this (MS MARCO); here the records are grouped.
        """
        return blocks_from_records(self.iter_texts(role))

    def splits(self) -> list[str]:
        """Splits that have qrels or training examples (e.g. ['train', 'test'])."""
        return []

    def qrels(self, split: str | None = None) -> Qrels:
        """Relevance judgments of ``split``; {} when the format has none."""
        return {}

    def training_examples(self, split: str | None = None) -> Iterator[TrainExample]:
        """Phase-2 examples of ``split`` (query, positives, hard negatives); none by default."""
        return iter(())

    def reject(self, origin: str, reason: str, fix: str = "") -> None:
        """Record a bad record under ``skip_bad``, or raise a BadSourceError naming it."""
        if self.options.skip_bad:
            self.bad.append(shown(f"{origin}: {reason}"))
            return
        hint = f" {fix}" if fix else ""
        raise BadSourceError(f"{origin}: {reason}.{hint} (Or pass --skip-bad to skip and count such records.)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"
