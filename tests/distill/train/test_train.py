"""End-to-end training on the fixture store: losses fall, outputs reload, and the teacher never runs."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest
import torch
import torch.nn.functional as F

from distill.model.model import HYBRID_DIR, STUDENT_DIR
from distill.model.projection import ProjectionLayer
from storage.store import TeacherStore
from tests.distill.conftest import (
    N_PASSAGES,
    N_QUERIES,
    STUDENT_DIM,
    TEACHER_DIM,
    TRAIN_QUERIES,
    Corpus,
    TeacherCalled,
    TrainedRun,
    forbid_teacher,
    log_losses,
)


def _texts(corpus: Corpus) -> list[str]:
    return [*list(corpus.queries.values())[:6], *list(corpus.passages.values())[:10]]


def test_phase1_loss_falls(phase1_run: TrainedRun) -> None:
    losses = log_losses(phase1_run.out)
    assert len(losses) == 24, "logging_steps=1: one record per step"
    first, last = mean(losses[:4]), mean(losses[-4:])
    assert last < 0.6 * first, f"phase-1 loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    assert phase1_run.result.first_loss == losses[0] and phase1_run.result.final_loss == losses[-1]


def test_phase2_loss_falls(phase2_run: TrainedRun) -> None:
    losses = log_losses(phase2_run.out)
    assert len(losses) == 24
    first, last = mean(losses[:4]), mean(losses[-4:])
    assert last < 0.75 * first, f"phase-2 loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    records = [json.loads(line) for line in Path(phase2_run.out, "train_log.jsonl").read_text().splitlines()]
    parts = records[0]
    assert {"loss_infonce", "loss_mse"} <= set(parts), "phase 2 logs its loss components"
    report = phase2_run.result.report
    assert report["examples"] == TRAIN_QUERIES
    assert report["mined"]["queries"] == TRAIN_QUERIES and report["mined"]["mined"] > 0


def test_run_draws_its_loss_parts(phase2_run: TrainedRun, tmp_path: Path) -> None:
    """train_loss.png beside train_log.jsonl: a real PNG with the total and every part; without matplotlib a note."""
    from distill.train.loss_plot import loss_series, write_loss_plot

    png = Path(phase2_run.out, "train_loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and phase2_run.result.report["loss_plot"] == str(png)
    series = loss_series(Path(phase2_run.out, "train_log.jsonl"))
    assert {"loss", "loss_infonce", "loss_mse"} <= set(series) and len(series["loss"][0]) == 24
    log = tmp_path / "train_log.jsonl"
    lines = ['{"step": 2, "loss": 2.0}', '{"step": 1, "loss": 3.0, "loss_mse": 1.0}', '{"step": 2, "loss": 1.5}']
    lines.append('{"st')  # cut by a crash
    log.write_text("\n".join(lines))
    assert loss_series(log) == {"loss": ([1, 2], [3.0, 1.5]), "loss_mse": ([1], [1.0])}  # resumed step: last wins
    assert "holds no logged loss" in (write_loss_plot(tmp_path / "none.jsonl", tmp_path / "x.png") or "")


def test_student_base_reloads_as_plain_sentence_transformer(
    phase1_run: TrainedRun, corpus: Corpus, tiny_bert: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = _texts(corpus)
    trained = phase1_run.model.encode_student(texts)
    reloaded = SentenceTransformer(str(Path(phase1_run.out) / STUDENT_DIR), device="cpu")
    got = torch.from_numpy(reloaded.encode(texts, convert_to_numpy=True))
    assert got.shape == (len(texts), STUDENT_DIM)
    torch.testing.assert_close(got, trained, rtol=0, atol=1e-6)
    original = torch.from_numpy(SentenceTransformer(str(tiny_bert), device="cpu").encode(texts))
    assert (original - got).abs().max() > 1e-3, "training must have changed the student (else this test is vacuous)"


def test_projection_and_hybrid_reproduce_projected(phase1_run: TrainedRun, corpus: Corpus) -> None:
    from sentence_transformers import SentenceTransformer

    texts = _texts(corpus)
    projected = phase1_run.model.encode_projected(texts)
    projection = ProjectionLayer.load(phase1_run.out).eval()
    assert (projection.student_dim, projection.hidden_dim, projection.teacher_dim) == (STUDENT_DIM, 64, TEACHER_DIM)
    with torch.no_grad():
        again = projection(phase1_run.model.encode_student(texts))
    torch.testing.assert_close(again, projected, rtol=0, atol=1e-6)

    hybrid = SentenceTransformer(str(Path(phase1_run.out) / HYBRID_DIR), device="cpu")
    got = torch.from_numpy(hybrid.encode(texts, convert_to_numpy=True))
    # The teacher (tiny Qwen2 + Normalize) emits unit vectors, so the hybrid model normalizes too.
    torch.testing.assert_close(got, F.normalize(projected, dim=-1), rtol=0, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)


def test_run_file_records_store_and_result(
    phase1_run: TrainedRun, teacher_store: Path, tiny_qwen2: Path, token_cache: Path
) -> None:
    run = json.loads((Path(phase1_run.out) / "ddx_run.json").read_text())
    store = TeacherStore.open(teacher_store)
    assert run["store_fingerprint"] == store.fingerprint
    assert run["teacher_spec"]["model"] == str(tiny_qwen2) and run["teacher_spec"]["dim"] == TEACHER_DIM
    assert run["phase"] == 1 and run["config"]["max_steps"] == 24
    assert run["result"]["steps"] == 24
    # Phase 1 trains on every text except the test-only queries (no test leakage).
    held_out = N_QUERIES - TRAIN_QUERIES
    assert run["result"]["report"]["texts"] == N_PASSAGES + TRAIN_QUERIES
    assert run["result"]["report"]["held_out_queries"] == held_out
    assert (token_cache / "tokens" / run["token_table"]).is_dir()


def test_training_never_calls_the_teacher(config, phase1_run: TrainedRun, tiny_qwen2: Path, tmp_path: Path) -> None:
    from distill.train.run import train

    with forbid_teacher(tiny_qwen2) as calls:
        p1 = train(config(phase=1, out=str(tmp_path / "p1"), max_steps=3))
        p2 = train(
            config(
                phase=2,
                init=phase1_run.out,
                student=None,
                out=str(tmp_path / "p2"),
                max_steps=3,
                mine_negatives=2,
                mine_margin=0.999,
            )  # a random teacher scores everything alike: loosen the false-negative rule
        )
    assert calls == []
    assert p1.steps == 3 and p2.steps == 3 and p2.report["mined"]["mined"] > 0


def test_teacher_guard_catches_a_real_teacher_call(
    tiny_qwen2: Path, tiny_bert: Path, corpus: Corpus, tmp_path: Path
) -> None:
    """The guard above is only evidence if it fires on a teacher call: run the one code path that does call the
    teacher (precompute, on texts the new store lacks) under the same guard and watch it trip. Without this, a
    guard patched in the wrong place (say, a name imported before patching) would pass vacuously."""
    from sentence_transformers import SentenceTransformer

    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig, load_teacher

    config = PrecomputeConfig(
        store=str(tmp_path / "store"),
        data=(corpus.spec,),
        teacher=TeacherConfig(model=str(tiny_qwen2), device="cpu"),
        progress=False,
    )
    with forbid_teacher(tiny_qwen2) as calls:
        with pytest.raises(TeacherCalled, match="load_teacher"):
            precompute(config)
        with pytest.raises(TeacherCalled, match="SentenceTransformer"):
            SentenceTransformer(str(tiny_qwen2), device="cpu")
    assert calls == ["load_teacher", f"SentenceTransformer({str(tiny_qwen2)!r})"]
    # An already-loaded teacher (loaded outside the guard) cannot encode inside it, even bypassing every entry
    # point by name: the Qwen2 forward itself is a tripwire.
    encoder = load_teacher(config.teacher)
    with forbid_teacher(tiny_qwen2) as calls:
        with pytest.raises(TeacherCalled, match=r"TeacherEncoder\.encode"):
            encoder.encode(["a text"], "passage")
        with pytest.raises(TeacherCalled, match=r"SentenceTransformer\.encode of the teacher"):
            encoder.model.encode(["a text"])
        with pytest.raises(TeacherCalled, match=r"Qwen2Model\.forward"):
            encoder.model(encoder.model.preprocess(["a text"]))
        # The student may encode (sentence-transformers' save does, for its model card): not a teacher call.
        assert SentenceTransformer(str(tiny_bert), device="cpu").encode(["a text"]).shape == (1, 32)
    assert calls == ["TeacherEncoder.encode", "SentenceTransformer.encode of the teacher", "Qwen2Model.forward"]
