"""Interrupt and resume: a run stopped right after a checkpoint and resumed ends bit-identical to one never stopped.

30 training examples in batches of 8 make 4 batches an epoch, so with ``max_steps=10`` epochs are steps 1–4, 5–8
and 9–10. Stopping after step 6 resumes in the middle of the second epoch (the Trainer skips 2 batches of an epoch
whose order depends on the epoch); stopping after step 8 resumes exactly at the start of the third. Resume is exact
only if all three hold: the skipped batches are the ones already trained on (the sampler and ``Phase2Dataset`` see
the resumed epoch), the dropout RNG continues from where it stopped (the checkpoint's RNG state), and optimizer and
scheduler state come back. The two control tests break the first two on purpose and show that the comparison
notices, so the equality is evidence, not an accident of a test that cannot fail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.model.model import StudentModelWithProjection
from distill.train.checkpoints import MANIFEST, ManifestCallback
from distill.train.run import train
from distill.train.sampling import DistillBatchSampler
from distill.train.trainer import DistillTrainer
from storage.errors import DdxError

MAX_STEPS = 10


class Interrupted(Exception):
    """A crash right after a checkpoint was written."""


def _weights(out: str | Path) -> dict[str, torch.Tensor]:
    """Student and projection weights as saved in the run folder."""
    state = StudentModelWithProjection.load(out, device="cpu").state_dict()
    assert any(k.startswith("projection.") for k in state) and any(k.startswith("student.") for k in state)
    return state


def _step_losses(out: str | Path) -> dict[int, float]:
    records = [json.loads(line) for line in Path(out, "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _interrupted_then_resumed(
    make: Callable[..., Any], out: Path, stop_at: int, during_resume: Callable[[pytest.MonkeyPatch], None] | None = None
) -> Any:
    original = DistillTrainer._save_checkpoint

    def save_then_crash(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.state.global_step == stop_at:
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DistillTrainer, "_save_checkpoint", save_then_crash)
        with pytest.raises(Interrupted):
            train(make(out=str(out)))
    assert not (out / "projection_layer.pt").exists(), "the interrupted run must not have written final outputs"
    with pytest.MonkeyPatch.context() as mp:
        if during_resume is not None:
            during_resume(mp)
        return train(make(out=str(out), resume=True))


@pytest.fixture
def make(config, phase1_run) -> Callable[..., Any]:
    """Phase-2 (or, with phase=1, phase-1) configs of the resume scenario; dropout is on in the student."""

    def build(phase: int = 2, **overrides: Any) -> Any:
        base: dict[str, Any] = dict(phase=phase, max_steps=MAX_STEPS, batch_size=8, num_negatives=3, save_steps=2)
        if phase == 2:
            base.update(init=phase1_run.out, student=None)
        return config(**{**base, **overrides})

    return build


@pytest.fixture(scope="module")
def _references() -> dict[int, tuple[dict[str, torch.Tensor], dict[int, float]]]:
    return {}


@pytest.fixture
def reference(make: Callable[..., Any], tmp_path: Path, _references: dict) -> Callable[[int], tuple[dict, dict]]:
    """``reference(phase)`` → (weights, per-step losses) of the uninterrupted run (trained once per module)."""

    def run(phase: int) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
        if phase not in _references:
            out = tmp_path / f"uninterrupted-{phase}"
            result = train(make(phase=phase, out=str(out)))
            assert result.steps == MAX_STEPS and result.report["resumed_from"] is None
            _references[phase] = (_weights(out), _step_losses(out))
        return _references[phase]

    return run


@pytest.mark.parametrize(
    ("phase", "stop_at", "workers"),
    [
        pytest.param(2, 6, 0, id="phase2-mid-epoch-2"),
        pytest.param(2, 8, 2, id="phase2-epoch-boundary-2-workers"),
        pytest.param(1, 6, 0, id="phase1-mid-epoch-2"),
    ],
)
def test_resume_is_exact(make, reference, tmp_path: Path, phase: int, stop_at: int, workers: int) -> None:
    ref_weights, ref_losses = reference(phase)
    out = tmp_path / "interrupted"
    resumed = _interrupted_then_resumed(lambda **kw: make(phase=phase, num_workers=workers, **kw), out, stop_at)
    assert resumed.steps == MAX_STEPS
    assert Path(resumed.report["resumed_from"]).name == f"checkpoint-{stop_at}"
    weights = _weights(out)
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights), (
        f"resumed weights differ from the uninterrupted run's by up to {_max_diff(ref_weights, weights):.3g}"
    )
    # Every step's loss (steps 1..stop_at from the first process, the rest from the resumed one) matches too.
    assert _step_losses(out) == ref_losses and sorted(ref_losses) == list(range(1, MAX_STEPS + 1))


def test_control_sampler_stuck_in_epoch_0_is_detected(make, reference, tmp_path: Path) -> None:
    """If the resumed epoch never reached the sampler, the replayed batches would differ — and the test sees it."""
    ref_weights, _ = reference(2)

    def freeze_epoch(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(DistillBatchSampler, "set_epoch", lambda self, epoch: None)

    _interrupted_then_resumed(make, tmp_path / "frozen", 6, during_resume=freeze_epoch)
    assert _max_diff(ref_weights, _weights(tmp_path / "frozen")) > 1e-5


def test_control_dropout_rng_not_restored_is_detected(make, reference, tmp_path: Path) -> None:
    """If the checkpoint's RNG state were not restored, dropout masks after the resume would differ."""
    from transformers import Trainer

    ref_weights, _ = reference(2)

    def skip_rng(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(Trainer, "_load_rng_state", lambda self, checkpoint: None)

    _interrupted_then_resumed(make, tmp_path / "no-rng", 6, during_resume=skip_rng)
    assert _max_diff(ref_weights, _weights(tmp_path / "no-rng")) > 1e-5


# -- damaged checkpoints: --resume falls back to the newest complete one ---------------------------------------------


def _interrupted(make: Callable[..., Any], out: Path, stop_at: int = 8) -> Path:
    """A phase-2 run stopped once ``checkpoint-<stop_at>`` and its manifest are saved (``checkpoint-<stop_at - 2>``
    is kept too)."""
    original = ManifestCallback.on_save

    def save_then_crash(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        original(self, args, state, control, **kwargs)
        if state.global_step == stop_at:
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ManifestCallback, "on_save", save_then_crash)
        with pytest.raises(Interrupted):
            train(make(out=str(out)))
    return out / "checkpoints"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _as_older_ddx(checkpoints: Path) -> None:
    """Checkpoints as an older ddx left them: no manifest (the load checks decide alone)."""
    for manifest in checkpoints.glob(f"checkpoint-*/{MANIFEST}"):
        manifest.unlink()


@pytest.mark.parametrize(
    ("damage", "manifest"),
    [
        pytest.param(lambda c: _truncate(c / "model.safetensors"), True, id="weights-truncated"),
        pytest.param(lambda c: _truncate(c / "optimizer.pt"), True, id="optimizer-truncated"),
        pytest.param(lambda c: _truncate(c / "model.safetensors"), False, id="weights-truncated-no-manifest"),
        pytest.param(lambda c: _truncate(c / "optimizer.pt"), False, id="optimizer-truncated-no-manifest"),
        pytest.param(lambda c: (c / "trainer_state.json").unlink(), False, id="killed-before-trainer-state"),
        pytest.param(lambda c: _flip_last_byte(c / "model.safetensors"), True, id="weights-byte-flipped"),
    ],
)
def test_damaged_last_checkpoint_falls_back_to_the_previous(
    make, reference, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None], manifest: bool
) -> None:
    """The last checkpoint is damaged: resume from the one before, say so in one line, and still end exactly."""
    ref_weights, _ = reference(2)
    out = tmp_path / "damaged"
    checkpoints = _interrupted(make, out)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert all((checkpoints / c / MANIFEST).is_file() for c in ("checkpoint-6", "checkpoint-8"))
    if not manifest:
        _as_older_ddx(checkpoints)
    damage(checkpoints / "checkpoint-8")
    capsys.readouterr()

    resumed = train(make(out=str(out), resume=True))

    assert resumed.steps == MAX_STEPS and Path(resumed.report["resumed_from"]).name == "checkpoint-6"
    assert list(resumed.report["skipped_checkpoints"]) == ["checkpoint-8"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(lines) == 1, lines
    assert re.search(
        r"resuming from checkpoint-6, the newest complete checkpoint; skipped incomplete checkpoint-8: "
        r"\S+ (is truncated|has \S+ bytes|differs|is missing|.*missing)",
        lines[0],
    ), lines[0]
    assert (out / "checkpoints-incomplete" / "checkpoint-8").is_dir(), "the damaged checkpoint is set aside, not lost"
    weights = _weights(out)
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights), (
        f"weights differ from the uninterrupted run's by up to {_max_diff(ref_weights, weights):.3g}"
    )


def test_checkpoints_of_an_older_ddx_still_resume_exactly(make, reference, tmp_path: Path) -> None:
    """No manifest anywhere (an older ddx wrote them): whole, loadable checkpoints are used as before."""
    ref_weights, _ = reference(2)
    out = tmp_path / "older"
    _as_older_ddx(_interrupted(make, out))
    resumed = train(make(out=str(out), resume=True))
    assert Path(resumed.report["resumed_from"]).name == "checkpoint-8" and "skipped_checkpoints" not in resumed.report
    weights = _weights(out)
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)


def test_no_complete_checkpoint_is_one_line_before_the_student_loads(make, tmp_path: Path) -> None:
    out = tmp_path / "all-damaged"
    checkpoints = _interrupted(make, out)
    _truncate(checkpoints / "checkpoint-8" / "optimizer.pt")
    _truncate(checkpoints / "checkpoint-6" / "model.safetensors")
    loads: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StudentModelWithProjection, "load", lambda *a, **k: loads.append("load"))
        mp.setattr(StudentModelWithProjection, "from_pretrained", lambda *a, **k: loads.append("from_pretrained"))
        with pytest.raises(DdxError) as caught:
            train(make(out=str(out), resume=True))
    message = str(caught.value)
    assert "\n" not in message and not loads
    assert re.fullmatch(
        rf"No complete checkpoint to resume from in '{re.escape(str(checkpoints))}' \(checkpoint-8: optimizer\.pt "
        r"has \S+ bytes, \S+ when saved; checkpoint-6: model\.safetensors has .*\)\. "
        rf"Delete '{re.escape(str(checkpoints))}' and rerun without --resume to start over\.",
        message,
    ), message
