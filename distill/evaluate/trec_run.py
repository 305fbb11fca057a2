"""TREC run files (``qid Q0 docid rank score tag``): written in trec_eval's order, read back exactly.

Rows are written in trec_eval order with ranks from 1, so the rank column agrees with how trec_eval
reads the file, and each score as the exact decimal of its float32 value, so reading a run back gives
the same ranking and the same metrics. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from distill.evaluate.trec_order import (
    as_str_array,
    check_topk,
    doc_order,
    priority_from_order,
    trec_row_order,
    unique_ids,
)
from precompute.sources.errors import BadSourceError
from storage.errors import DdxError
from storage.fs import atomic_open

__all__ = ["read_trec_run", "write_trec_run"]

_WHITESPACE = re.compile(r"\s")


def write_trec_run(
    path: str | os.PathLike[str],
    query_ids: Sequence[str],
    doc_ids: Sequence[str] | np.ndarray,
    topk_indices: np.ndarray,
    topk_scores: np.ndarray,
    tag: str = "ddx",
    *,
    doc_priority: np.ndarray | None = None,
) -> Path:
    """Write top-k results as a TREC run (``qid Q0 docid rank score tag``), atomically (temp file + rename).

    Rows are written in trec_eval order with ranks from 1, so the rank column agrees with how trec_eval reads the
    file. Scores are written as the exact decimal of their float32 value: ``read_trec_run`` gives back the same
    ranking and the same metrics. Negative (padding) indices are skipped.

    Args:
        path: output file; its folder must exist.
        query_ids, doc_ids, topk_indices, topk_scores: as ``metrics_from_topk``.
        tag: run name in the last column (no whitespace).
        doc_priority: ``trec_tie_priority(doc_ids)`` if already computed.

    Returns:
        The path written.

    Raises:
        DdxError: an id or the tag is empty or holds whitespace, or the arrays are inconsistent (see
            ``metrics_from_topk``).
    """
    qids = unique_ids(query_ids, "query_ids")
    ids = as_str_array(doc_ids)
    order = doc_order(ids, doc_priority)
    idx, scores = check_topk(topk_indices, topk_scores, len(qids), len(ids))
    rank = trec_row_order(idx, scores, priority_from_order(order))
    idx, scores = np.take_along_axis(idx, rank, axis=1), np.take_along_axis(scores, rank, axis=1)
    _check_no_whitespace([tag, *qids, *ids[np.unique(idx[idx >= 0])].tolist()], "tag and ids")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.writelines(_run_lines(qids, ids, idx, scores, tag))
    return Path(path)


def read_trec_run(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Read a 6-column TREC run into ``{qid: {docid: score}}`` (the rank column is ignored, as trec_eval does).

    Args:
        path: run file; blank lines are skipped, columns split on any whitespace.

    Returns:
        The run, queries in file order.

    Raises:
        BadSourceError: the file is missing, a line has not 6 columns or a non-numeric score, or a document
            appears twice for one query; the message names file and line.

    Example:
        >>> run = read_trec_run("runs/dev.trec")  # doctest: +SKIP
    """
    run: dict[str, dict[str, float]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    _parse_run_line(run, line, f"{path}:{line_no}")
    except FileNotFoundError:
        raise BadSourceError(f"No TREC run file at '{path}'. Write one with write_trec_run first.") from None
    return run


def _check_no_whitespace(names: list[str], what: str) -> None:
    """TREC run columns are whitespace-separated, so no id or tag may be empty or contain whitespace."""
    bad = next((n for n in names if not n or _WHITESPACE.search(n)), None)
    if bad is not None:
        raise DdxError(f"{what} must be non-empty without whitespace for a TREC run file, got {bad!r}.")


def _run_lines(qids: list[str], ids: np.ndarray, idx: np.ndarray, scores: np.ndarray, tag: str) -> Iterable[str]:
    """TREC run lines, ranks from 1; each score is ``repr`` of its float32 value, exact on reading back."""
    for qid, row_idx, row_scores in zip(qids, idx, scores, strict=True):
        valid = row_idx >= 0
        docs = ids[row_idx[valid]].tolist()
        values = row_scores[valid].astype(np.float64).tolist()
        yield "".join(
            f"{qid} Q0 {d} {rank} {s!r} {tag}\n" for rank, (d, s) in enumerate(zip(docs, values, strict=True), 1)
        )


def _parse_run_line(run: dict[str, dict[str, float]], line: str, where: str) -> None:
    """Add one ``qid Q0 docid rank score tag`` line to ``run``."""
    cols = line.split()
    if len(cols) != 6:
        raise BadSourceError(f"{where}: expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}: {line!r}")
    qid, doc, score = cols[0], cols[2], cols[4]
    try:
        value = float(score)
    except ValueError:
        raise BadSourceError(f"{where}: score {score!r} is not a number.") from None
    docs = run.setdefault(qid, {})
    if doc in docs:
        raise BadSourceError(f"{where}: document {doc!r} appears twice for query {qid!r}; trec_eval rejects that.")
    docs[doc] = value
