"""Retrieval metrics equal to pytrec_eval (trec_eval 9) to 1e-6, from a run dict or straight from top-k arrays.

The conventions below are trec_eval's, each pinned by a test against pytrec_eval in
``tests/distill/evaluate/test_metrics.py``:

* **Ranking.** The rank column of a run is ignored. Each query's documents are sorted by score descending, the
  score held as a C ``float`` (float32: ``0.3`` and ``0.3 + 1e-8`` tie), then by document id **descending**
  (``strcmp``, i.e. code-point order: among tied scores ``"d9"`` ranks above ``"d10"``).
* **Relevance.** A judgment ≥ 1 is relevant (pytrec_eval's default ``relevance_level=1``); 0 and negative are
  not. nDCG uses linear gain ``max(rel, 0)`` and discount ``log2(rank + 1)``; its ideal ranking is built from every
  judged document with rel > 0, including documents the run (or the corpus) lacks.
* **Which queries count.** A query is evaluated when it is in the run (even with no documents) and has at least one
  judgment; means are over those queries. This is trec_eval's default and what BEIR reports (it averages
  pytrec_eval's per-query output). Run queries without judgments are skipped and counted (``num_unjudged``); judged
  queries absent from the run are skipped, not scored 0 (trec_eval ``-c`` would), and counted (``num_missing``), so
  a truncated run cannot silently inflate a mean without the count showing it.
* **Depth.** MAP uses the whole run (trec_eval does not cut at 1000); MRR@10 is ``recip_rank`` on the top 10.

``metrics_from_topk`` scores ``[nq, k]`` arrays from ``distill.search.search`` without building a dict per query: one
``lexsort`` puts each row in trec_eval order, one ``searchsorted`` over packed (row, doc) keys finds judgments,
and every metric is a few array reductions (10k queries × 1000 docs over 1 M ids: ~2 s on 2 cores).

The ranking rules on arrays live in :mod:`distill.evaluate.trec_order` and TREC run files in
:mod:`distill.evaluate.trec_run`; ``trec_tie_priority``, ``write_trec_run`` and ``read_trec_run`` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from distill.evaluate.trec_order import (
    as_str_array,
    check_topk,
    doc_order,
    priority_from_order,
    trec_row_order,
    trec_tie_priority,
    unique_ids,
)
from distill.evaluate.trec_run import read_trec_run, write_trec_run
from storage.errors import DdxError

__all__ = [
    "MetricsResult",
    "compute_metrics",
    "metric_names",
    "metrics_from_topk",
    "read_trec_run",
    "trec_tie_priority",
    "write_trec_run",
]

RELEVANCE_LEVEL = 1  # pytrec_eval's default: judgments >= 1 are relevant for MRR, recall and MAP
MRR_CUTOFF = 10
NDCG_ALWAYS = 10  # nDCG@10 is reported whatever k_values holds


@dataclass(frozen=True, kw_only=True)
class MetricsResult:
    """Per-query and mean retrieval metrics, and which queries were (not) evaluated.

    Attributes:
        mean: metric name → mean over evaluated queries (NaN for every metric when none was evaluated).
        per_query: query id → metric name → value, for evaluated queries only.
        num_evaluated: queries in the run that have at least one judgment.
        num_unjudged: queries in the run with no judgment (skipped, as trec_eval and BEIR do).
        num_missing: judged queries absent from the run (skipped, not scored 0).
    """

    mean: dict[str, float]
    per_query: dict[str, dict[str, float]]
    num_evaluated: int
    num_unjudged: int
    num_missing: int

    def to_dict(self, *, per_query: bool = True) -> dict[str, Any]:
        """Plain dict for JSON; ``per_query=False`` leaves the (large) per-query table out."""
        out = asdict(self)
        if not per_query:
            del out["per_query"]
        return out


def metric_names(k_values: Iterable[int] = (10, 100, 1000)) -> list[str]:
    """Names reported for ``k_values``: MRR@10, nDCG@10 and nDCG@k, Recall@k, MAP.

    Example:
        >>> metric_names((10, 100))
        ['MRR@10', 'nDCG@10', 'nDCG@100', 'Recall@10', 'Recall@100', 'MAP']
    """
    ks = _check_k_values(k_values)
    ndcg = sorted({NDCG_ALWAYS, *ks})
    return [f"MRR@{MRR_CUTOFF}", *(f"nDCG@{k}" for k in ndcg), *(f"Recall@{k}" for k in ks), "MAP"]


def compute_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    *,
    k_values: Iterable[int] = (10, 100, 1000),
) -> MetricsResult:
    """Score a run against judgments exactly as pytrec_eval does (see the module docstring for the rules).

    Args:
        qrels: query id → document id → graded judgment (≥ 1 relevant; ≤ 0 not).
        run: query id → document id → score. Only the scores' order matters (ties by document id descending).
        k_values: cut-offs for Recall@k and nDCG@k (nDCG@10 and MRR@10 are always reported).

    Returns:
        A ``MetricsResult``; metric names as ``metric_names(k_values)``.

    Raises:
        DdxError: a k is not a positive integer, or a score is NaN.

    Example:
        >>> r = compute_metrics({"q": {"d1": 1}}, {"q": {"d1": 0.2, "d2": 0.9}}, k_values=(10,))
        >>> r.mean["MRR@10"], r.mean["Recall@10"]
        (0.5, 1.0)
    """
    ks = _check_k_values(k_values)
    judged = _judged(qrels)
    evaluated = [q for q in run if q in judged]
    rel = _pad_rows([_ranked_judgments(q, run[q], judged[q]) for q in evaluated])
    return _result(evaluated, rel, judged, ks, num_unjudged=len(run) - len(evaluated), num_in_run=set(run))


def metrics_from_topk(
    qrels: Mapping[str, Mapping[str, int]],
    query_ids: Sequence[str],
    doc_ids: Sequence[str] | np.ndarray,
    topk_indices: np.ndarray,
    topk_scores: np.ndarray,
    *,
    k_values: Iterable[int] = (10, 100, 1000),
    doc_priority: np.ndarray | None = None,
) -> MetricsResult:
    """Score top-k search results directly; equal to ``compute_metrics`` on the run these arrays describe.

    Row ``i`` is query ``query_ids[i]``; it retrieved ``doc_ids[topk_indices[i, j]]`` with score
    ``topk_scores[i, j]``. Negative indices are padding (FAISS's -1) and retrieve nothing. The order of columns is
    irrelevant: rows are re-sorted into trec_eval order (float32 score descending, doc id descending). Which
    documents made the top k is the search's business: ``exact_search(..., tie_priority=trec_tie_priority(ids))``
    keeps, among documents tied at the k-th score, those trec_eval would rank first, so the arrays equal trec_eval's
    top k of the full ranking; with any other tie rule only the membership of that last tied group may differ.

    Args:
        qrels: query id → document id → graded judgment.
        query_ids: one id per row of the arrays (unique).
        doc_ids: corpus document ids, indexed by ``topk_indices`` (unique).
        topk_indices: ``[nq, k]`` integer corpus positions.
        topk_scores: ``[nq, k]`` scores (cast to float32, as trec_eval stores them).
        k_values: cut-offs for Recall@k and nDCG@k.
        doc_priority: ``trec_tie_priority(doc_ids)`` if already computed (saves sorting a large corpus again).

    Returns:
        A ``MetricsResult``; ``num_unjudged``/``num_missing`` refer to ``query_ids`` as the run's queries.

    Raises:
        DimensionMismatchError: array shapes disagree with each other or with ``query_ids``.
        DdxError: duplicate ids, an index past the corpus, a document twice in a row, a NaN score, a bad k,
            or a ``doc_priority`` that does not belong to ``doc_ids``.
    """
    ks = _check_k_values(k_values)
    qids = unique_ids(query_ids, "query_ids")
    ids = as_str_array(doc_ids)
    order = doc_order(ids, doc_priority)
    idx, scores = check_topk(topk_indices, topk_scores, len(qids), len(ids))
    judged = _judged(qrels)
    rows = np.array([i for i, q in enumerate(qids) if q in judged], dtype=np.int64)
    evaluated = [qids[i] for i in rows]
    idx, scores = idx[rows], scores[rows]
    idx = np.take_along_axis(idx, trec_row_order(idx, scores, priority_from_order(order)), axis=1)
    rel = _judgments_at(idx, evaluated, judged, ids, order)
    return _result(evaluated, rel, judged, ks, num_unjudged=len(qids) - len(evaluated), num_in_run=set(qids))


# --- ranking and judgments ----------------------------------------------------------------------------------------
def _judged(qrels: Mapping[str, Mapping[str, int]]) -> dict[str, Mapping[str, int]]:
    """Queries with at least one judgment (pytrec_eval ignores a query whose qrels are empty)."""
    return {q: docs for q, docs in qrels.items() if docs}


def _ranked_judgments(qid: str, doc_scores: Mapping[str, float], judgments: Mapping[str, int]) -> np.ndarray:
    """Judgments of one query's documents in trec_eval order (0 for unjudged documents)."""
    ids = list(doc_scores)
    scores = np.fromiter(doc_scores.values(), dtype=np.float64, count=len(ids)).astype(np.float32)
    if np.isnan(scores).any():
        raise DdxError(f"Run query {qid!r} has a NaN score; trec_eval cannot rank it. Fix the run's scores.")
    order = np.lexsort((np.asarray(ids, dtype=str), scores))[::-1] if ids else np.zeros(0, dtype=np.int64)
    return np.array([judgments.get(ids[i], 0) for i in order], dtype=np.float64)


def _judgments_at(
    idx: np.ndarray, qids: list[str], judged: Mapping[str, Mapping[str, int]], ids: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """Judgment of every retrieved document: ``[nq, k]`` float64, 0 where unjudged or padding.

    Judged (row, document) pairs are packed into one int64 key ``row * N + position`` and looked up with one
    ``searchsorted``; judged documents outside the corpus cannot be retrieved and are dropped here (they still
    count in ``num_rel`` and the ideal DCG).
    """
    n = len(ids)
    rel = np.zeros(idx.shape, dtype=np.float64)
    if n == 0:
        return rel
    rows = np.asarray([r for r, q in enumerate(qids) for _ in judged[q]], dtype=np.int64)
    docs = np.asarray([d for q in qids for d in judged[q]], dtype=str)
    grades = np.asarray([g for q in qids for g in judged[q].values()], dtype=np.float64)
    sorted_ids = ids[order]
    loc = np.minimum(np.searchsorted(sorted_ids, docs), n - 1)
    found = sorted_ids[loc] == docs
    keys = rows[found] * n + order[loc[found]]
    key_order = np.argsort(keys)
    keys, grades = keys[key_order], grades[found][key_order]
    if keys.size:
        wanted = np.arange(len(qids), dtype=np.int64)[:, None] * n + idx
        pos = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
        hit = (keys[pos] == wanted) & (idx >= 0)
        rel[hit] = grades[pos[hit]]
    return rel


# --- metric arithmetic --------------------------------------------------------------------------------------------


def _result(
    qids: list[str],
    rel: np.ndarray,
    judged: Mapping[str, Mapping[str, int]],
    ks: tuple[int, ...],
    *,
    num_unjudged: int,
    num_in_run: set[str],
) -> MetricsResult:
    """Every metric per query and mean, from judgments in ranked order ``rel [nq, depth]``."""
    grades = [judged[q].values() for q in qids]
    num_rel = np.array([sum(1 for g in gs if g >= RELEVANCE_LEVEL) for gs in grades], dtype=np.float64)
    ideal = _pad_rows([np.sort(np.array([g for g in gs if g > 0], dtype=np.float64))[::-1] for gs in grades])
    values = _metric_values(rel, num_rel, ideal, ks)
    per_query = {q: {name: float(v[i]) for name, v in values.items()} for i, q in enumerate(qids)}
    mean = {name: float(v.mean()) if len(qids) else float("nan") for name, v in values.items()}
    return MetricsResult(
        mean=mean,
        per_query=per_query,
        num_evaluated=len(qids),
        num_unjudged=num_unjudged,
        num_missing=sum(1 for q in judged if q not in num_in_run),
    )


def _metric_values(rel: np.ndarray, num_rel: np.ndarray, ideal: np.ndarray, ks: tuple[int, ...]) -> dict[str, Any]:
    """Metric name → per-query values, in ``metric_names`` order."""
    rel = rel if rel.shape[1] else np.zeros((len(rel), 1))  # depth 0 (empty corpus): one non-relevant column
    relevant = rel >= RELEVANCE_LEVEL
    gains = np.maximum(rel, 0.0)
    out: dict[str, np.ndarray] = {f"MRR@{MRR_CUTOFF}": _reciprocal_rank(relevant[:, :MRR_CUTOFF])}
    for k in sorted({NDCG_ALWAYS, *ks}):
        out[f"nDCG@{k}"] = _safe_div(_dcg(gains, k), _dcg(ideal, k))
    for k in ks:
        out[f"Recall@{k}"] = _safe_div(relevant[:, :k].sum(axis=1), num_rel)
    precision_at_hits = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1) * relevant
    out["MAP"] = _safe_div(precision_at_hits.sum(axis=1), num_rel)
    return out


def _reciprocal_rank(relevant: np.ndarray) -> np.ndarray:
    """1 / rank of the first relevant column, 0 when there is none."""
    first = relevant.argmax(axis=1)
    return np.where(relevant.any(axis=1), 1.0 / (first + 1), 0.0)


def _dcg(gains: np.ndarray, k: int) -> np.ndarray:
    """Discounted cumulative gain of the first ``k`` columns, discount ``log2(rank + 1)`` (trec_eval's)."""
    top = gains[:, :k]
    return (top / np.log2(np.arange(2, top.shape[1] + 2))).sum(axis=1)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den`` is 0 (trec_eval's value for a query with nothing relevant)."""
    return np.divide(num, den, out=np.zeros(len(den), dtype=np.float64), where=den > 0)


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Stack 1-D rows into ``[len(rows), max(1, longest)]`` padded with 0 (a 0 judgment changes no metric)."""
    out = np.zeros((len(rows), max([1, *(len(r) for r in rows)])), dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# --- validation ---------------------------------------------------------------------------------------------------
def _check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique cut-offs; each must be a positive int."""
    ks = tuple(k_values)
    if not ks or any(not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1 for k in ks):
        raise DdxError(f"k_values must be positive integers, got {ks!r}. Example: k_values=(10, 100, 1000).")
    return tuple(sorted({int(k) for k in ks}))
