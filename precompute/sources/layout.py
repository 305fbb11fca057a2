"""Which columns of a table mean what: corpus, queries, pairs/triplets or qrels, by name or by mapping.

Generic tables (jsonl, parquet, csv, tsv) and HF datasets share this. Default names cover BEIR
(``_id, title, text``; ``query-id, corpus-id, score``), sentence-transformers training sets
(``anchor|query|question``, ``positive|answer|passage``, ``negative``, ``negative_1..n`` or a
``negatives`` list) and common variants; ``SourceOptions.columns`` (or ``?field=column`` on the
spec) overrides any of them, ``?negative=a,b`` names several negative columns, and ``?layout=``
forces the layout when names are ambiguous (a BEIR queries file has the same columns as a corpus).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import BadSourceError

__all__ = ["FIELDS", "LAYOUTS", "Layout", "resolve_layout"]

FIELDS = ("id", "text", "title", "query", "positive", "negative", "query_id", "passage_id", "score")
LAYOUTS = ("corpus", "queries", "pairs", "qrels")

ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("_id", "id", "docid", "doc_id", "pid"),
    "text": ("text", "contents", "content", "passage", "document", "body"),
    "title": ("title",),
    "query": ("query", "question", "anchor", "query_text", "question_text"),
    "positive": ("positive", "pos", "answer", "passage", "document", "positive_passage", "positives"),
    "query_id": ("query_id", "query-id", "qid", "question_id"),
    "passage_id": ("passage_id", "corpus_id", "corpus-id", "docid", "doc_id", "pid"),
    "score": ("score", "label", "relevance", "rel", "grade"),
}
NEGATIVE = re.compile(r"^(hard_?)?neg(ative)?s?([_-]?\d+)?$", re.IGNORECASE)  # negative, negatives, negative_3, neg


@dataclass(frozen=True, slots=True)
class Layout:
    """A resolved table: its kind (one of LAYOUTS), field → column, and the negative columns (pairs)."""

    kind: str
    columns: Mapping[str, str]
    negatives: tuple[str, ...] = ()

    def needed(self) -> list[str]:
        """Columns to read, each once, in table order of the mapping."""
        return list(dict.fromkeys([*self.columns.values(), *self.negatives]))


def _fix(where: str) -> str:
    return (
        f"Name the columns on the spec, e.g. '{where}?query=question&positive=answer' or '?text=body&id=doc' "
        f"(fields: {', '.join(FIELDS)}), or force the layout with ?layout=corpus|queries|pairs|qrels."
    )


def _check_mapping(columns: Sequence[str], mapping: Mapping[str, str], where: str) -> dict[str, tuple[str, ...]]:
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise BadSourceError(f"Unknown column field(s) {unknown} for {where}; fields are {list(FIELDS)}.")
    named = {f: tuple(c.strip() for c in col.split(",")) if f == "negative" else (col,) for f, col in mapping.items()}
    missing = sorted({c for cols in named.values() for c in cols} - set(columns))
    if missing:
        raise BadSourceError(f"{where} has no column(s) {missing}; its columns are {list(columns)}. {_fix(where)}")
    return named


def _pick(fields: str | tuple[str, ...], columns: Sequence[str], named: Mapping[str, tuple[str, ...]]) -> str | None:
    """The column of the first of ``fields`` that is named in the mapping, else the first default name present."""
    fields = (fields,) if isinstance(fields, str) else fields
    for field in fields:
        if field in named:
            return named[field][0]
    lower = {c.lower(): c for c in columns}
    return next((lower[a] for f in fields for a in ALIASES.get(f, ()) if a in lower), None)


def resolve_layout(
    columns: Sequence[str], mapping: Mapping[str, str], *, where: str, forced: str = "", hint: str = ""
) -> Layout:
    """The layout of a table with ``columns``: ``forced`` if given, else guessed from names.

    Args:
        columns: the table's column names.
        mapping: ddx field → column overrides (``SourceOptions.columns``); "negative" may list several, comma-separated.
        where: the table, for messages (its spec).
        forced: a layout from ``?layout=`` ("" guesses).
        hint: the file, config or split name; "quer" in it reads a ``_id, text`` table as queries.

    Returns:
        The resolved :class:`Layout`.

    Raises:
        BadSourceError: unknown field or column in ``mapping``, unknown ``forced``, or no layout fits.

    Example:
        >>> resolve_layout(["query", "answer"], {}, where="x.jsonl").kind
        'pairs'
    """
    if forced and forced not in LAYOUTS:
        raise BadSourceError(f"Unknown layout {forced!r} for {where}; layouts are {list(LAYOUTS)}.")
    named = _check_mapping(columns, mapping, where)
    query, text = _pick("query", columns, named), _pick("text", columns, named)
    positive = _pick("positive", columns, named)
    qid, pid = _pick("query_id", columns, named), _pick("passage_id", columns, named)
    kind = forced
    if not kind:
        if query and positive and positive != query:
            kind = "pairs"
        elif qid and pid and not query and not text:
            kind = "qrels"
        elif text and not query:
            kind = "queries" if "quer" in hint.lower() else "corpus"
        elif query:
            kind = "queries"
        else:
            raise BadSourceError(f"Cannot tell what {where} holds from its columns {list(columns)}. {_fix(where)}")
    return _build(kind, columns, named, where)


def _build(kind: str, columns: Sequence[str], named: Mapping[str, tuple[str, ...]], where: str) -> Layout:
    if kind == "corpus":
        cols = {"id": _pick(("id", "passage_id"), columns, named), "text": _pick("text", columns, named)}
        cols["title"] = _pick("title", columns, named)
        required: tuple[str, ...] = ("text",)
    elif kind == "queries":
        cols = {"id": _pick(("id", "query_id"), columns, named), "query": _pick(("query", "text"), columns, named)}
        required = ("query",)
    elif kind == "pairs":
        cols = {f: _pick(f, columns, named) for f in ("query", "positive", "query_id", "passage_id")}
        required = ("query", "positive")
    else:
        cols = {f: _pick(f, columns, named) for f in ("query_id", "passage_id", "score")}
        required = ("query_id", "passage_id")
    absent = [f for f in required if cols.get(f) is None]
    if absent:
        raise BadSourceError(
            f"{where} read as {kind} needs field(s) {absent}; its columns are {list(columns)}. {_fix(where)}"
        )
    negatives: tuple[str, ...] = ()
    if kind == "pairs":
        negatives = named.get("negative") or tuple(c for c in columns if NEGATIVE.match(c))
    return Layout(kind, {f: c for f, c in cols.items() if c is not None}, negatives)
