"""distill.evaluate.metrics against pytrec_eval called directly (ties, graded qrels, missing and unjudged queries),
and by hand; TREC run files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from distill.evaluate.metrics import MetricsResult, compute_metrics, metric_names, metrics_from_topk, trec_tie_priority
from distill.evaluate.trec_run import write_trec_run
from storage.errors import DdxError, DimensionMismatchError

pytrec_eval = pytest.importorskip("pytrec_eval")

KS = (5, 10, 100, 1000)
SEEDS = range(6)


def pytrec(qrels: dict, run: dict, ks: tuple[int, ...] = KS) -> dict[str, dict[str, float]]:
    """pytrec_eval's values under our metric names. MRR@10 = recip_rank when the first hit is in the top 10."""
    cut = ",".join(map(str, ks))
    measures = {"recip_rank", "map", f"ndcg_cut.{cut}", f"recall.{cut}"}
    raw = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    out = {}
    for q, m in raw.items():
        values = {"MRR@10": m["recip_rank"] if m["recip_rank"] >= 0.1 - 1e-12 else 0.0, "MAP": m["map"]}
        values |= {f"nDCG@{k}": m[f"ndcg_cut_{k}"] for k in ks}
        values |= {f"Recall@{k}": m[f"recall_{k}"] for k in ks}
        out[q] = values
    return out


def assert_matches_pytrec(result: MetricsResult, qrels: dict, run: dict, ks: tuple[int, ...] = KS) -> None:
    """Every metric of every query, and the means, equal pytrec_eval's to 1e-6."""
    expected = pytrec(qrels, run, ks)
    assert set(result.per_query) == set(expected)
    for q, values in expected.items():
        assert result.per_query[q] == pytest.approx(values, abs=1e-6), q
    for name in metric_names(ks):
        mean = np.mean([v[name] for v in expected.values()])
        assert result.mean[name] == pytest.approx(mean, abs=1e-6), name


def random_qrels_and_run(seed: int) -> tuple[dict, dict, list[str]]:
    """30–60 queries, 50–300 docs, grades 0–3 (a few -1), scores rounded to 0.1 so ties are everywhere.

    Queries 0–4 are judged but absent from the run; the last 5 run queries have no judgments; one has empty
    qrels; some run queries retrieve nothing; ids like "d9"/"d10" make string order differ from numeric order.
    """
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(int(rng.integers(50, 301)))]
    qids = [f"q{i}" for i in range(int(rng.integers(30, 61)))]
    judged, in_run = qids[:-5], qids[5:]
    qrels = {q: _random_judgments(rng, docs) for q in judged}
    qrels[judged[-1]] = {}
    run = {}
    for q in in_run:
        n = int(rng.integers(0, len(docs) + 1)) if rng.random() > 0.1 else 0
        picked = rng.choice(docs, n, replace=False)
        run[q] = {d: float(s) for d, s in zip(picked, np.round(rng.random(n), 1), strict=True)}
    return qrels, run, docs


def _random_judgments(rng: np.random.Generator, docs: list[str]) -> dict[str, int]:
    picked = rng.choice(docs, int(rng.integers(1, 25)), replace=False)
    grades = rng.choice([-1, 0, 0, 1, 1, 2, 3], len(picked)) if rng.random() > 0.1 else np.zeros(len(picked), int)
    return {str(d): int(g) for d, g in zip(picked, grades, strict=True)}


def random_topk(seed: int, docs: list[str], qids: list[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k arrays with tied scores, columns in random order, and some -1 padding."""
    rng = np.random.default_rng(seed + 100)
    idx = np.stack([rng.choice(len(docs), depth, replace=False) for _ in qids])
    scores = np.round(rng.random(idx.shape), 1).astype(np.float32)
    idx[rng.random(idx.shape) < 0.05] = -1
    return idx, scores


def run_from_topk(qids: list[str], docs: list[str], idx: np.ndarray, scores: np.ndarray) -> dict:
    return {
        q: {docs[i]: float(s) for i, s in zip(row, srow, strict=True) if i >= 0}
        for q, row, srow in zip(qids, idx, scores, strict=True)
    }


# --- pytrec_eval's own behaviour, which the rules in distill.evaluate.metrics follow -------------------------------


def test_pytrec_eval_breaks_ties_by_doc_id_descending() -> None:
    qrels = {"q": {"d2": 1}}
    # All tied: descending ids give d3, d2, d1 (rank 2); ascending would give rank 2 too, so add a case where
    # they differ: z, d2, b, a (rank 2) vs a, b, d2, z (rank 3). Code-point order: "d9" > "d10".
    assert pytrec(qrels, {"q": {"a": 1.0, "b": 1.0, "d2": 1.0, "z": 1.0}})["q"]["MRR@10"] == 0.5
    assert pytrec({"q": {"d9": 1}}, {"q": {"d10": 1.0, "d9": 1.0}})["q"]["MRR@10"] == 1.0
    assert pytrec({"q": {"d10": 1}}, {"q": {"d10": 1.0, "d9": 1.0}})["q"]["MRR@10"] == 0.5


def test_pytrec_eval_compares_scores_as_float32() -> None:
    """trec_eval holds scores as C float: values equal in float32 tie, even if distinct as doubles."""
    run = {"q": {"a": 0.3 + 1e-9, "z": 0.3}}
    assert pytrec({"q": {"a": 1}}, run)["q"]["MRR@10"] == 0.5  # tie → "z" first
    assert compute_metrics({"q": {"a": 1}}, run).per_query["q"]["MRR@10"] == 0.5
    run = {"q": {"a": 0.3 + 1e-6, "z": 0.3}}
    assert pytrec({"q": {"a": 1}}, run)["q"]["MRR@10"] == 1.0


def test_pytrec_eval_query_selection() -> None:
    """Evaluated = in the run (even empty) and with ≥ 1 judgment (even all 0); empty qrels count as unjudged."""
    qrels = {"a": {"d1": 1}, "missing": {"d1": 1}, "zeros": {"d1": 0}, "empty": {}, "no_docs": {"d1": 1}}
    run = {"a": {"d1": 1.0}, "unjudged": {"d1": 1.0}, "zeros": {"d1": 1.0}, "empty": {"d1": 1.0}, "no_docs": {}}
    assert set(pytrec(qrels, run)) == {"a", "zeros", "no_docs"}
    result = compute_metrics(qrels, run, k_values=KS)
    assert_matches_pytrec(result, qrels, run)
    assert (result.num_evaluated, result.num_unjudged, result.num_missing) == (3, 2, 1)


# --- compute_metrics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_compute_metrics_equals_pytrec_eval(seed: int) -> None:
    qrels, run, _ = random_qrels_and_run(seed)
    result = compute_metrics(qrels, run, k_values=KS)
    assert_matches_pytrec(result, qrels, run)
    assert result.num_missing == 5  # q0..q4 judged, not run
    assert result.num_unjudged == 6  # the 5 unjudged run queries + the one with empty qrels


def test_hand_computed_two_queries() -> None:
    """q1 ranks d3 (0), d4 (unjudged; ties d1 at 0.8 and "d4" > "d1"), d1 (1), d2 (2); q2 ranks d6, d5 (1)."""
    qrels = {"q1": {"d1": 1, "d2": 2, "d3": 0}, "q2": {"d5": 1}}
    run = {"q1": {"d3": 0.9, "d1": 0.8, "d4": 0.8, "d2": 0.5}, "q2": {"d5": 0.1, "d6": 0.2}}
    result = compute_metrics(qrels, run, k_values=(10,))
    q1_ndcg = (1 / math.log2(4) + 2 / math.log2(5)) / (2 / math.log2(2) + 1 / math.log2(3))  # gains at ranks 3, 4
    expected = {
        "q1": {"MRR@10": 1 / 3, "nDCG@10": q1_ndcg, "Recall@10": 1.0, "MAP": (1 / 3 + 2 / 4) / 2},
        "q2": {"MRR@10": 1 / 2, "nDCG@10": 1 / math.log2(3), "Recall@10": 1.0, "MAP": 1 / 2},
    }
    for q, values in expected.items():
        assert result.per_query[q] == pytest.approx(values, abs=1e-12), q
    assert result.mean["MRR@10"] == pytest.approx(5 / 12)
    assert result.mean["MAP"] == pytest.approx((5 / 12 + 1 / 2) / 2)
    assert q1_ndcg == pytest.approx(0.517442, abs=1e-6)
    assert_matches_pytrec(result, qrels, run, ks=(10,))


def test_no_evaluated_query_gives_nan_means() -> None:
    result = compute_metrics({"q": {"d": 1}}, {"other": {"d": 1.0}})
    assert result.num_evaluated == 0 and result.per_query == {}
    assert all(math.isnan(v) for v in result.mean.values())
    assert (result.num_unjudged, result.num_missing) == (1, 1)


def test_metric_names_and_counts() -> None:
    assert metric_names() == ["MRR@10", "nDCG@10", "nDCG@100", "nDCG@1000", "Recall@10", "Recall@100",
                              "Recall@1000", "MAP"]  # fmt: skip
    result = compute_metrics({"q": {"d": 1}}, {"q": {"d": 1.0}})
    assert list(result.mean) == metric_names()
    assert (result.num_evaluated, result.num_unjudged, result.num_missing) == (1, 0, 0)
    assert result.per_query == {"q": result.mean}


@pytest.mark.parametrize("k_values", [(), (0,), (10, -1), (1.5,), (True,)])
def test_bad_k_values(k_values: tuple) -> None:
    with pytest.raises(DdxError, match="k_values must be positive integers"):
        compute_metrics({}, {}, k_values=k_values)


def test_nan_score_is_refused() -> None:
    with pytest.raises(DdxError, match="NaN score"):
        compute_metrics({"q": {"d": 1}}, {"q": {"d": float("nan")}})


# --- metrics_from_topk --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_metrics_from_topk_equals_compute_metrics_and_pytrec(seed: int) -> None:
    qrels, _, docs = random_qrels_and_run(seed)
    qids = [f"q{i}" for i in range(5, 45)] + ["unjudged"]
    idx, scores = random_topk(seed, docs, qids, depth=min(40, len(docs)))
    run = run_from_topk(qids, docs, idx, scores)
    fast = metrics_from_topk(qrels, qids, docs, idx, scores, k_values=KS)
    slow = compute_metrics(qrels, run, k_values=KS)
    assert fast.per_query.keys() == slow.per_query.keys()
    for q in slow.per_query:
        assert fast.per_query[q] == pytest.approx(slow.per_query[q], abs=1e-12), q
    assert (fast.num_evaluated, fast.num_unjudged, fast.num_missing) == (
        slow.num_evaluated,
        slow.num_unjudged,
        slow.num_missing,
    )
    assert_matches_pytrec(fast, qrels, run)


def test_metrics_from_topk_ignores_column_order_and_uses_float32() -> None:
    docs = ["d10", "d9", "x"]
    qrels = {"q": {"d10": 1}}
    idx = np.array([[0, 1, 2]])
    scores = np.array([[0.5, 0.5 + 1e-9, 0.1]])  # float64 input: equal once cast to float32 → "d9" first
    result = metrics_from_topk(qrels, ["q"], docs, idx, scores, k_values=(10,))
    assert result.per_query["q"]["MRR@10"] == 0.5
    reordered = metrics_from_topk(qrels, ["q"], docs, idx[:, ::-1], scores[:, ::-1], k_values=(10,))
    assert reordered == result


def test_judged_docs_outside_corpus_count_as_relevant_not_retrieved() -> None:
    qrels = {"q": {"d1": 1, "elsewhere": 2}}
    result = metrics_from_topk(qrels, ["q"], ["d1", "d2"], np.array([[1, 0]]), np.array([[2.0, 1.0]]))
    expected = compute_metrics(qrels, {"q": {"d2": 2.0, "d1": 1.0}})
    assert result == expected
    assert result.per_query["q"]["Recall@10"] == 0.5


def test_metrics_from_topk_empty_corpus() -> None:
    result = metrics_from_topk({"q": {"d": 1}}, ["q"], [], np.zeros((1, 0), np.int64), np.zeros((1, 0)))
    assert result.per_query["q"]["MRR@10"] == 0.0 and result.num_evaluated == 1


@pytest.mark.parametrize(
    ("idx", "scores", "doc_ids", "error", "match"),
    [
        ([[0, 1]], [[1.0]], ["a", "b"], DimensionMismatchError, r"shape \[1, k\]"),
        ([[0], [1]], [[1.0], [1.0]], ["a", "b"], DimensionMismatchError, r"one row per query id"),
        ([[0.0, 1.0]], [[1.0, 1.0]], ["a", "b"], DdxError, "must be integers"),
        ([[0, 2]], [[1.0, 1.0]], ["a", "b"], DdxError, "past the 2 doc_ids"),
        ([[1, 1]], [[1.0, 0.5]], ["a", "b"], DdxError, "same document twice"),
        ([[0, 1]], [[1.0, 0.5]], ["a", "a"], DdxError, "same document twice"),  # a duplicate doc id
        ([[0, 1]], [[np.nan, 0.5]], ["a", "b"], DdxError, "NaN"),
    ],
)
def test_metrics_from_topk_errors(idx: list, scores: list, doc_ids: list, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        metrics_from_topk({"q": {"a": 1}}, ["q"], doc_ids, np.array(idx), np.array(scores))


def test_duplicate_query_ids() -> None:
    with pytest.raises(DdxError, match="query_ids holds duplicate ids"):
        metrics_from_topk({}, ["q", "q"], ["a", "b"], np.array([[0], [1]]), np.ones((2, 1)))


def test_trec_tie_priority() -> None:
    assert trec_tie_priority(["d9", "d10", "a"]).tolist() == [2, 1, 0]
    with pytest.raises(DdxError, match="1 duplicate ids"):
        trec_tie_priority(["a", "b", "a"])


def test_ties_across_the_cutoffs_agree_with_pytrec_eval_and_by_hand() -> None:
    """12 documents tied at one score: trec_eval ranks them by id descending, so "z" is 1st and "d1" is 12th.

    "d1" past rank 10 scores 0 for MRR@10 and Recall@10 but counts for Recall@12 and MAP; a tie rule other than
    trec_eval's (here: ids ascending, or the order the run lists them) would put "d1" first.
    """
    docs = ["d1", *(f"d{i}" for i in range(2, 12)), "z"]  # "d1" < "d10" < "d11" < "d2" < ... < "d9" < "z"
    qrels = {"q": {"d1": 1, "z": 2, "d10": 0}}
    run = {"q": dict.fromkeys(docs, 0.5)}
    result = compute_metrics(qrels, run, k_values=(1, 10, 12))
    assert_matches_pytrec(result, qrels, run, ks=(1, 10, 12))
    ideal = 2 + 1 / math.log2(3)
    assert result.per_query["q"] == pytest.approx(
        {"MRR@10": 1.0, "nDCG@1": 1.0, "nDCG@10": 2 / ideal, "nDCG@12": (2 + 1 / math.log2(13)) / ideal,
         "Recall@1": 0.5, "Recall@10": 0.5, "Recall@12": 1.0, "MAP": (1 + 2 / 12) / 2}, abs=1e-12
    )  # fmt: skip
    idx, scores = np.arange(12)[None, ::-1], np.full((1, 12), 0.5)  # as arrays, listed "z" … "d1"
    assert metrics_from_topk(qrels, ["q"], docs, idx, scores, k_values=(1, 10, 12)) == result
    for others, mrr in ((9, 0.1), (10, 0.0)):  # the first relevant document at rank 10, then at rank 11
        ranked = {"q": {**dict.fromkeys(docs[-others:], 0.5), "d1": 0.25}}
        assert compute_metrics({"q": {"d1": 1}}, ranked).per_query["q"]["MRR@10"] == mrr


# --- TREC run files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_trec_run_round_trip(tmp_path: Path, seed: int) -> None:
    qrels, _, docs = random_qrels_and_run(seed)
    qids = [f"q{i}" for i in range(5, 30)]
    idx, scores = random_topk(seed, docs, qids, depth=min(30, len(docs)))
    scores += np.float32(1e-3) * np.random.default_rng(seed).random(scores.shape, dtype=np.float32)  # long decimals
    path = write_trec_run(tmp_path / "run.trec", qids, docs, idx, scores, tag="bm25-x")
    with open(path) as f:
        run = pytrec_eval.parse_run(f)  # how trec_eval's users read it
    assert run == {
        q: {d: float(np.float32(s)) for d, s in v.items()} for q, v in run_from_topk(qids, docs, idx, scores).items()
    }
    assert compute_metrics(qrels, run, k_values=KS) == metrics_from_topk(qrels, qids, docs, idx, scores, k_values=KS)
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]  # no temp file left behind


def test_trec_run_lines_follow_trec_eval_order(tmp_path: Path) -> None:
    docs = ["d1", "d9", "d10"]
    path = write_trec_run(tmp_path / "r.trec", ["q"], docs, np.array([[0, 1, 2, -1]]), np.array([[0.5, 0.5, 0.7, 0.0]]))
    lines = [ln.split() for ln in path.read_text().splitlines()]
    assert [ln[2] for ln in lines] == ["d10", "d9", "d1"]
    assert [ln[3] for ln in lines] == ["1", "2", "3"]
    assert {(ln[1], ln[5]) for ln in lines} == {("Q0", "ddx")}


def test_write_trec_run_refuses_whitespace(tmp_path: Path) -> None:
    with pytest.raises(DdxError, match="without whitespace"):
        write_trec_run(tmp_path / "r", ["q 1"], ["d"], np.array([[0]]), np.array([[1.0]]))
    with pytest.raises(DdxError, match="without whitespace"):
        write_trec_run(tmp_path / "r", ["q"], ["d"], np.array([[0]]), np.array([[1.0]]), tag="")
    assert not list(tmp_path.iterdir())
