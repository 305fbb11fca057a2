"""Two-process DDP training (torchrun, gloo, CPU): identical weights on both ranks, one run folder, InfoNCE gathers.

The ranks run ``tests/distill/train/ddp_train_script.py``, which trains through :func:`distill.train.run.train` as
``ddx train`` under torchrun does and dumps each rank's final weights and evidence (see that script's docstring).
Length grouping is off there, so the batches depend on the seed only, not on the tiny tokenizer's vocabulary (which
varies between builds), and the scenario below is the same in every session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.model.model import StudentModelWithProjection
from distill.train.config import TrainConfig, infonce_spaces
from tests.distill.conftest import TRAIN_QUERIES, Corpus, TrainedRun

SCRIPT = Path(__file__).with_name("ddp_train_script.py")
STEPS = 8
ROOT = Path(__file__).resolve().parents[3]


def torchrun(*args: str, timeout: float = 180, script: Path | None = SCRIPT) -> subprocess.CompletedProcess[str]:
    """Two ranks of ``script`` (or, with ``script=None``, of ``args`` as torchrun takes them, e.g. ``-m module``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    target = [str(script)] if script else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _run_args(teacher_store: Path, corpus: Corpus, phase1_run: TrainedRun, token_cache: Path, out: Path) -> list[str]:
    """The options a phase-2 run from the fixture's phase-1 run needs (the same for the script and ``ddx train``)."""
    return [
        "--store",
        str(teacher_store),
        "--data",
        corpus.spec,
        "--init",
        phase1_run.out,
        "--token-cache",
        str(token_cache),
        "--out",
        str(out),
    ]


def _args(
    teacher_store: Path, corpus: Corpus, phase1_run: TrainedRun, token_cache: Path, out: Path, dump: Path
) -> list[str]:
    return [*_run_args(teacher_store, corpus, phase1_run, token_cache, out), "--dump", str(dump)]


def _evidence(dump: Path) -> list[dict[str, Any]]:
    return [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]


def _states(dump: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]


def test_ddp_phase2_ranks_agree_and_rank0_writes(
    teacher_store: Path, corpus: Corpus, phase1_run: TrainedRun, token_cache: Path, tmp_path: Path
) -> None:
    out, dump = tmp_path / "run", tmp_path / "dump"
    torchrun(*_args(teacher_store, corpus, phase1_run, token_cache, out, dump), "--max-steps", "8", "--batch-size", "2")
    ev0, ev1 = _evidence(dump)
    s0, s1 = _states(dump)

    # Training completed on both ranks, and both hold the same weights — projection included.
    assert ev0["steps"] == ev1["steps"] == STEPS
    assert s0.keys() == s1.keys() and any(k.startswith("model.projection.") for k in s0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    init = StudentModelWithProjection.load(phase1_run.out, device="cpu").state_dict()
    assert any(not torch.equal(init[k], s0[f"model.{k}"]) for k in init), "the ranks must have trained"

    # The run folder is written once, by rank 0, and holds exactly the ranks' weights.
    assert (ev0["saves"], ev1["saves"]) == (1, 0)
    saved = StudentModelWithProjection.load(out, device="cpu").state_dict()
    assert all(torch.equal(saved[k], s0[f"model.{k}"]) for k in saved)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, STEPS + 1)), "one record per step, not per rank"
    assert json.loads((out / "ddx_run.json").read_text())["result"]["steps"] == STEPS

    # The ranks trained on different examples and together on all of them: 30 examples / batch 2 = 15 batches,
    # 8 per rank (the 16th recycles the first so both ranks step equally often).
    for b0, b1 in zip(ev0["batches"][:7], ev1["batches"][:7], strict=True):
        assert not set(b0) & set(b1)
    assert {i for batch in ev0["batches"][:STEPS] + ev1["batches"][:STEPS] for i in batch} == set(range(TRAIN_QUERIES))

    # InfoNCE gathered candidates across ranks: every rank scored its queries against both ranks' positives, its own
    # rows at its offset. Each InfoNCE space of the default (projected+hybrid) gathers positives, then hard negatives.
    per_step = 2 * len(infonce_spaces(TrainConfig.__dataclass_fields__["infonce_space"].default))
    assert len(ev0["gathers"]) == len(ev1["gathers"]) == per_step * STEPS
    for step in range(STEPS):
        for call in range(step * per_step, (step + 1) * per_step, 2):
            (n0, g0, o0), (n1, g1, o1) = ev0["gathers"][call], ev1["gathers"][call]
            assert g0 == g1 == n0 + n1 and (o0, o1) == (0, n0)
            (m0, h0, _), (m1, h1, _) = ev0["gathers"][call + 1], ev1["gathers"][call + 1]
            assert h0 == h1 == m0 + m1
    # The case that used to crash: a step where one rank's batch has no hard negatives and the other's has some (the
    # negatives gather's backward is a collective that both ranks must join; see DistillModule._scatter).
    negatives = [(ev0["gathers"][per_step * s + 1][0], ev1["gathers"][per_step * s + 1][0]) for s in range(STEPS)]
    assert any(min(pair) == 0 < max(pair) for pair in negatives), negatives


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [6, 8], ids=["mid-epoch-2", "epoch-boundary"])
def test_ddp_resume_is_exact(
    teacher_store: Path, corpus: Corpus, phase1_run: TrainedRun, token_cache: Path, tmp_path: Path, stop_at: int
) -> None:
    """Resuming under DDP replays the same batches per rank (epochs of 4 steps a rank: 1–4, 5–8, 9–10)."""
    common = ["--max-steps", "10", "--save-steps", "2"]
    torchrun(*_args(teacher_store, corpus, phase1_run, token_cache, tmp_path / "a", tmp_path / "dump-a"), *common)
    torchrun(
        *_args(teacher_store, corpus, phase1_run, token_cache, tmp_path / "b", tmp_path / "dump-b1"),
        *common,
        "--stop-at",
        str(stop_at),
    )
    assert all("stopped" in ev for ev in _evidence(tmp_path / "dump-b1"))
    torchrun(
        *_args(teacher_store, corpus, phase1_run, token_cache, tmp_path / "b", tmp_path / "dump-b2"),
        *common,
        "--resume",
    )
    for rank, (a, b) in enumerate(zip(_states(tmp_path / "dump-a"), _states(tmp_path / "dump-b2"), strict=True)):
        assert all(torch.equal(a[k], b[k]) for k in a), f"rank {rank}: resumed weights differ"
    for ev_a, ev_b1, ev_b2 in zip(
        _evidence(tmp_path / "dump-a"), _evidence(tmp_path / "dump-b1"), _evidence(tmp_path / "dump-b2"), strict=True
    ):
        # Batches trained (the loader prefetches one ahead, so compare the trained ones only).
        assert ev_b1["batches"][:stop_at] + ev_b2["batches"][: 10 - stop_at] == ev_a["batches"][:10]


def test_ddx_train_cli_under_torchrun_reports_once_and_exits_cleanly(
    teacher_store: Path, corpus: Corpus, phase1_run: TrainedRun, token_cache: Path, tmp_path: Path
) -> None:
    """``torchrun … -m cli.main train --json``: both ranks exit 0 (group ended); one JSON report, from rank 0."""
    out = tmp_path / "run"
    proc = torchrun(
        "-m",
        "cli.main",
        "train",
        "--phase",
        "2",
        *_run_args(teacher_store, corpus, phase1_run, token_cache, out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--num-negatives",
        "2",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
        "--json",
        script=None,
    )
    report = json.loads(proc.stdout)  # exactly one document: a second rank's report would be "Extra data"
    assert report["steps"] == 2 and Path(report["hybrid"]).is_dir()
    assert "destroy_process_group" not in proc.stderr and "terminate called" not in proc.stderr
