"""Rows to texts, qrels and examples, for any table whose columns a :class:`~.layout.Layout` names.

Subclasses (generic files in ``tabular.py``, HF datasets in ``hf.py``) say which tables they hold
(one per split) and stream each table's rows as dicts; this class does the rest:

========  =================================  =========================================
layout    texts                              qrels / training examples
========  =================================  =========================================
corpus    passages: id (else content id)     none
queries   queries: id (else content id)      none
pairs     query, positive(s), negative(s)    positives grade 1 / one example per row
qrels     none                               graded rows / positives per query
========  =================================  =========================================

Pair texts have no ids unless ``query_id`` (and, for one positive, ``passage_id``) name them:
they get ``text_id(role, text)``. Positive and negative cells may hold one text or a list.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from itertools import chain
from typing import Any, cast

from .base import Qrels, Source, SourceOptions, TextRecord, TrainExample, join_title, text_id
from .layout import Layout, resolve_layout
from .ledger import unique_records
from .reading import check_role, chosen_splits, merge_qrels, parse_grade, positives_only

__all__ = ["TableSource"]

Row = dict[str, Any]
Pair = tuple[TextRecord, tuple[TextRecord, ...], tuple[TextRecord, ...]]


class TableSource(Source):
    """A source made of tables, one per split, each read through its :class:`Layout`.

    Attributes:
        layouts: split name → layout of that split's table.
        params: per-source options from the spec (``layout``, ``split``).
    """

    PARAMS: tuple[str, ...] = ("layout", "split")

    def __init__(
        self, spec: str, location: str, options: SourceOptions, params: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(spec, location, options)
        self.params = dict(params or {})
        self.layouts: dict[str, Layout] = {}

    def _add_table(self, split: str, columns: list[str], hint: str) -> None:
        """Resolve and remember the layout of ``split``'s table (subclasses call it in ``__init__``)."""
        where = f"{self.spec} [{split}]" if self.layouts else self.spec
        forced = self.params.get("layout", "")
        self.layouts[split] = resolve_layout(columns, self.options.columns, where=where, forced=forced, hint=hint)

    @abstractmethod
    def _rows(self, split: str, columns: list[str]) -> Iterator[tuple[str, Row]]:
        """Stream ``(origin, row)`` of ``split``'s table, reading only ``columns``."""

    def _table(self, split: str) -> Iterator[tuple[str, Row]]:
        return self._rows(split, self.layouts[split].needed())

    def iter_texts(self, role: str | None = None) -> Iterator[TextRecord]:
        """Texts of every table (corpus passages, queries, pair texts), each id once."""
        check_role(role)
        return unique_records(self._records(), self, role)

    def _records(self) -> Iterator[TextRecord]:
        for split, layout in self.layouts.items():
            if layout.kind == "qrels":
                continue
            for origin, row in self._table(split):
                if layout.kind == "pairs":
                    pair = self._pair(origin, row, layout)
                    if pair is not None:
                        yield pair[0]
                        yield from pair[1] + pair[2]
                else:
                    record = self._single(origin, row, layout)
                    if record is not None:
                        yield record

    def _text(self, origin: str, row: Row, column: str) -> str | None:
        value = row.get(column)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value).strip():
            return str(value)
        self.reject(origin, f"empty or missing text in column {column!r}")
        return None

    def _single(self, origin: str, row: Row, layout: Layout) -> TextRecord | None:
        cols = layout.columns
        if layout.kind == "corpus":
            role, text = "passage", self._text(origin, row, cols["text"])
            if text is not None:
                text = join_title(_cell(row, cols.get("title")), text, self.options.title_join) or None
        else:
            role, text = "query", self._text(origin, row, cols["query"])
        if text is None:
            return None
        rid = _cell(row, cols.get("id")) or text_id(role, text)
        return TextRecord(rid, text, role, origin)

    def _pair(self, origin: str, row: Row, layout: Layout) -> Pair | None:
        cols = layout.columns
        query = self._text(origin, row, cols["query"])
        positives = _texts(row.get(cols["positive"]))
        # an empty negative cell is an absent negative: wide tables (negative_1..n) pad short rows with them
        negatives = [t for c in layout.negatives for t in _texts(row.get(c)) if t.strip()]
        if query is None:
            return None
        if not positives or not all(t.strip() for t in positives):
            self.reject(origin, f"empty or missing positive in column {cols['positive']!r}")
            return None
        qid = _cell(row, cols.get("query_id")) or text_id("query", query)
        pid = _cell(row, cols.get("passage_id")) if len(positives) == 1 else None
        pos = tuple(TextRecord(pid or text_id("passage", t), t, "passage", origin) for t in positives)
        neg = tuple(TextRecord(text_id("passage", t), t, "passage", origin) for t in negatives)
        return TextRecord(qid, query, "query", origin), pos, neg

    def splits(self) -> list[str]:
        """Splits whose table is pairs or qrels."""
        return sorted(s for s, layout in self.layouts.items() if layout.kind in ("pairs", "qrels"))

    def qrels(self, split: str | None = None) -> Qrels:
        """Graded rows of a qrels table, or grade-1 positives of a pairs table (None: every split)."""
        return merge_qrels(self._qrels(s) for s in chosen_splits(split, self.splits()))

    def training_examples(self, split: str | None = None) -> Iterator[TrainExample]:
        """One example per row of a pairs table; per query (positives only) of a qrels table (None: every split)."""
        return chain.from_iterable(self._examples(s) for s in chosen_splits(split, self.splits()))

    def _examples(self, split: str) -> Iterator[TrainExample]:
        if self.layouts[split].kind == "qrels":
            return positives_only(self._qrels(split))
        return (
            TrainExample(q.id, tuple(dict.fromkeys(p.id for p in pos)), _negative_ids(pos, neg))
            for q, pos, neg in self._pairs(split)
        )

    def _pairs(self, split: str) -> Iterator[Pair]:
        layout = self.layouts[split]
        for origin, row in self._table(split):
            pair = self._pair(origin, row, layout)
            if pair is not None:
                yield pair

    def _qrels(self, split: str) -> Qrels:
        layout, qrels = self.layouts[split], cast(Qrels, {})
        if layout.kind == "pairs":
            for q, pos, _ in self._pairs(split):
                qrels.setdefault(q.id, {}).update(dict.fromkeys((p.id for p in pos), 1))
            return qrels
        cols = layout.columns
        for origin, row in self._table(split):
            qid, pid = _cell(row, cols["query_id"]), _cell(row, cols["passage_id"])
            grade = parse_grade(str(row.get(cols["score"]))) if "score" in cols else 1
            if not qid or not pid or grade is None:
                self.reject(origin, f"qrels row needs a query id, a passage id and an integer score, got {row}")
                continue
            qrels.setdefault(qid, {})[pid] = grade
        return qrels


def _cell(row: Row, column: str | None) -> str | None:
    """A cell as an id string; None when the column is absent or the cell empty."""
    value = row.get(column) if column else None
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _texts(value: Any) -> list[str]:
    """One text or a list of texts (None entries dropped) as a list of strings."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    return [str(v) for v in items if v is not None]


def _negative_ids(pos: tuple[TextRecord, ...], neg: tuple[TextRecord, ...]) -> tuple[str, ...]:
    excluded = {p.id for p in pos}
    return tuple(dict.fromkeys(n.id for n in neg if n.id not in excluded))
