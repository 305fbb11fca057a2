"""Difficulty targets from the store: how much the teacher beats the hybrid on each training query.

The router learns which queries are worth the teacher's forward pass, so its target must say, per query, what
the teacher's query vector gains over the projected student's when both search the **teacher's** passage index.
Every vector involved is already stored (or is the student's own output), so the teacher never runs:

* candidates of query q: ``C(q) = pool ∪ P(q) ∪ N(q)`` — its positives P, its hard negatives N (from the data or
  mined), and a pool shared by every query (the passages of every fit example, topped up with other stored
  passages of the sources up to ``pool_size``: a large, realistic haystack, not just the query's own list);
* a candidate's score is the cosine between the query vector and the candidate's **stored teacher vector**;
* the two query vectors compared: the hybrid's (projected student query) and the teacher's (stored query vector).

From each ranking (score descending, ties by store row ascending) three per-query measures come out:

* ``ndcg10`` — nDCG@10 with binary gains, ideal DCG over ``min(|P|, 10)`` positives (what evaluation reports);
* ``rr10``   — 1 / rank of the first positive within the top 10, else 0 (MRR@10's per-query term);
* ``logp``   — ``log Σ_{p∈P} e^{s_p/τ} − log Σ_{c∈C} e^{s_c/τ}``, the InfoNCE log-likelihood of the positives
  (τ = 0.05, as in training): continuous, so it also ranks queries whose positives sit beyond rank 10.

The target is ``teacher − hybrid`` on one of them (:func:`difficulty_targets`). The default is the nDCG@10 gain:
the routing curve is scored in nDCG@10, and ranking queries by the conditional mean of exactly the quantity the
curve sums is the Bayes-optimal routing policy at every budget. ``rr10`` and ``logp`` are there to measure that
choice against (``ddx router fit --target``; bench/router_curve.py compares them on the curve).

The pool is read once, in blocks, for all query sets together; memory is bounded by ``block_rows`` passages and a
query block of ``2^26 / block_rows`` rows of scores (256 MiB of float32), whatever the pool's size.

A ``--projection none`` run's hybrid searches the teacher's first ``D`` dims, renormalised: its query set is scored
against the passages cut the same way (``dims``), the teacher's query set against the full vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.model.teacher_dims import truncate_teacher
from distill.route.config import TARGETS
from distill.search.search_inputs import default_device, unit_rows
from distill.train.data import Ragged
from storage.errors import DdxError
from storage.store import TeacherStore

__all__ = ["TARGETS", "RankOutcomes", "difficulty_targets", "rank_outcomes"]

TOP_K = 10  # nDCG@10, RR@10, and the top scores the retrieval router sees
SCORE_ELEMENTS = 1 << 26  # scores held per (query block × pool block)
_PAD_GID = np.iinfo(np.int64).max  # sorts after every real store row


@dataclass(frozen=True)
class RankOutcomes:
    """Per-query measures of one query set's rankings over its candidates (arrays of length n)."""

    ndcg10: np.ndarray
    rr10: np.ndarray
    logp: np.ndarray
    top_scores: np.ndarray  # [n, TOP_K] cosine scores of the top candidates, best first (-inf padding)


def difficulty_targets(hybrid: RankOutcomes, teacher: RankOutcomes, target: str = "ndcg10") -> np.ndarray:
    """``teacher − hybrid`` on ``target`` per query: what sending the query to the teacher gains.

    Example:
        >>> h = RankOutcomes(np.array([1.0, 0.5]), np.zeros(2), np.zeros(2), np.zeros((2, 10)))
        >>> t = RankOutcomes(np.array([1.0, 1.0]), np.zeros(2), np.zeros(2), np.zeros((2, 10)))
        >>> difficulty_targets(h, t).tolist()
        [0.0, 0.5]
    """
    if target not in TARGETS:
        raise DdxError(f"Unknown difficulty target {target!r}; choose one of {TARGETS}.")
    return getattr(teacher, target) - getattr(hybrid, target)


def rank_outcomes(
    query_sets: list[np.ndarray],
    pool: np.ndarray,
    positives: Ragged,
    negatives: Ragged,
    store: TeacherStore,
    *,
    temperature: float = 0.05,
    block_rows: int = 16_384,
    device: str | None = None,
    dims: list[int | None] | None = None,
) -> list[RankOutcomes]:
    """Rank every query's candidates with each query set's vectors; one pass over the pool serves all sets.

    Args:
        query_sets: ``[n, dim]`` query vectors per set (e.g. hybrid and teacher), row i = query i in each.
        pool: store rows shared by every query (any order, duplicates allowed).
        positives: per query, the store rows of its positives (at least one each).
        negatives: per query, the store rows of its hard negatives (a positive listed here stays a positive).
        store: the teacher store the rows index.
        temperature: τ of ``logp``.
        block_rows: pool passages gathered and scored per step.
        device: where the scores are computed (default: CUDA when available).
        dims: per query set, the leading teacher dims its passages keep, renormalised (``None``: the full vectors,
            the default for every set); a ``--projection none`` run's hybrid set takes its ``teacher_dims``.

    Returns:
        One :class:`RankOutcomes` per query set.

    Raises:
        DdxError: a query has no positive, or the query sets disagree in shape.
    """
    n = len(positives)
    if any(q.shape[0] != n for q in query_sets) or len(negatives) != n:
        raise DdxError(f"rank_outcomes: {n} queries' positives but query sets of {[q.shape[0] for q in query_sets]}.")
    dims = list(dims) if dims is not None else [None] * len(query_sets)
    if len(dims) != len(query_sets):
        raise DdxError(f"rank_outcomes: {len(query_sets)} query sets but {len(dims)} dims.")
    if n and positives.lengths().min() == 0:
        raise DdxError("rank_outcomes: every query needs at least one positive.")
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    qblock = max(1, SCORE_ELEMENTS // max(block_rows, 1))
    out: list[list[RankOutcomes]] = [[] for _ in query_sets]
    for start in range(0, n, qblock):
        rows = np.arange(start, min(start + qblock, n))
        pos = positives.select(rows)
        own = Ragged.from_lists([np.union1d(pos.row(i), negatives.row(int(r))) for i, r in enumerate(rows)])
        sets = [unit_rows(q[rows]) for q in query_sets]
        pool_top = _pool_pass(sets, dims, pool, own, store, temperature, block_rows, device)
        own_raw = store.get_rows(own.flat, dtype="float32") if len(own.flat) else None
        for j, q in enumerate(sets):
            own_vecs = _passages(own_raw, dims[j]) if own_raw is not None else None
            out[j].append(_outcomes(q, own, pos, own_vecs, *pool_top[j], temperature))
    return [_concat(parts) for parts in out]


def _passages(raw: np.ndarray, dims: int | None) -> np.ndarray:
    """Stored passage vectors as a query set scores them: unit rows, cut to ``dims`` first when given."""
    return truncate_teacher(raw, dims) if dims is not None else unit_rows(raw)


def _pool_pass(
    sets: list[np.ndarray],
    dims: list[int | None],
    pool: np.ndarray,
    own: Ragged,
    store: TeacherStore,
    tau: float,
    block_rows: int,
    device: str | None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per set: top-k pool scores and rows ``[nq, k]`` and logsumexp(s/τ) over the pool, own candidates masked.

    A query's own candidates are masked out of the pool (they are scored once, with the own list), so no candidate
    counts twice in a ranking or in the softmax normaliser.
    """
    import torch

    dev = torch.device(device) if device else default_device()
    nq = len(own)
    q_of = np.repeat(np.arange(nq), own.lengths())
    at = np.searchsorted(pool, own.flat)
    inside = (at < len(pool)) & (pool[np.minimum(at, len(pool) - 1)] == own.flat) if len(pool) else at < 0
    mask_q, mask_p = q_of[inside], at[inside]
    tensors = [torch.from_numpy(q).to(dev) for q in sets]
    top = [(torch.full((nq, 0), -torch.inf, device=dev), torch.zeros((nq, 0), dtype=torch.int64, device=dev))] * len(
        sets
    )
    lse = [torch.full((nq,), -torch.inf, dtype=torch.float64, device=dev) for _ in sets]
    for s in range(0, len(pool), block_rows):
        rows = pool[s : s + block_rows]
        raw = store.get_rows(rows, dtype="float32")
        p = {d: torch.from_numpy(_passages(raw, d)).to(dev) for d in set(dims)}
        sel = (mask_p >= s) & (mask_p < s + len(rows))
        mq, mp = torch.from_numpy(mask_q[sel]).to(dev), torch.from_numpy(mask_p[sel] - s).to(dev)
        row_ids = torch.from_numpy(rows).to(dev).expand(nq, -1)
        for j, q in enumerate(tensors):
            scores = q @ p[dims[j]].T
            scores[mq, mp] = -torch.inf
            lse[j] = torch.logaddexp(lse[j], torch.logsumexp(scores.double() / tau, dim=1))
            vals = torch.cat([top[j][0], scores], dim=1)
            ids = torch.cat([top[j][1], row_ids], dim=1)
            best = torch.topk(vals, min(TOP_K, vals.shape[1]), dim=1)
            top[j] = (best.values, ids.gather(1, best.indices))
    return [(t[0].cpu().numpy(), t[1].cpu().numpy(), e.cpu().numpy()) for t, e in zip(top, lse, strict=True)]


def _outcomes(
    q: np.ndarray,
    own: Ragged,
    pos: Ragged,
    own_vecs: np.ndarray | None,
    pool_scores: np.ndarray,
    pool_rows: np.ndarray,
    pool_lse: np.ndarray,
    tau: float,
) -> RankOutcomes:
    """Merge the pool's top k with each query's own candidates; rank; score the three measures."""
    nq, width = len(own), int(own.lengths().max()) if len(own) else 0
    scores = np.full((nq, width), -np.inf, dtype=np.float32)
    rows = np.full((nq, width), _PAD_GID, dtype=np.int64)
    is_pos = np.zeros((nq, width), dtype=bool)
    for i in range(nq):
        cand = own.row(i)
        if len(cand):
            assert own_vecs is not None
            vecs = own_vecs[own.offsets[i] : own.offsets[i + 1]]
            scores[i, : len(cand)], rows[i, : len(cand)] = vecs @ q[i], cand
            is_pos[i, : len(cand)] = np.isin(cand, pos.row(i))
    own_lse = _logsumexp(np.where(np.isfinite(scores), scores / tau, -np.inf))
    pos_lse = _logsumexp(np.where(is_pos, scores / tau, -np.inf))
    logp = pos_lse - np.logaddexp(pool_lse, own_lse)
    pool_rows = np.where(np.isfinite(pool_scores), pool_rows, _PAD_GID)
    all_s = np.concatenate([pool_scores, scores], axis=1)
    all_r = np.concatenate([pool_rows, rows], axis=1)
    all_p = np.concatenate([np.zeros_like(pool_scores, dtype=bool), is_pos], axis=1)
    order = np.lexsort((all_r, -all_s.astype(np.float64)), axis=-1)[:, :TOP_K]
    ranked = np.take_along_axis(all_p, order, axis=1)
    top = np.full((nq, TOP_K), -np.inf, dtype=np.float32)
    top[:, : order.shape[1]] = np.take_along_axis(all_s, order, axis=1)
    return RankOutcomes(_ndcg(ranked, pos.lengths()), _rr(ranked), logp, top)


def _ndcg(ranked: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    discount = 1.0 / np.log2(np.arange(2, TOP_K + 2))
    dcg = (ranked * discount[: ranked.shape[1]]).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(n_pos, TOP_K) - 1]
    return dcg / ideal


def _rr(ranked: np.ndarray) -> np.ndarray:
    first = ranked.argmax(axis=1)
    return np.where(ranked.any(axis=1), 1.0 / (first + 1), 0.0)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Per row (-inf for a row of none or only -inf)."""
    return np.logaddexp.reduce(x.astype(np.float64), axis=1, initial=-np.inf)


def _concat(parts: list[RankOutcomes]) -> RankOutcomes:
    if not parts:
        return RankOutcomes(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, TOP_K), np.float32))
    return RankOutcomes(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("ndcg10", "rr10", "logp", "top_scores"))
    )
