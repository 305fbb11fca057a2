"""Exact top-k inner-product (or cosine) search of queries against a passage matrix too large to score at once.

``exact_search`` reads passages one chunk at a time (an array, a memory map, a tensor, or blocks streamed from a
store), scores ``q_block @ chunk.T`` on the device, keeps each chunk's top k and merges it into a running top k.
It never holds an ``[nq, N]`` score matrix: memory follows the chunk and query-block sizes, not N,

    chunk_size × dim × 4 B (a chunk in float32)  +  query_block × chunk_size × ~5 B (one score block + a mask)
    + nq × k × 12 B (the running top k)  +  the queries  +  BLAS buffers.

Measured on 2 CPUs, 2,000 queries of 768-d, k = 1000, float16 passages: the search adds ~0.8 GiB to RSS at
50,000-row chunks for 100k or 400k passages alike, 0.5 GiB at 25,000 and 0.35 GiB at 12,500; a dense
``q @ P.T`` + ``topk`` adds 2.1 GiB at 200k passages (1.5 GiB of scores + the float32 copy of P) and would need
70 GB of scores alone for MS MARCO's 8.8 M.

**Selection.** On a CPU, ``topk`` over a chunk costs about as much as the matmul that made it (k = 1000 of 50k
columns: ~0.9 s per 10^8 scores, against ~0.5 s when one dense ``topk`` sees 200k columns). So only the first
chunk goes through ``topk``; after it, a row's running k-th score is a floor that a later passage must reach, and
one comparison + ``nonzero`` (~0.3 s per 10^8) keeps the few survivors (about k·c/n of a chunk of c after n
passages), which are merged with the running top k. A block where some row keeps over a quarter of the chunk
falls back to ``topk``. The result is exact: nothing below the floor can enter the top k.

**Ties.** Exactly equal scores are ordered by a per-passage ``tie_priority`` (higher first), applied both at the
k-th-place boundary (which of several tied passages make the top k) and in the returned order. The default,
``-index``, prefers the earlier passage. For evaluation pass ``distill.evaluate.metrics.trec_tie_priority(doc_ids)``:
trec_eval ranks tied documents by id descending, so the returned top k is then exactly trec_eval's top k of the full
ranking, and its metrics equal those of the complete run for every cut-off up to k (which tied documents make the
top k is decided here; pytrec_eval only orders what it is given). ``torch.topk`` alone leaves tie order
unspecified. Selecting k + 1 finds the rows where a tie straddles the k-th place at no extra cost (the (k+1)-th
score equals the k-th); only those rows are re-selected by priority. A ``Reordered`` corpus (a store's rows read
in row order) is scored in its read order with the priority of each passage's corpus position, and its results
are mapped back to those positions: the same top k, ties included, as reading it in corpus order.

Inputs are checked and chunked by :mod:`distill.search.search_inputs`; :func:`faiss_search` (the optional FAISS
backend) lives in :mod:`distill.search.faiss_search` and is re-exported here.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.search.faiss_search import faiss_search
from distill.search.search_inputs import (
    Block,
    PassageSource,
    as_tensor,
    check_positive,
    chunk_tensor,
    clamp_k,
    corpus_positions,
    default_device,
    iter_chunks,
    query_tensor,
    read_order_priority,
)
from storage.errors import DdxError

__all__ = ["PassageSource", "exact_search", "faiss_search"]

SCORE_BLOCK_ELEMENTS = 1 << 27  # 512 MiB of float32 scores per (query block × chunk): big GEMMs, bounded memory
_Best = tuple[torch.Tensor, torch.Tensor]  # (scores [qb, ≤k] float32, passage indices [qb, ≤k] int64)


def exact_search(
    queries: Block,
    passages: PassageSource,
    k: int,
    *,
    chunk_size: int = 50_000,
    query_block: int | None = None,
    device: str | torch.device | None = None,
    normalize: bool = False,
    score_dtype: torch.dtype = torch.float32,
    tie_priority: np.ndarray | torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k passages per query by inner product (cosine with ``normalize=True``), in bounded memory.

    Args:
        queries: ``[nq, d]`` array or tensor.
        passages: ``[N, d]`` numpy array (``np.memmap`` and float16 welcome), torch tensor, an iterable of
            ``[n_i, d]`` blocks, a callable returning one, or a ``Reordered`` corpus (e.g. a store's rows read in
            row order: ``store_blocks``), whose results and ties are as if read in corpus order. Blocks larger
            than ``chunk_size`` are split; smaller ones are scored as they come.
        k: results per query; more than N is clamped to N with a warning.
            Vectors must be finite: NaN or inf scores rank in an unspecified order.
        chunk_size: passages scored per step (bounds memory together with ``query_block``).
        query_block: queries per step; default keeps ``query_block × chunk_size`` near 2^27 scores.
        device: where to compute; default ``"cuda"`` when available, else ``"cpu"``.
        normalize: L2-normalise queries and passages first (cosine similarity).
        score_dtype: matmul dtype. float32 by default; bfloat16/float16 suit CUDA. Scores return as float32.
        tie_priority: ``[N]`` integers; among equal scores the higher ranks first. Default ``-index``. Pass
            ``distill.evaluate.metrics.trec_tie_priority(doc_ids)`` for trec_eval's order.

    Returns:
        ``(scores, indices)``: float32 and int64 numpy arrays ``[nq, min(k, N)]``, best first.

    Raises:
        DimensionMismatchError: queries or a passage block is not 2-D, or their widths differ.
        DdxError: k, chunk_size or query_block is not positive; passages is of an unsupported type;
            tie_priority is shorter than the corpus.

    Example:
        >>> q, p = np.eye(2, 4, dtype=np.float32), np.eye(5, 4, dtype=np.float32)
        >>> scores, idx = exact_search(q, p, k=2, chunk_size=2, device="cpu")
        >>> idx.tolist()  # ties at score 0: the earlier passage first
        [[0, 1], [1, 0]]
    """
    check_positive(k=k, chunk_size=chunk_size, query_block=query_block)
    k, chunk_size = int(k), int(chunk_size)
    dev = torch.device(device) if device is not None else default_device()
    q = query_tensor(queries, dev, normalize)
    read_prio = read_order_priority(tie_priority, passages)
    prio = None if read_prio is None else as_tensor(read_prio).to(dev, torch.int64)
    qb = query_block or max(1, SCORE_BLOCK_ELEMENTS // chunk_size)
    blocks = [slice(s, min(s + qb, q.shape[0])) for s in range(0, max(q.shape[0], 1), qb)]  # >= 1, even for 0 queries
    best: list[_Best | None] = [None] * len(blocks)
    n_seen = 0
    for chunk in iter_chunks(passages, chunk_size):
        p = chunk_tensor(chunk, dev, q.shape[1], normalize, score_dtype)
        col_prio = _column_priority(prio, n_seen, p.shape[0], dev)
        for b, rows in enumerate(blocks):
            # The score block lives only for this call, so the next one is never allocated beside it.
            best[b] = _update(best[b], (q[rows].to(score_dtype) @ p.T).float(), k, n_seen, col_prio, prio)
        n_seen += p.shape[0]
        del p, col_prio  # free this chunk before the next is built: one chunk alive at a time
    k_out = clamp_k(k, n_seen)
    scores, idx = _collect(best, blocks, q.shape[0], k_out, prio)
    return scores, corpus_positions(idx, passages, n_seen)


# --- top-k selection with deterministic ties ----------------------------------------------------------------------


def _column_priority(prio: torch.Tensor | None, start: int, n: int, dev: torch.device) -> torch.Tensor:
    """Tie priority of passages ``start .. start + n`` (default: earlier passage first)."""
    if prio is None:
        return -torch.arange(start, start + n, device=dev)
    if prio.shape[0] < start + n:
        raise DdxError(f"tie_priority has {prio.shape[0]} entries but the corpus has at least {start + n} passages.")
    return prio[start : start + n]


def _priority_of(idx: torch.Tensor, prio: torch.Tensor | None) -> torch.Tensor:
    """Tie priority of passages at ``idx`` (any shape)."""
    return -idx if prio is None else prio[idx]


def _update(
    best: _Best | None, scores: torch.Tensor, k: int, offset: int, col_prio: torch.Tensor, prio: torch.Tensor | None
) -> _Best:
    """Fold one chunk's scores ``[qb, c]`` (passages ``offset ..``) into a query block's running top k.

    Once the running top k is full, only scores ≥ its k-th value can enter, so the chunk is filtered with one
    comparison and ``nonzero`` (3× cheaper than ``topk`` on the CPU, where selection costs as much as the matmul)
    and only the survivors are merged. The first chunk, and chunks where a quarter of the scores survive, take a
    plain ``topk``.
    """
    if best is not None and best[0].shape[1] == k:
        survivors = _survivors(scores, best[0].min(dim=1).values, offset)
        if survivors is not None:
            return best if survivors[0].shape[1] == 0 else _merge(best, survivors, k, prio)
    vals, cols = _select_topk(scores, min(k, scores.shape[1]), col_prio)
    return _merge(best, (vals, cols + offset), k, prio)


def _survivors(scores: torch.Tensor, floor: torch.Tensor, offset: int) -> _Best | None:
    """Scores ≥ each row's ``floor``, left-packed into ``[qb, max survivors]`` (padding: -inf, index -1).

    ``None`` when some row keeps over a quarter of the chunk (a padded copy would cost more than ``topk``).
    Padding never enters a full running top k: its k entries are finite and ≥ ``floor`` > -inf.
    """
    rows, cols = torch.nonzero(scores >= floor[:, None], as_tuple=True)
    counts = torch.bincount(rows, minlength=scores.shape[0])
    width = int(counts.max()) if rows.numel() else 0
    if width > scores.shape[1] // 4:
        return None
    slot = torch.arange(rows.numel(), device=scores.device) - (torch.cumsum(counts, 0) - counts)[rows]
    vals = torch.full((scores.shape[0], width), -torch.inf, device=scores.device)
    idx = torch.full((scores.shape[0], width), -1, dtype=torch.int64, device=scores.device)
    vals[rows, slot] = scores[rows, cols]
    idx[rows, slot] = cols + offset
    return vals, idx


def _select_topk(scores: torch.Tensor, k: int, prio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` columns per row (unordered); of columns tied at the k-th score, those of highest ``prio``.

    One ``topk`` of k + 1 finds ties straddling the boundary for free: the (k+1)-th largest equals the k-th
    exactly when more columns reach the k-th score than fit. Other rows drop their (k+1)-th column; those rows
    are re-selected from their scores with ``prio`` (rare: exact float ties). ``prio`` is ``[width]`` (one per
    column) or ``[rows, width]``.
    """
    if k >= scores.shape[1]:
        return scores, torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    vals, cols = torch.topk(scores, k + 1, dim=1, sorted=False)
    low = torch.topk(vals, 2, dim=1, largest=False)  # the (k+1)-th and k-th largest, in some order
    keep = torch.ones_like(vals, dtype=torch.bool).scatter_(1, low.indices[:, :1], False)
    vals, cols = vals[keep].view(-1, k), cols[keep].view(-1, k)
    for r in torch.nonzero(low.values[:, 0] == low.values[:, 1]).flatten().tolist():
        cols[r] = _boundary_row(scores[r], low.values[r].max(), k, prio if prio.ndim == 1 else prio[r])
        vals[r] = scores[r, cols[r]]
    return vals, cols


def _boundary_row(row: torch.Tensor, kth: torch.Tensor, k: int, prio: torch.Tensor) -> torch.Tensor:
    """Columns of the top ``k`` of ``row`` when several tie at the k-th score ``kth``: highest ``prio`` wins."""
    above = torch.nonzero(row > kth).flatten()
    tied = torch.nonzero(row == kth).flatten()
    return torch.cat([above, tied[torch.topk(prio[tied], k - above.numel()).indices]])


def _merge(best: _Best | None, new: _Best, k: int, prio: torch.Tensor | None) -> _Best:
    """Running top k ∪ a chunk's top k → the new running top k (same tie rule)."""
    if best is None:
        return new
    vals, idx = torch.cat([best[0], new[0]], dim=1), torch.cat([best[1], new[1]], dim=1)
    vals, cols = _select_topk(vals, min(k, vals.shape[1]), _priority_of(idx, prio))
    return vals, idx.gather(1, cols)


def _ordered(vals: torch.Tensor, idx: torch.Tensor, prio: torch.Tensor | None) -> _Best:
    """Sort each row by score descending, then priority descending (two stable sorts, the minor key first)."""
    by_prio = torch.argsort(_priority_of(idx, prio), dim=1, descending=True, stable=True)
    vals, idx = vals.gather(1, by_prio), idx.gather(1, by_prio)
    by_score = torch.argsort(vals, dim=1, descending=True, stable=True)
    return vals.gather(1, by_score), idx.gather(1, by_score)


def _collect(
    best: list[_Best | None], blocks: list[slice], nq: int, k: int, prio: torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray]:
    """Ordered numpy ``(scores, indices)`` from the per-block running top k."""
    scores = np.zeros((nq, k), dtype=np.float32)
    indices = np.zeros((nq, k), dtype=np.int64)
    for rows, result in zip(blocks, best, strict=True):
        if result is not None and k:
            vals, idx = _ordered(*result, prio)
            scores[rows], indices[rows] = vals.cpu().numpy(), idx.cpu().numpy()
    return scores, indices
