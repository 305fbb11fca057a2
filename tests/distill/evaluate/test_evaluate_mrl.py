"""``ddx evaluate`` of a ``--projection none`` run: its hybrid searches the teacher's first D dims renormalised, the
teacher mode the full vectors; no projected mode; a store with fewer dims than the run is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill.evaluate.evaluate import EvalConfig, evaluate_retrieval
from distill.model.teacher_dims import truncate_teacher
from storage.errors import DdxError, DimensionMismatchError
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.distill.conftest import STUDENT_DIM, Corpus, TrainedRun
from tests.storage.rows import make_spec

pytrec_eval = pytest.importorskip("pytrec_eval")

MEASURES = {"recall_10", "recall_100", "ndcg_cut_10", "map"}


def _config(run: str, store: Path, spec: str, tmp_path: Path, **overrides: object) -> EvalConfig:
    values: dict = dict(
        model=run,
        store=str(store),
        data=(spec,),
        split="test",
        out=str(tmp_path / "eval"),
        device="cpu",
        k_values=(10, 100),
        progress=False,
    )
    return EvalConfig(**(values | overrides))


def _direct_metrics(corpus: Corpus, queries: np.ndarray, passages: np.ndarray, test_q: list[str]) -> dict:
    """pytrec_eval over every passage, scored by numpy cosine."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    p = passages / np.linalg.norm(passages, axis=1, keepdims=True)
    pids = list(corpus.passages)
    scores = q @ p.T
    run = {qid: dict(zip(pids, map(float, row), strict=True)) for qid, row in zip(test_q, scores, strict=True)}
    qrels = {qid: {d: 1 for qq, d in corpus.qrels["test"] if qq == qid} for qid in test_q}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    return {m: float(np.mean([v[m] for v in per_query.values()])) for m in MEASURES}


def test_hybrid_searches_the_cut_teacher_vectors(
    mrl_phase2_run: TrainedRun, teacher_store: Path, corpus: Corpus, tmp_path: Path
) -> None:
    result = evaluate_retrieval(_config(mrl_phase2_run.out, teacher_store, corpus.spec, tmp_path))
    rows = {r["mode"]: r for r in result.rows}
    assert set(rows) == {"teacher", "student", "hybrid"}, "no projected mode without a projection"
    assert any(f"hybrid searches the teacher's first {STUDENT_DIM} dims" in n for n in result.notes)
    assert any("no projected mode" in n for n in result.notes)
    store = TeacherStore.open(teacher_store)
    test_q = sorted({q for q, _ in corpus.qrels["test"]})
    q_texts = [corpus.queries[q] for q in test_q]
    teacher_q = store.get(content_keys("query", q_texts), dtype="float32")
    teacher_p = store.get(content_keys("passage", list(corpus.passages.values())), dtype="float32")
    student_q = mrl_phase2_run.model.encode_student(q_texts).numpy()  # the saved model, not the evaluator's
    hybrid = _direct_metrics(corpus, student_q, truncate_teacher(teacher_p, STUDENT_DIM), test_q)
    teacher = _direct_metrics(corpus, teacher_q, teacher_p, test_q)
    for mode, expected in (("hybrid", hybrid), ("teacher", teacher)):
        assert rows[mode]["nDCG@10"] == pytest.approx(expected["ndcg_cut_10"], abs=1e-6), mode
        assert rows[mode]["MAP"] == pytest.approx(expected["map"], abs=1e-6), mode
        assert rows[mode]["Recall@100"] == pytest.approx(expected["recall_100"], abs=1e-6), mode
    cut_q = truncate_teacher(teacher_q, STUDENT_DIM)
    cos = (student_q / np.linalg.norm(student_q, axis=1, keepdims=True) * cut_q).sum(axis=1).mean()
    assert rows["hybrid"]["mean_cos_to_teacher"] == pytest.approx(float(cos), abs=1e-4)
    # The full vectors score differently: the cut is what the hybrid row measured, not an accident of the data.
    full = _direct_metrics(corpus, np.pad(student_q, ((0, 0), (0, 16))), teacher_p, test_q)
    assert (full["ndcg_cut_10"], full["map"]) != (hybrid["ndcg_cut_10"], hybrid["map"])


def test_projected_alone_cannot_run(mrl_phase1_run: TrainedRun, teacher_store: Path, corpus: Corpus, tmp_path: Path):
    with pytest.raises(DdxError, match=r"projected: one with a projection, not --projection none"):
        evaluate_retrieval(_config(mrl_phase1_run.out, teacher_store, corpus.spec, tmp_path, modes=("projected",)))


def test_store_with_fewer_dims_than_the_run_is_refused(mrl_phase1_run: TrainedRun, corpus: Corpus, tmp_path: Path):
    small = tmp_path / "store-16d"
    TeacherStore.create(small, make_spec(16))
    with pytest.raises(
        DimensionMismatchError,
        match=rf"trained into the teacher's first {STUDENT_DIM} dims.*holds 16-d vectors.*--teacher-dims <= 16",
    ):
        evaluate_retrieval(_config(mrl_phase1_run.out, small, corpus.spec, tmp_path))
