"""``ddx train --projection none``: the student distilled into the teacher's first D dims, without a projection.

Phase 1 and phase 2 (the cached GradCache step) train and their losses fall; the run folder records the mode and D
and reloads as it was saved; bad combinations stop before the student loads, with the flag and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import pytest
import torch

from distill.model.model import HYBRID_DIR, StudentModelWithProjection
from distill.model.no_projection import NoProjection
from distill.model.projection import PROJECTION_FILE
from distill.model.run_file import RUN_FILE
from distill.train.losses import Phase2Loss
from distill.train.run import train
from distill.train.trainer import DistillModule
from storage.errors import DdxError, DimensionMismatchError
from storage.store import TeacherStore
from tests.distill.conftest import STUDENT_DIM, TEACHER_DIM, Corpus, TrainedRun, log_losses
from tests.distill.train.test_cached_loss import make_batch, no_dropout, step_grads


def test_phase1_trains_the_student_into_the_first_dims(mrl_phase1_run: TrainedRun, corpus: Corpus) -> None:
    losses = log_losses(mrl_phase1_run.out)
    first, last = mean(losses[:4]), mean(losses[-4:])
    assert last < 0.6 * first, f"phase-1 loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    report = mrl_phase1_run.result.report
    assert report["warm_start"] == "skipped: --projection none has no projection to fit"
    assert report["teacher_dims"] == STUDENT_DIM
    run = json.loads(Path(mrl_phase1_run.out, RUN_FILE).read_text())
    assert run["projection"] == run["config"]["projection"] == "none" and run["teacher_dims"] == STUDENT_DIM
    payload = torch.load(Path(mrl_phase1_run.out, PROJECTION_FILE), weights_only=True)
    assert payload["kind"] == "none" and payload["teacher_dims"] == STUDENT_DIM
    # The run reloads as saved; hybrid/ is the student (normalised), a plain SentenceTransformer.
    from sentence_transformers import SentenceTransformer

    texts = [*list(corpus.queries.values())[:3], *list(corpus.passages.values())[:4]]
    loaded = StudentModelWithProjection.load(mrl_phase1_run.out, device="cpu")
    assert isinstance(loaded.projection, NoProjection) and loaded.teacher_dims == STUDENT_DIM
    want = mrl_phase1_run.model.encode_student(texts).numpy()
    np.testing.assert_allclose(loaded.encode_projected(texts).numpy(), want, atol=1e-5)
    hybrid = SentenceTransformer(str(Path(mrl_phase1_run.out, HYBRID_DIR)), device="cpu")
    np.testing.assert_allclose(hybrid.encode(texts), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_phase1_moves_the_student_toward_the_cut_teacher_vectors(
    mrl_phase1_run: TrainedRun, teacher_store: Path, corpus: Corpus, tiny_bert: Path
) -> None:
    """Trained against the teacher's first 32 dims renormalised, the student's own vectors end closer to them."""
    from sentence_transformers import SentenceTransformer

    from distill.model.teacher_dims import truncate_teacher
    from storage.keys import content_keys

    texts = list(corpus.passages.values())[:40]
    target = truncate_teacher(TeacherStore.open(teacher_store).get(content_keys("passage", texts)), STUDENT_DIM)

    def mean_cos(vectors: np.ndarray) -> float:
        return float((vectors / np.linalg.norm(vectors, axis=1, keepdims=True) * target).sum(axis=1).mean())

    before = mean_cos(SentenceTransformer(str(tiny_bert), device="cpu").encode(texts))
    after = mean_cos(mrl_phase1_run.model.encode_student(texts).numpy())
    assert after > before + 0.2, f"mean cosine to the cut teacher vectors: {before:.3f} untrained, {after:.3f} trained"


def test_phase2_cached_step_trains_without_a_projection(mrl_phase2_run: TrainedRun) -> None:
    losses = log_losses(mrl_phase2_run.out)
    first, last = mean(losses[:4]), mean(losses[-4:])
    assert last < 0.7 * first, f"phase-2 loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    records = [json.loads(line) for line in Path(mrl_phase2_run.out, "train_log.jsonl").read_text().splitlines()]
    assert {"loss_infonce_projected", "loss_infonce_hybrid", "loss_mse"} <= set(records[0])
    run = json.loads(Path(mrl_phase2_run.out, RUN_FILE).read_text())
    assert run["config"]["mini_batch_size"] == 4 and run["config"]["teacher_dims"] is None
    assert run["teacher_dims"] == STUDENT_DIM, "D comes from the --init run"


def test_cached_gradients_equal_plain_without_a_projection(tiny_bert: Path) -> None:
    """``projected`` is the student tensor itself: the cached step's backward through both keys sums their gradients,
    as the plain step's autograd does."""
    torch.manual_seed(0)
    model = StudentModelWithProjection.from_pretrained(str(tiny_bert), TEACHER_DIM, device="cpu", projection="none")
    model = no_dropout(model).to(torch.float64).train()
    batch = make_batch(model, [2, 0, 3, 1])
    g = torch.Generator().manual_seed(1)
    for key in ("teacher_query", "teacher_pos", "teacher_neg"):  # D = the student's 32 dims, not make_batch's 16
        shape = (*batch[key].shape[:-1], STUDENT_DIM)
        batch[key] = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    batch["teacher_neg"] *= batch["neg_mask"][..., None]
    module = DistillModule(model, Phase2Loss(space="projected+hybrid+student", mse_reduction="vector"), 2)
    plain_loss, plain = step_grads(module, batch, None)
    cached_loss, cached = step_grads(module, batch, 2)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-12)
    assert sorted(cached) == sorted(plain) and not any(n.startswith("model.projection.") for n in plain)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def test_bad_projection_options_are_one_clear_error(config: Any) -> None:
    with pytest.raises(DdxError, match=r"--teacher-dims 16 applies to --projection none.*Add --projection none"):
        config(teacher_dims=16)
    with pytest.raises(DdxError, match=r"--teacher-dims must be a whole number >= 1, got 0"):
        config(projection="none", teacher_dims=0)
    with pytest.raises(DdxError, match=r"--projection-hidden sizes the projection MLP, and --projection none has none"):
        config(projection="none", projection_hidden=64)
    with pytest.raises(DdxError, match=r"projection must be 'mlp' or 'none', got 'linear'"):
        config(projection="linear")


def test_teacher_dims_beyond_the_store_stop_before_the_student_loads(
    config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the student loaded before the dims were checked")

    monkeypatch.setattr(StudentModelWithProjection, "from_pretrained", no_weights)
    with pytest.raises(
        DimensionMismatchError, match=rf"--teacher-dims 64 is more than the teacher's {TEACHER_DIM} dims.*<= 48"
    ):
        train(config(projection="none", teacher_dims=64))


def test_teacher_dims_other_than_the_students_are_refused(config: Any) -> None:
    with pytest.raises(
        DimensionMismatchError, match=r"--teacher-dims 16 does not match the student's 32-d.*D must be 32"
    ):
        train(config(projection="none", teacher_dims=16))


def test_init_of_the_other_projection_is_refused(
    config: Any, mrl_phase1_run: TrainedRun, teacher_store: Path, tmp_path: Path
) -> None:
    with pytest.raises(DdxError, match=r"trained with --projection none --teacher-dims 32.*pass --projection none"):
        train(config(phase=2, student=None, init=mrl_phase1_run.out))
    with pytest.raises(DimensionMismatchError, match=r"--teacher-dims 16 does not match --init .*first 32 dims"):
        train(config(phase=2, student=None, init=mrl_phase1_run.out, projection="none", teacher_dims=16))
    mlp_run = tmp_path / "mlp-run"  # what check_run_store and the mode check read: no weights needed to refuse it
    mlp_run.mkdir()
    store = TeacherStore.open(teacher_store)
    run = {"store_fingerprint": store.fingerprint, "config": {"projection": "mlp"}, "teacher_dims": None}
    (mlp_run / RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(DdxError, match=r"has a projection.*Start from its student instead: --student '.*student_base'"):
        train(config(phase=2, student=None, init=str(mlp_run), projection="none"))
