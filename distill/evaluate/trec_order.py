"""trec_eval's ranking rules on top-k arrays, shared by the metrics and the TREC run files.

trec_eval sorts each query's documents by score descending, the score held as a C ``float`` (float32),
then by document id **descending** (``strcmp``, code-point order). Here that order is computed on
``[nq, k]`` index/score arrays without building a dict per query: each document's rank in ascending
id order (its *priority*) breaks ties, and both keys pack into one integer per cell for one ``argsort``.
The checks on ids and top-k arrays live here too, so metrics and run files refuse the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from storage.errors import DdxError, DimensionMismatchError

__all__ = [
    "as_str_array",
    "check_topk",
    "doc_order",
    "priority_from_order",
    "trec_row_order",
    "trec_tie_priority",
    "unique_ids",
]


def trec_tie_priority(doc_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Each document's rank in ascending id order: among equal scores, a higher value ranks first (as trec_eval).

    Pass it as ``exact_search(..., tie_priority=...)`` so the search keeps trec_eval's documents at a tie on the
    k-th score, and as ``metrics_from_topk(..., doc_priority=...)`` to skip sorting the ids twice.

    Args:
        doc_ids: corpus document ids (unique).

    Returns:
        ``int64 [N]``, a permutation of ``0..N-1``.

    Raises:
        DdxError: an id occurs twice.

    Example:
        >>> trec_tie_priority(["d9", "d10", "a"]).tolist()
        [2, 1, 0]
    """
    return priority_from_order(doc_order(as_str_array(doc_ids), None))


def trec_row_order(idx: np.ndarray, scores: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Per-row column order: score descending, then doc-id priority descending (trec_eval); padding last.

    Both keys are packed into one uint64 — the float32 score mapped to order-preserving uint32 bits, above
    ``priority + 1`` (padding gets 0) — so one ``argsort`` does what a two-key ``lexsort`` does, 3× faster.
    """
    valid = idx >= 0
    bits = (np.where(valid, scores, -np.inf).astype(np.float32) + np.float32(0)).view(np.uint32)  # -0.0 → +0.0
    bits = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)  # IEEE order → integer order
    tie = np.where(valid, priority[np.where(valid, idx, 0)] + 1, 0).astype(np.uint64)
    return np.argsort((bits << np.uint64(32)) | tie, axis=1)[:, ::-1]


def unique_ids(ids: Sequence[str], what: str) -> list[str]:
    """``ids`` as a list of str, refusing duplicates (a dict-based run could not hold them)."""
    out = [str(i) for i in ids]
    if len(set(out)) != len(out):
        raise DdxError(f"{what} holds duplicate ids ({len(out) - len(set(out))} repeats); each id must be unique.")
    return out


def as_str_array(doc_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Document ids as a numpy unicode array (its ordering is code-point order, i.e. trec_eval's ``strcmp``)."""
    ids = np.asarray(doc_ids)
    return ids if ids.dtype.kind == "U" else ids.astype(str)


def doc_order(ids: np.ndarray, priority: np.ndarray | None) -> np.ndarray:
    """Positions of ``ids`` in ascending id order; checks ids are unique and ``priority`` (if given) fits them."""
    if priority is not None and len(priority) != len(ids):
        raise DdxError(f"doc_priority has {len(priority)} entries for {len(ids)} doc_ids; use trec_tie_priority(ids).")
    order = np.argsort(ids if priority is None else np.asarray(priority), kind="stable")
    sorted_ids = ids[order]
    if len(ids) > 1 and not np.all(sorted_ids[1:] > sorted_ids[:-1]):
        if priority is not None:
            raise DdxError("doc_priority does not order doc_ids ascending; pass trec_tie_priority(doc_ids).")
        n_dup = int(np.count_nonzero(sorted_ids[1:] == sorted_ids[:-1]))
        raise DdxError(f"doc_ids holds {n_dup} duplicate ids; each document id must be unique.")
    return order


def priority_from_order(order: np.ndarray) -> np.ndarray:
    """Inverse permutation of ``order``: each document's rank in ascending id order."""
    priority = np.empty(len(order), dtype=np.int64)
    priority[order] = np.arange(len(order), dtype=np.int64)
    return priority


def check_topk(indices: np.ndarray, scores: np.ndarray, nq: int, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(int64 indices, float32 scores)``, both ``[nq, k]``."""
    idx, sc = np.asarray(indices), np.asarray(scores)
    if idx.ndim != 2 or idx.shape != sc.shape or idx.shape[0] != nq:
        raise DimensionMismatchError(
            f"Expected topk_indices and topk_scores of shape [{nq}, k] (one row per query id), "
            f"got {idx.shape} and {sc.shape}."
        )
    if idx.dtype.kind not in "iu":
        raise DdxError(f"topk_indices must be integers, got dtype {idx.dtype}.")
    idx, sc = idx.astype(np.int64, copy=False), sc.astype(np.float32)
    if n_docs >= 1 << 32:
        raise DdxError(f"{n_docs} doc_ids exceed the 2^32 - 1 documents that tie keys hold.")
    if idx.size and idx.max() >= n_docs:
        raise DdxError(f"topk_indices holds {int(idx.max())}, past the {n_docs} doc_ids. Pass the searched corpus.")
    if np.isnan(sc[idx >= 0]).any():
        raise DdxError("topk_scores holds NaN; trec_eval cannot rank it. Check the vectors for NaN/inf.")
    srt = np.sort(idx, axis=1)
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        raise DdxError("A row of topk_indices retrieves the same document twice; a run holds each at most once.")
    return idx, sc
