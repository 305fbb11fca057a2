"""A SIGKILLed ``torchrun`` precompute, restarted with ``torchrun``, succeeds on the first try (issue 13).

The whole process group of a running ``torchrun --nproc-per-node N -m cli.main precompute-teacher`` is killed once
each rank has flushed rows; the same command is then run again: it must exit 0 the first time, keep every flushed
row (salvaged once), encode only the rest, and leave every key exactly once in a store ``verify`` passes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from storage import TeacherStore, verify_store
from storage.keys import content_keys
from tests.precompute.test_pipeline import write_beir
from tests.tiny_models import tiny_corpus

REPO = Path(__file__).resolve().parents[2]
TEXTS = tiny_corpus(4000, seed=95)


def _torchrun(nproc: int, model: Path, store: Path, folder: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)),
        *("-m", "cli.main", "precompute-teacher", "--teacher", str(model), "--store", str(store)),
        *("--data", f"beir:{folder}", "--no-progress", "--json", "--device", "cpu"),
        *("--flush-rows", "8", "--flush-seconds", "0.2", "--max-batch-size", "2", "--report-wait", "30"),
    ]


def _objects(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def _flushed_parts(store: Path) -> int:
    """Index parts flushed by segments still being written (no COMMIT yet)."""
    segments = [s for s in store.glob("segments/*") if s.is_dir() and not (s / "COMMIT").exists()]
    return sum(1 for s in segments for _ in s.glob("parts/*"))


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_killed_torchrun_precompute_restarts_on_the_first_try(nproc: int, tiny_bert: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", TEXTS)
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    argv = _torchrun(nproc, tiny_bert, store, folder)
    first = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while _flushed_parts(store) < 2 * nproc and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before it could be killed: give it more texts"
    family = [first.pid, *(c.pid for c in psutil.Process(first.pid).children(recursive=True))]
    for pid in family:  # torchrun and every rank (they run in sessions of their own), mid-run
        os.kill(pid, signal.SIGKILL)
    first.communicate(timeout=60)
    killed = TeacherStore.open(store)
    assert killed.uncommitted_segments(), "nothing was left to salvage: the kill came too late"

    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    summaries = _objects(again.stdout)  # one JSON object per rank (each written with one write)
    assert sorted(s["rank"] for s in summaries) == list(range(nproc))
    salvaged = sum(d["rows"] for s in summaries for d in s["salvaged"])
    assert salvaged > 0  # the killed run's flushed rows were kept, each once
    done = TeacherStore.open(store)
    keys = np.unique(content_keys("passage", TEXTS))
    assert done.uncommitted_segments() == [] and done.index.duplicates == 0
    assert done.rows == len(keys) and done.contains(keys).all()
    assert sum(s["encoded"] for s in summaries) == len(keys) - salvaged
    job = next(s["job_total"] for s in summaries if s["rank"] == 0)
    assert job["complete"] and job["encoded"] == len(keys) - salvaged
    assert verify_store(store).ok
