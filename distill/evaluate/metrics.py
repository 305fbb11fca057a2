"""Retrieval metrics computed by pytrec_eval (trec_eval 9), from a run dict or straight from top-k arrays.

pytrec_eval applies trec_eval's conventions, each pinned by a test in ``tests/distill/evaluate/test_metrics.py``:

* **Ranking.** The rank column of a run is ignored. Each query's documents are sorted by score descending, the
  score held as a C ``float`` (float32: ``0.3`` and ``0.3 + 1e-9`` tie), then by document id **descending**
  (``strcmp``, i.e. code-point order: among tied scores ``"d9"`` ranks above ``"d10"``).
* **Relevance.** A judgment ≥ 1 is relevant (``relevance_level=1``). nDCG's gains are the graded judgments; its
  ideal ranking is built from every judged document, including documents the run (or the corpus) lacks.
* **Which queries count.** A query is evaluated when it is in the run (even with no documents) and has at least one
  judgment; means are over those queries. This is trec_eval's default and what BEIR reports. Run queries without
  judgments are skipped and counted (``num_unjudged``); judged queries absent from the run are skipped, not scored 0
  (trec_eval ``-c`` would), and counted (``num_missing``), so a truncated run cannot silently inflate a mean.
* **Depth.** MAP uses the whole run; MRR@10 is ``recip_rank`` when the first relevant document is in the top 10,
  else 0 (trec_eval has no cut for it).

A top-k run scores as trec_eval would score the complete ranking, at every cut-off up to k, when the search kept
trec_eval's documents among those tied at the k-th score: ``exact_search(..., tie_priority=trec_tie_priority(ids))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytrec_eval

from distill.evaluate.trec_run import topk_run
from storage.errors import DdxError

__all__ = ["MetricsResult", "compute_metrics", "metric_names", "metrics_from_topk", "trec_tie_priority"]

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


def metric_names(k_values: Iterable[int] = (10, 100, 1000)) -> list[str]:
    """Names reported for ``k_values``: MRR@10, nDCG@10 and nDCG@k, Recall@k, MAP.

    Example:
        >>> metric_names((10, 100))
        ['MRR@10', 'nDCG@10', 'nDCG@100', 'Recall@10', 'Recall@100', 'MAP']
    """
    ks = _check_k_values(k_values)
    return [f"MRR@{MRR_CUTOFF}", *(f"nDCG@{k}" for k in _ndcg_ks(ks)), *(f"Recall@{k}" for k in ks), "MAP"]


def compute_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    *,
    k_values: Iterable[int] = (10, 100, 1000),
) -> MetricsResult:
    """Score a run against judgments with pytrec_eval (see the module docstring for the rules).

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
    plain = {q: dict(docs) for q, docs in run.items()}
    nan_query = next((q for q, docs in plain.items() if any(math.isnan(s) for s in docs.values())), None)
    if nan_query is not None:
        raise DdxError(f"Run query {nan_query!r} has a NaN score; trec_eval cannot rank it. Fix the run's scores.")
    return _evaluate(qrels, plain, ks)


def metrics_from_topk(
    qrels: Mapping[str, Mapping[str, int]],
    query_ids: Sequence[str],
    doc_ids: Sequence[str] | np.ndarray,
    topk_indices: np.ndarray,
    topk_scores: np.ndarray,
    *,
    k_values: Iterable[int] = (10, 100, 1000),
) -> MetricsResult:
    """Score top-k search results: ``compute_metrics`` on the run these arrays describe (``topk_run``).

    Row ``i`` is query ``query_ids[i]``; it retrieved ``doc_ids[topk_indices[i, j]]`` with score
    ``topk_scores[i, j]`` (float32, as trec_eval holds it). Negative indices are padding (FAISS's -1); the order
    of columns is irrelevant. Which documents made the top k is the search's business (module docstring).

    Returns:
        A ``MetricsResult``; ``num_unjudged``/``num_missing`` refer to ``query_ids`` as the run's queries.

    Raises:
        DimensionMismatchError: array shapes disagree with each other or with ``query_ids``.
        DdxError: duplicate query ids, an index past the corpus, a document twice in a row, a NaN score, or a bad k.
    """
    ks = _check_k_values(k_values)
    return _evaluate(qrels, topk_run(query_ids, doc_ids, topk_indices, topk_scores), ks)


def trec_tie_priority(doc_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Each document's rank in ascending id order: among equal scores, a higher value ranks first (as trec_eval).

    Pass it as ``exact_search(..., tie_priority=...)`` so the search keeps trec_eval's documents at a tie on the
    k-th score.

    Raises:
        DdxError: an id occurs twice.

    Example:
        >>> trec_tie_priority(["d9", "d10", "a"]).tolist()
        [2, 1, 0]
    """
    ids = np.asarray(doc_ids, dtype=str)
    order = np.argsort(ids, kind="stable")
    n_dup = int(np.count_nonzero(ids[order][1:] == ids[order][:-1]))
    if n_dup:
        raise DdxError(f"doc_ids holds {n_dup} duplicate ids; each document id must be unique.")
    priority = np.empty(len(ids), dtype=np.int64)
    priority[order] = np.arange(len(ids), dtype=np.int64)
    return priority


def _evaluate(
    qrels: Mapping[str, Mapping[str, int]], run: dict[str, dict[str, float]], ks: tuple[int, ...]
) -> MetricsResult:
    """pytrec_eval's per-query values under ddx's metric names, their means and the query counts."""
    judged = {q: dict(docs) for q, docs in qrels.items() if docs}  # pytrec_eval ignores a query with empty qrels
    cuts = {"ndcg_cut": _ndcg_ks(ks), "recall": ks}
    measures = {"recip_rank", "map", *(f"{m}.{','.join(map(str, c))}" for m, c in cuts.items())}
    raw = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(run)
    per_query = {q: _named(raw[q], ks) for q in run if q in raw}
    names = metric_names(ks)
    return MetricsResult(
        mean={n: float(np.mean([v[n] for v in per_query.values()])) if per_query else math.nan for n in names},
        per_query=per_query,
        num_evaluated=len(per_query),
        num_unjudged=len(run) - len(per_query),
        num_missing=sum(1 for q in judged if q not in run),
    )


def _named(values: Mapping[str, float], ks: tuple[int, ...]) -> dict[str, float]:
    """One query's pytrec_eval measures as ``metric_names(ks)``; MRR@10 is 0 past rank 10."""
    rr = values["recip_rank"]
    return {
        f"MRR@{MRR_CUTOFF}": rr if rr >= 1 / MRR_CUTOFF else 0.0,
        **{f"nDCG@{k}": values[f"ndcg_cut_{k}"] for k in _ndcg_ks(ks)},
        **{f"Recall@{k}": values[f"recall_{k}"] for k in ks},
        "MAP": values["map"],
    }


def _ndcg_ks(ks: tuple[int, ...]) -> list[int]:
    return sorted({NDCG_ALWAYS, *ks})


def _check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique cut-offs; each must be a positive int."""
    ks = tuple(k_values)
    if not ks or any(not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1 for k in ks):
        raise DdxError(f"k_values must be positive integers, got {ks!r}. Example: k_values=(10, 100, 1000).")
    return tuple(sorted({int(k) for k in ks}))
