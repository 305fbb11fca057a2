"""The router on a ``--projection none`` run: targets rank the hybrid's student query against the teacher passages'
first D dims renormalised (as evaluation's hybrid searches), the teacher's query against the full vectors; the
routing curve runs; the routed export, one vector per query for one index, is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill.evaluate.evaluate import EvalConfig
from distill.model.teacher_dims import truncate_teacher
from distill.route.curve import evaluate_routed
from distill.route.fit import fit_router, fit_targets
from distill.route.routed_model import RouterExportConfig, export_routed
from storage.errors import DdxError
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.distill.conftest import STUDENT_DIM, Corpus, TrainedRun
from tests.distill.route.test_router import _config


def _ndcg10(query: np.ndarray, cand_rows: np.ndarray, pos_rows: np.ndarray, vecs: np.ndarray) -> float:
    """nDCG@10 of one query over its candidates, by plain numpy (``vecs``: the candidates' unit rows)."""
    scores = (vecs @ (query / np.linalg.norm(query))).astype(np.float32)
    order = np.lexsort((cand_rows, -scores.astype(np.float64)))
    rel = np.isin(cand_rows[order], pos_rows)[:10].astype(float)
    disc = 1 / np.log2(np.arange(2, 12))
    return float((rel * disc[: len(rel)]).sum() / disc[: min(len(pos_rows), 10)].sum())


def test_targets_rank_the_hybrid_against_the_cut_passages(
    mrl_phase1_run: TrainedRun, teacher_store: Path, corpus: Corpus, tmp_path: Path
) -> None:
    store = TeacherStore.open(teacher_store)
    t = fit_targets(_config(mrl_phase1_run.out, teacher_store, corpus, tmp_path), store)
    by_key = dict(zip(content_keys("query", list(corpus.queries.values())), corpus.queries.values(), strict=True))
    texts = [by_key[k] for k in t.query_keys]
    student_q = mrl_phase1_run.model.encode_student(texts).numpy()
    teacher_q = store.get(content_keys("query", texts), dtype="float32")
    for i in range(len(texts)):
        cand = np.union1d(t.pool, np.union1d(t.positives.row(i), t.negatives.row(i)))
        raw = store.get_rows(cand, dtype="float32")
        full = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        cut = truncate_teacher(raw, STUDENT_DIM)
        assert t.hybrid.ndcg10[i] == pytest.approx(_ndcg10(student_q[i], cand, t.positives.row(i), cut), abs=1e-6)
        assert t.teacher.ndcg10[i] == pytest.approx(_ndcg10(teacher_q[i], cand, t.positives.row(i), full), abs=1e-6)


def test_fit_curve_and_the_refused_export(
    mrl_phase1_run: TrainedRun, teacher_store: Path, corpus: Corpus, tiny_qwen2: Path, tmp_path: Path
) -> None:
    fitted = fit_router(_config(mrl_phase1_run.out, teacher_store, corpus, tmp_path, kinds=("encoder",)))
    config = EvalConfig(
        model=mrl_phase1_run.out,
        store=str(teacher_store),
        data=(corpus.spec,),
        out=str(tmp_path / "eval"),
        device="cpu",
        k_values=(10,),
        progress=False,
    )
    result = evaluate_routed(config, fitted.out)
    rows = {r["mode"]: r for r in result.rows}
    assert rows["oracle@0%"]["nDCG@10"] == pytest.approx(rows["hybrid"]["nDCG@10"])
    assert rows["oracle@100%"]["nDCG@10"] == pytest.approx(rows["teacher"]["nDCG@10"])
    with pytest.raises(DdxError, match=r"trained with --projection none.*Export a --projection mlp run"):
        export_routed(RouterExportConfig(router=fitted.out, teacher=str(tiny_qwen2), out=str(tmp_path / "routed")))
