"""Retrieval metrics equal to pytrec_eval (trec_eval 9) to 1e-6, from a run dict or straight from top-k arrays.

The conventions below are trec_eval's, each pinned by a test against pytrec_eval in
``tests/distill/test_metrics.py``:

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

``metrics_from_topk`` scores ``[nq, k]`` arrays from ``distill.search`` without building a dict per query: one
``lexsort`` puts each row in trec_eval order, one ``searchsorted`` over packed (row, doc) keys finds judgments,
and every metric is a few array reductions (10k queries × 1000 docs over 1 M ids: ~2 s on 2 cores).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import BadSourceError, DdxError, DimensionMismatchError

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
_WHITESPACE = re.compile(r"\s")


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
    qids = _unique_ids(query_ids, "query_ids")
    ids = _as_str_array(doc_ids)
    order = _doc_order(ids, doc_priority)
    idx, scores = _check_topk(topk_indices, topk_scores, len(qids), len(ids))
    judged = _judged(qrels)
    rows = np.array([i for i, q in enumerate(qids) if q in judged], dtype=np.int64)
    evaluated = [qids[i] for i in rows]
    idx, scores = idx[rows], scores[rows]
    idx = np.take_along_axis(idx, _trec_row_order(idx, scores, _priority_from_order(order)), axis=1)
    rel = _judgments_at(idx, evaluated, judged, ids, order)
    return _result(evaluated, rel, judged, ks, num_unjudged=len(qids) - len(evaluated), num_in_run=set(qids))


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
    return _priority_from_order(_doc_order(_as_str_array(doc_ids), None))


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
    qids = _unique_ids(query_ids, "query_ids")
    ids = _as_str_array(doc_ids)
    order = _doc_order(ids, doc_priority)
    idx, scores = _check_topk(topk_indices, topk_scores, len(qids), len(ids))
    rank = _trec_row_order(idx, scores, _priority_from_order(order))
    idx, scores = np.take_along_axis(idx, rank, axis=1), np.take_along_axis(scores, rank, axis=1)
    _check_no_whitespace([tag, *qids, *ids[np.unique(idx[idx >= 0])].tolist()], "tag and ids")
    return _write_atomic(Path(path), _run_lines(qids, ids, idx, scores, tag))


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


def _trec_row_order(idx: np.ndarray, scores: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Per-row column order: score descending, then doc-id priority descending (trec_eval); padding last.

    Both keys are packed into one uint64 — the float32 score mapped to order-preserving uint32 bits, above
    ``priority + 1`` (padding gets 0) — so one ``argsort`` does what a two-key ``lexsort`` does, 3× faster.
    """
    valid = idx >= 0
    bits = (np.where(valid, scores, -np.inf).astype(np.float32) + np.float32(0)).view(np.uint32)  # -0.0 → +0.0
    bits = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)  # IEEE order → integer order
    tie = np.where(valid, priority[np.where(valid, idx, 0)] + 1, 0).astype(np.uint64)
    return np.argsort((bits << np.uint64(32)) | tie, axis=1)[:, ::-1]


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


def _unique_ids(ids: Sequence[str], what: str) -> list[str]:
    """``ids`` as a list of str, refusing duplicates (a dict-based run could not hold them)."""
    out = [str(i) for i in ids]
    if len(set(out)) != len(out):
        raise DdxError(f"{what} holds duplicate ids ({len(out) - len(set(out))} repeats); each id must be unique.")
    return out


def _as_str_array(doc_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Document ids as a numpy unicode array (its ordering is code-point order, i.e. trec_eval's ``strcmp``)."""
    ids = np.asarray(doc_ids)
    return ids if ids.dtype.kind == "U" else ids.astype(str)


def _doc_order(ids: np.ndarray, priority: np.ndarray | None) -> np.ndarray:
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


def _priority_from_order(order: np.ndarray) -> np.ndarray:
    """Inverse permutation of ``order``: each document's rank in ascending id order."""
    priority = np.empty(len(order), dtype=np.int64)
    priority[order] = np.arange(len(order), dtype=np.int64)
    return priority


def _check_topk(indices: np.ndarray, scores: np.ndarray, nq: int, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
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


def _check_no_whitespace(names: list[str], what: str) -> None:
    """TREC run columns are whitespace-separated, so no id or tag may be empty or contain whitespace."""
    bad = next((n for n in names if not n or _WHITESPACE.search(n)), None)
    if bad is not None:
        raise DdxError(f"{what} must be non-empty without whitespace for a TREC run file, got {bad!r}.")


# --- TREC run files -----------------------------------------------------------------------------------------------


def _run_lines(qids: list[str], ids: np.ndarray, idx: np.ndarray, scores: np.ndarray, tag: str) -> Iterable[str]:
    """TREC run lines, ranks from 1; each score is ``repr`` of its float32 value, exact on reading back."""
    for qid, row_idx, row_scores in zip(qids, idx, scores, strict=True):
        valid = row_idx >= 0
        docs = ids[row_idx[valid]].tolist()
        values = row_scores[valid].astype(np.float64).tolist()
        yield "".join(
            f"{qid} Q0 {d} {rank} {s!r} {tag}\n" for rank, (d, s) in enumerate(zip(docs, values, strict=True), 1)
        )


def _write_atomic(path: Path, chunks: Iterable[str]) -> Path:
    """Write ``chunks`` to a temp file beside ``path`` and rename it into place; nothing is left on failure."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
