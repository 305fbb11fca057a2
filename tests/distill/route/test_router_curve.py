"""The routing curve: exact mixtures of the teacher and hybrid runs, oracle and random, files, refusals."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distill.evaluate.evaluate import EvalConfig, EvalResult
from distill.route.curve import BUDGETS, curve_values, evaluate_routed
from storage.errors import DdxError, FingerprintMismatchError
from tests.distill.conftest import fit_tiny_router


@pytest.fixture(scope="module")
def router_dir(phase1_run, teacher_store, corpus, tmp_path_factory) -> str:
    return fit_tiny_router(phase1_run, teacher_store, corpus, tmp_path_factory)


def _eval(run: str, store: Path, spec: str, tmp_path: Path, routed: str, **overrides: object) -> EvalResult:
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
    values.update(overrides)
    return evaluate_routed(EvalConfig(**values), routed)


@pytest.mark.parametrize("seed", range(5))
def test_oracle_curve_is_bounded_by_hybrid_and_teacher_ends_and_dominates_any_order(seed):
    rng = np.random.default_rng(seed)
    n = 40
    hybrid = rng.integers(0, 3, n) / 2.0
    teacher = np.clip(hybrid + rng.choice([-0.5, 0.0, 0.5], n, p=[0.2, 0.4, 0.4]), 0, 1)
    gains = teacher - hybrid
    oracle = curve_values(hybrid, teacher, np.argsort(-gains, kind="stable"))
    assert oracle[0] == pytest.approx(hybrid.mean()) and oracle[-1] == pytest.approx(teacher.mean())
    rising, falling = int((gains > 0).sum()), int((gains >= 0).sum())
    assert np.all(np.diff(oracle[: rising + 1]) > 0)  # monotone while it buys gains...
    assert np.all(np.diff(oracle[rising : falling + 1]) == 0) and np.all(np.diff(oracle[falling:]) < 0)
    for _ in range(20):  # ...and no other order beats it at any budget
        assert np.all(oracle >= curve_values(hybrid, teacher, rng.permutation(n)) - 1e-12)
    never_worse = np.maximum(teacher, hybrid)  # the teacher wins or ties everywhere: monotone all the way
    assert np.all(np.diff(curve_values(hybrid, never_worse, np.argsort(hybrid - never_worse, kind="stable"))) >= 0)


def test_routed_evaluation_mixes_the_teacher_and_hybrid_runs_exactly(
    phase1_run, teacher_store, corpus, router_dir, tmp_path
):
    result = _eval(phase1_run.out, teacher_store, corpus.spec, tmp_path, router_dir)
    modes = {r["mode"]: r for r in result.rows if "router" not in r}
    routed = [r for r in result.rows if "router" in r]
    assert {r["router"] for r in routed} == {"encoder", "retrieval", "oracle", "random"}
    assert sorted({r["budget"] for r in routed}) == list(BUDGETS)
    metrics = ("MRR@10", "nDCG@10", "Recall@10", "Recall@100", "MAP")
    for row in routed:
        if row["budget"] in (0.0, 1.0):  # every curve starts at the hybrid and ends at the teacher
            ends = modes["hybrid" if row["budget"] == 0 else "teacher"]
            assert all(row[m] == pytest.approx(ends[m], abs=1e-12) for m in metrics)
        if row["router"] == "random":  # the exact expectation over random choices of that many queries
            u = row["teacher_usage"]
            expect = (1 - u) * modes["hybrid"]["nDCG@10"] + u * modes["teacher"]["nDCG@10"]
            assert row["nDCG@10"] == pytest.approx(expect, abs=1e-9)
    for b in BUDGETS:
        at = {r["router"]: r for r in routed if r["budget"] == b}
        assert all(at["oracle"]["nDCG@10"] >= r["nDCG@10"] - 1e-12 for r in at.values())
        assert at["oracle"]["teacher_usage"] == pytest.approx(np.floor(b * 10 + 0.5) / 10)  # half rounds up
    assert modes["teacher"]["retained_nDCG@10"] == 100.0 and "retained_nDCG@10" in routed[0]
    curve_json, png = Path(tmp_path / "eval" / "routing-curve-test.json"), tmp_path / "eval" / "routing-curve-test.png"
    assert str(curve_json) in result.files and str(png) in result.files
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(curve_json.read_text())["curves"][0]
    assert len(record["curves"]["oracle"]["ndcg10_by_usage"]) == 11  # 10 test queries: every usage 0..10
    assert record["teacher"]["nDCG@10"] == pytest.approx(modes["teacher"]["nDCG@10"])
    assert result.to_dict()["routing_curves"][0]["queries"] == 10


def test_png_is_optional_with_a_clear_note(phase1_run, teacher_store, corpus, router_dir, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = _eval(phase1_run.out, teacher_store, corpus.spec, tmp_path, router_dir)
    assert not any(f.endswith(".png") for f in result.files)
    assert any("matplotlib is not installed (pip install 'ddx[plot]')" in n for n in result.notes)


def test_router_of_another_store_or_student_is_refused(phase1_run, teacher_store, corpus, router_dir, tmp_path):
    other = tmp_path / "other-router"
    shutil.copytree(router_dir, other)
    meta = json.loads((other / "router.json").read_text())
    (other / "router.json").write_text(json.dumps({**meta, "store_fingerprint": "0" * 32}))
    with pytest.raises(FingerprintMismatchError, match="was fitted on a store of teacher fingerprint 0000"):
        _eval(phase1_run.out, teacher_store, corpus.spec, tmp_path, str(other))
    run = tmp_path / "retrained"
    shutil.copytree(phase1_run.out, run)
    from distill.model.projection import ProjectionLayer

    layer = ProjectionLayer.load(run)
    with __import__("torch").no_grad():
        next(layer.parameters()).add_(0.01)
    layer.save(run)  # the same folder, another projection: another student
    with pytest.raises(FingerprintMismatchError, match="was fitted with another student"):
        _eval(str(run), teacher_store, corpus.spec, tmp_path, router_dir)


def test_routed_needs_the_teacher_and_hybrid_modes(phase1_run, teacher_store, corpus, router_dir, tmp_path):
    with pytest.raises(DdxError, match="keep both in --modes"):
        _eval(phase1_run.out, teacher_store, corpus.spec, tmp_path, router_dir, modes=("student", "hybrid"))
