"""SIGKILL a real ``ddx train`` process, then ``--resume``: the run ends with the weights of one never killed.

Each run is a real ``python -m cli.main train`` process (phase 1, tiny BERT student with dropout on, a checkpoint
every 2 of 12 steps, one OpenMP thread so that two processes compute bit-identical floats). The killed run gets
SIGKILL once its log shows a step drawn at random (the seed is in the test id), wherever it is then: in a step, in a
checkpoint save, between them. The second test kills a run half-way through writing a checkpoint (its
``optimizer.pt`` half written, no trainer state): ``--resume`` must skip that checkpoint, say so, and resume from
the previous one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from distill.model.model import StudentModelWithProjection
from tests.distill.conftest import Corpus

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 12
KILL_SEEDS = (1, 2)  # each draws one step to kill at; the seed is in the test id, so a failure can be replayed


@pytest.fixture(scope="module")
def argv(store: Path, corpus: Corpus, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """``argv(out, *extra)`` → the command line of one training process writing to ``out``."""
    tokens = tmp_path_factory.mktemp("kill-tokens")

    def build(out: Path, *extra: str, script: tuple[str, ...] = ("-m", "cli.main")) -> list[str]:
        options = {
            "--phase": 1,
            "--store": store,
            "--data": corpus.spec,
            "--student": tiny_bert,
            "--out": out,
            "--max-steps": MAX_STEPS,
            "--batch-size": 8,
            "--save-steps": 2,
            "--save-total-limit": 2,
            "--warmup": 0,
            "--lr": 3e-3,
            "--projection-lr": 3e-3,
            "--seed": 7,
            "--device": "cpu",
            "--num-workers": 0,
            "--logging-steps": 1,
            "--token-cache": tokens,
        }
        flat = [str(x) for pair in options.items() for x in pair]
        return [sys.executable, *script, "train", *flat, "--no-progress", "--json", *extra]

    return build


def _env(**extra: str) -> dict[str, str]:
    """This process's environment (offline, caches in temp folders: set by the session fixtures), one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _run(command: list[str]) -> dict:
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout), "stderr": proc.stderr}


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "train_log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.endswith("}")), default=0)


def _kill_when(command: list[str], ready: Callable[[], bool], what: str, env: dict[str, str] | None = None) -> None:
    """Start ``command``, SIGKILL it as soon as ``ready()`` is true; fail if it ends or stalls first."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(command, cwd=ROOT, env=env or _env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 240
        try:
            while not ready():
                if proc.poll() is not None:
                    stderr.seek(0)
                    pytest.fail(f"training ended before {what}: {stderr.read()[-2000:]!r}")
                assert time.monotonic() < deadline, f"no {what} within 240 s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return StudentModelWithProjection.load(out, device="cpu").state_dict()


def _assert_same(reference: dict[str, torch.Tensor], out: Path) -> None:
    weights = _weights(out)
    assert reference.keys() == weights.keys()
    differ = {k: float((reference[k].double() - weights[k].double()).abs().max()) for k in reference}
    assert all(torch.equal(reference[k], weights[k]) for k in reference), (
        f"resumed weights differ from the uninterrupted run's, by up to {max(differ.values()):.3g}"
    )


@pytest.fixture(scope="module")
def reference(argv, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Weights of the run never interrupted."""
    out = tmp_path_factory.mktemp("kill-reference") / "run"
    assert _run(argv(out))["steps"] == MAX_STEPS
    return _weights(out)


@pytest.mark.parametrize("seed", KILL_SEEDS, ids=[f"seed{s}" for s in KILL_SEEDS])
def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(
    argv, reference: dict[str, torch.Tensor], tmp_path: Path, seed: int
) -> None:
    kill_at = random.Random(seed).randint(3, MAX_STEPS - 2)
    out = tmp_path / "run"
    _kill_when(argv(out), lambda: _logged_step(out) >= kill_at, f"step {kill_at}")
    assert not (out / "projection_layer.pt").exists(), "the killed run must not have finished"

    resumed = _run(argv(out, "--resume"))

    assert resumed["steps"] == MAX_STEPS, f"killed after step {kill_at}"
    assert resumed["report"]["resumed_from"] is not None, f"killed after step {kill_at}: nothing to resume from"
    _assert_same(reference, out)


def test_sigkill_while_writing_a_checkpoint_falls_back_to_the_previous(
    argv, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    out, marker = tmp_path / "run", tmp_path / "stalled"
    stall = argv(out, script=("-m", "tests.cli.stall_in_checkpoint"))
    env = _env(DDX_STALL_STEP="8", DDX_STALL_MARKER=str(marker))
    _kill_when(stall, marker.exists, "the stall in checkpoint-8", env)
    half_written = out / "checkpoints" / "checkpoint-8"
    assert (half_written / "model.safetensors").is_file() and not (half_written / "trainer_state.json").exists()

    resumed = _run(argv(out, "--resume"))

    assert Path(resumed["report"]["resumed_from"]).name == "checkpoint-6"
    notes = [line for line in resumed["stderr"].splitlines() if "checkpoint-8" in line]
    assert len(notes) == 1 and "resuming from checkpoint-6" in notes[0], resumed["stderr"][-2000:]
    assert "Traceback" not in resumed["stderr"]
    _assert_same(reference, out)
