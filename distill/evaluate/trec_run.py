"""TREC runs: ``{qid: {docid: score}}`` from top-k arrays, and run files (``qid Q0 docid rank score tag``).

A run holds each score as its float32 value (trec_eval's C ``float``), so a run written and read back gives the
same ranking and the same metrics. Ranking is trec_eval's (pytrec_eval applies it): score descending, then
document id descending.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from storage.errors import DdxError, DimensionMismatchError
from storage.fs import atomic_open

__all__ = ["topk_run", "write_trec_run"]

_WHITESPACE = re.compile(r"\s")


def topk_run(
    query_ids: Sequence[str], doc_ids: Sequence[str] | np.ndarray, topk_indices: np.ndarray, topk_scores: np.ndarray
) -> dict[str, dict[str, float]]:
    """The run top-k arrays describe: query ``query_ids[i]`` retrieved ``doc_ids[topk_indices[i, j]]``.

    Negative indices are padding (FAISS's -1) and retrieve nothing; column order is irrelevant. Scores become
    their float32 values.

    Raises:
        DimensionMismatchError: array shapes disagree with each other or with ``query_ids``.
        DdxError: duplicate query ids, non-integer indices, an index past the corpus, a NaN score, or a document
            retrieved twice in a row.
    """
    qids = [str(q) for q in query_ids]
    if len(set(qids)) != len(qids):
        raise DdxError(f"query_ids holds duplicate ids ({len(qids) - len(set(qids))} repeats); each must be unique.")
    ids, idx, scores = np.asarray(doc_ids, dtype=str), np.asarray(topk_indices), np.asarray(topk_scores)
    if idx.ndim != 2 or idx.shape != scores.shape or idx.shape[0] != len(qids):
        raise DimensionMismatchError(
            f"Expected topk_indices and topk_scores of shape [{len(qids)}, k] (one row per query id), "
            f"got {idx.shape} and {scores.shape}."
        )
    if idx.dtype.kind not in "iu":
        raise DdxError(f"topk_indices must be integers, got dtype {idx.dtype}.")
    if idx.size and idx.max() >= len(ids):
        raise DdxError(f"topk_indices holds {int(idx.max())}, past the {len(ids)} doc_ids. Pass the searched corpus.")
    if np.isnan(scores[idx >= 0]).any():
        raise DdxError("topk_scores holds NaN; trec_eval cannot rank it. Check the vectors for NaN/inf.")
    run = {}
    for qid, row, row_scores in zip(qids, idx, scores.astype(np.float32).astype(np.float64), strict=True):
        keep = row >= 0
        run[qid] = dict(zip(ids[row[keep]].tolist(), row_scores[keep].tolist(), strict=True))
        if len(run[qid]) != keep.sum():
            raise DdxError(
                f"Query {qid!r} retrieves the same document twice (a repeated index or a duplicate doc id); "
                "a run holds each document at most once."
            )
    return run


def write_trec_run(
    path: str | os.PathLike[str],
    query_ids: Sequence[str],
    doc_ids: Sequence[str] | np.ndarray,
    topk_indices: np.ndarray,
    topk_scores: np.ndarray,
    tag: str = "ddx",
) -> Path:
    """Write top-k results as a TREC run, atomically (temp file + rename), in trec_eval's order with ranks from 1.

    Scores are written as the exact decimal of their float32 value, so reading the file back (trec_eval,
    ``pytrec_eval.parse_run``) gives the same ranking and metrics. Negative (padding) indices are skipped.

    Args:
        path: output file; its folder must exist.
        query_ids, doc_ids, topk_indices, topk_scores: as ``topk_run``.
        tag: run name in the last column (no whitespace).

    Returns:
        The path written.

    Raises:
        DdxError: an id or the tag is empty or holds whitespace, or the arrays are inconsistent (see ``topk_run``).
    """
    run = topk_run(query_ids, doc_ids, topk_indices, topk_scores)
    names = {tag, *run, *(d for docs in run.values() for d in docs)}
    bad = next((n for n in names if not n or _WHITESPACE.search(n)), None)
    if bad is not None:
        raise DdxError(f"tag and ids must be non-empty without whitespace for a TREC run file, got {bad!r}.")
    with atomic_open(path, "w", encoding="utf-8") as f:
        for qid, docs in run.items():
            ranked = sorted(docs.items(), key=lambda doc: (doc[1], doc[0]), reverse=True)  # trec_eval's order
            f.writelines(f"{qid} Q0 {d} {rank} {s!r} {tag}\n" for rank, (d, s) in enumerate(ranked, 1))
    return Path(path)
