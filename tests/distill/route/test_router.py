"""Router fit: difficulty targets equal a direct computation, a router learns a known difficulty, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distill.route.fit import RouterConfig, fit_router, fit_targets
from distill.route.router import Router, lift_over_random, threshold_for_usage, train_router_model
from distill.route.targets import rank_outcomes
from precompute.sources.errors import BadSourceError
from storage.errors import DdxError, MissingVectorsError
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.distill.conftest import TRAIN_QUERIES, Corpus, copy_store

TAU = 0.05


def _config(run: str, store: Path, corpus: Corpus, tmp_path: Path, **overrides: object) -> RouterConfig:
    values: dict = dict(
        store=str(store),
        model=run,
        data=(corpus.spec,),
        out=str(tmp_path / "router"),
        pool_size=40,
        mine_negatives=2,
        mine_margin=0.999,
        epochs=20,
        device="cpu",
        progress=False,
    )
    values.update(overrides)
    return RouterConfig(**values)


def _direct(query: np.ndarray, cand_rows: np.ndarray, pos_rows: np.ndarray, store: TeacherStore) -> tuple:
    """nDCG@10, RR@10 and log p(positives) of one query over its whole candidate list, by plain numpy."""
    vecs = store.get_rows(cand_rows, dtype="float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    scores = (vecs @ q).astype(np.float32)
    order = np.lexsort((cand_rows, -scores.astype(np.float64)))
    rel = np.isin(cand_rows[order], pos_rows)[:10].astype(float)
    disc = 1 / np.log2(np.arange(2, 12))
    ndcg = (rel * disc[: len(rel)]).sum() / disc[: min(len(pos_rows), 10)].sum()
    rr = 1 / (np.argmax(rel) + 1) if rel.any() else 0.0
    logits = scores.astype(np.float64) / TAU
    logp = np.logaddexp.reduce(logits[np.isin(cand_rows, pos_rows)]) - np.logaddexp.reduce(logits)
    return ndcg, rr, logp


def test_targets_from_the_store_equal_a_direct_computation(phase1_run, teacher_store, corpus, tmp_path):
    """Hybrid (projected student) and teacher (stored query) rankings of pool ∪ own candidates, recomputed by hand."""
    store = TeacherStore.open(teacher_store)
    config = _config(phase1_run.out, teacher_store, corpus, tmp_path)
    t = fit_targets(config, store)
    assert len(t.gains) == TRAIN_QUERIES and len(t.pool) == 40
    all_texts = list(corpus.queries.values())
    by_key = dict(zip(content_keys("query", all_texts), all_texts, strict=True))
    texts = [by_key[k] for k in t.query_keys]
    hybrid_q = phase1_run.model.encode_projected(texts).numpy()  # an independent path: the model, not Encoders
    teacher_q = store.get(content_keys("query", texts), dtype="float32")
    for i in range(len(texts)):
        cand = np.union1d(t.pool, np.union1d(t.positives.row(i), t.negatives.row(i)))
        for outcome, q in ((t.hybrid, hybrid_q[i]), (t.teacher, teacher_q[i])):
            ndcg, rr, logp = _direct(q, cand, t.positives.row(i), store)
            assert outcome.ndcg10[i] == pytest.approx(ndcg, abs=1e-6)
            assert outcome.rr10[i] == pytest.approx(rr, abs=1e-6)
            assert outcome.logp[i] == pytest.approx(logp, abs=1e-3)
    assert np.allclose(t.gains, t.teacher.ndcg10 - t.hybrid.ndcg10)
    # The same rankings with tiny pool and query blocks (merging across blocks, masks in every block).
    again = rank_outcomes([hybrid_q, teacher_q], t.pool, t.positives, t.negatives, store, block_rows=7)
    for mine, other in zip((t.hybrid, t.teacher), again, strict=True):
        assert np.allclose(mine.ndcg10, other.ndcg10) and np.allclose(mine.logp, other.logp, atol=1e-4)
        assert np.allclose(mine.top_scores, other.top_scores, atol=1e-5)


def test_router_beats_random_where_difficulty_is_a_known_function_of_the_query():
    """Gain = 1 for queries on one side of a hyperplane (plus 10 % label noise): a router must find that side."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=24)

    def task(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 24)).astype(np.float32)
        gain = (x @ w > 1.5).astype(float)  # ~25 % of queries gain
        flip = rng.random(n) < 0.1
        return x, np.where(flip, 1 - gain, gain) * rng.uniform(0.3, 1.0, n)

    x, y = task(2000)
    from distill.route.router import MLPSettings

    model, report = train_router_model(x, y, MLPSettings(epochs=60, hidden=64, seed=1))
    x_test, y_test = task(1000)
    scores = model.score(x_test)
    lift, bayes = lift_over_random(scores, y_test), lift_over_random(x_test @ w, y_test)  # bayes: knows w
    assert lift > 0.5 and lift >= 0.9 * bayes, (lift, bayes)  # the noise caps even the ideal ranking near 0.58
    top = np.argsort(-scores)[:200]  # at a 20 % budget
    assert y_test[top].sum() > 2 * 200 * y_test.mean()  # twice what random routing collects
    assert report["best_epoch"] >= 1 and report["selection"] == "5-fold"


def test_large_fit_sets_choose_the_epoch_on_one_held_out_split(monkeypatch):
    import distill.route.router
    from distill.route.router import MLPSettings

    monkeypatch.setattr(distill.route.router, "CV_BELOW", 100)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x[:, 0] > 1.0).astype(float)
    settings = MLPSettings(epochs=100, hidden=16, patience=30, lr=3e-3, batch_size=64)
    model, report = train_router_model(x, y, settings)
    assert report["selection"] == "held-out" and report["val_queries"] == 40 and report["val_lift"] > 0.9
    assert lift_over_random(model.score(x), y) > 0.9  # the best epoch's weights are the ones kept


def test_fit_writes_a_router_with_its_fingerprints(phase1_run, teacher_store, corpus, tmp_path):
    from distill.route.router import student_identity

    result = fit_router(_config(phase1_run.out, teacher_store, corpus, tmp_path))
    router = Router.load(result.out)
    store = TeacherStore.open(teacher_store)
    assert set(router.models) == {"encoder", "retrieval"} and result.queries == TRAIN_QUERIES
    assert router.meta["store_fingerprint"] == store.fingerprint
    assert router.meta["student_id"] == student_identity(phase1_run.out)
    assert router.meta["teacher_spec"] == store.spec.to_dict()
    assert json.loads((Path(result.out) / "router.json").read_text())["target"] == "ndcg10"
    assert np.all(np.diff(router.calibration["encoder"]) >= 0) and len(router.calibration["encoder"]) == TRAIN_QUERIES
    assert {"hybrid_ndcg10", "teacher_ndcg10", "gain_positive", "encoder", "retrieval"} <= set(result.report)
    router.check(store_fingerprint=store.fingerprint, student_id=student_identity(phase1_run.out), where="r")


def test_threshold_from_a_usage_and_budgets_outside_zero_one():
    cal = np.arange(10.0)
    assert threshold_for_usage(cal, 0.2) == 7.0 and (cal > 7.0).sum() == 2
    assert threshold_for_usage(cal, 0.0) == float("inf") and threshold_for_usage(cal, 1.0) == float("-inf")
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(DdxError, match=r"Teacher usage must be a fraction in \[0, 1\]"):
            threshold_for_usage(cal, bad)


def test_fit_queries_without_positives_are_refused(phase1_run, teacher_store, corpus, tmp_path):
    folder = tmp_path / "beir"
    shutil.copytree(corpus.folder, folder)
    with open(folder / "qrels" / "train.tsv", "a", newline="") as f:
        f.write("q31\tno-such-doc\t1\r\n")  # a query whose only positive is no passage of the corpus
    with pytest.raises(BadSourceError, match=r"1 queries without a known positive"):
        fit_router(_config(phase1_run.out, teacher_store, corpus, tmp_path, data=(f"beir:{folder}",)))


def test_store_lacking_fit_vectors_names_the_precompute_command(phase1_run, teacher_store, corpus, tmp_path):
    folder = tmp_path / "beir"
    shutil.copytree(corpus.folder, folder)
    with open(folder / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q99", "text": "a query the teacher never saw"}) + "\n")
    with open(folder / "qrels" / "train.tsv", "a", newline="") as f:
        f.write("q99\td1\t1\r\n")
    store = copy_store(teacher_store, tmp_path / "store")
    with pytest.raises(MissingVectorsError, match=r"have no teacher vector(.|\n)*ddx precompute-teacher --teacher"):
        fit_router(_config(phase1_run.out, store, corpus, tmp_path, data=(f"beir:{folder}",)))


def test_bad_config_is_one_clear_error(phase1_run, teacher_store, corpus, tmp_path):
    with pytest.raises(DdxError, match="target must be one of"):
        _config(phase1_run.out, teacher_store, corpus, tmp_path, target="mrr")
    with pytest.raises(DdxError, match="kinds must be among"):
        _config(phase1_run.out, teacher_store, corpus, tmp_path, kinds=("oracle",))
