"""``ddx precompute-teacher`` as separate OS processes: SIGKILL mid-run then resume, two writers at once, exit codes.

Each run is a real child process executing the ``ddx`` entry point (``cli.main:main``) with its own
argv, pid, file locks, stdout and stderr, killable with SIGKILL. Children are forked from a
``multiprocessing`` fork server that has imported torch and sentence-transformers once: a fresh
interpreter spends ~10 s of this 2-core machine's CPU on those imports alone, which would put these
tests far past their time budget. The fork server never runs a model itself, so children start with
clean thread pools. tests/cli runs the ``ddx`` executable itself end to end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

import numpy as np
import pytest

from storage.keys import content_keys
from storage.store import TeacherStore
from tests.precompute.test_pipeline import default_device_atol, direct, write_beir
from tests.tiny_models import tiny_corpus

PRELOAD = [
    "sentence_transformers",
    "transformers.modeling_utils",
    "transformers.models.bert.modeling_bert",
    "cli.main",
    "cli.precompute_cmd",
    "precompute.pipeline",
    "precompute.teacher",
]
# One torch thread per child: two writers and the test process share 2 cores (see one_torch_thread).
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _ddx_child(argv: list[str], out: str, err: str, env: dict[str, str]) -> None:
    """Child body: stdout/stderr to files, then exactly what the ``ddx`` console script does."""
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = ["ddx", *argv]
    from cli.main import main

    main()


@dataclass
class Run:
    proc: multiprocessing.process.BaseProcess
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float = 240) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"ddx did not finish in {timeout} s:\n{self.stderr[-2000:]}"
        return self.proc.exitcode

    def summary(self) -> dict:
        assert self.wait() == 0, self.stderr[-3000:]
        return json.loads(self.stdout)


class Ddx:
    """Starts ``ddx ARGS...`` processes from the warm fork server."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.workdir, self.env, self.n = workdir, env, 0
        with pytest.MonkeyPatch.context() as mp:  # the server imports torch: give it the children's settings
            for key, value in env.items():
                mp.setenv(key, value)
            forkserver.ensure_running()  # starts importing now, while the test prepares its data

    def start(self, *args: str) -> Run:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        proc = self.ctx.Process(target=_ddx_child, args=(list(args), str(out), str(err), self.env), daemon=True)
        proc.start()
        return Run(proc, out, err)


@pytest.fixture(scope="module")
def ddx(tmp_path_factory: pytest.TempPathFactory) -> Ddx:
    env = {**ENV, "DDX_CACHE_DIR": str(tmp_path_factory.mktemp("ddx-cache"))}
    return Ddx(tmp_path_factory.mktemp("runs"), env)


def precompute_args(model: Path, store: Path, *data: Path, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["precompute-teacher", "--teacher", str(model), "--store", str(store), "--no-progress", "--json", *extra]
    for d in data:
        args += ["--data", f"beir:{d}"]
    return args


def cache_verify(store: Path) -> subprocess.CompletedProcess:
    """The ``ddx`` executable itself (no torch needed for cache commands)."""
    ddx_bin = Path(sys.executable).with_name("ddx")
    return subprocess.run([str(ddx_bin), "cache", "verify", str(store)], capture_output=True, text=True, timeout=120)


def segment_ids(store: Path) -> set[str]:
    seg_dir = store / "segments"
    return {p.name for p in seg_dir.iterdir() if p.is_dir()} if seg_dir.is_dir() else set()


def wait_for_parts(store: Path, known: set[str], run: Run, parts: int, timeout: float = 120) -> str | None:
    """Id of a segment not in ``known`` once ``parts`` index parts are flushed into it; None if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for seg in segment_ids(store) - known:
            if len(list((store / "segments" / seg / "parts").glob("part-*.parquet"))) >= parts:
                return seg
        if run.proc.exitcode is not None:
            return None
        time.sleep(0.005)
    raise AssertionError(f"no segment reached {parts} parts in {timeout} s:\n{run.stderr[-2000:]}")


def flushed_rows(segment: Path) -> int:
    """Rows 0..n-1 covered by a (dead) writer's index parts: what salvage must keep."""
    import pyarrow.parquet as pq

    rows = np.unique(
        np.concatenate([pq.read_table(f).column("row").to_numpy() for f in (segment / "parts").glob("part-*.parquet")])
    )
    gaps = np.flatnonzero(rows != np.arange(len(rows)))
    return int(gaps[0]) if len(gaps) else len(rows)


# -- crash and resume ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    passages, queries = tiny_corpus(1000, seed=40), tiny_corpus(60, seed=41)
    return write_beir(tmp_path_factory.mktemp("crash") / "beir", passages, queries), passages, queries


def test_resume_after_sigkill_at_random_points(ddx: Ddx, tiny_bert: Path, crash_corpus, tmp_path: Path) -> None:
    """Three runs SIGKILLed at seeded random moments after their segment started, then one run to the end.

    Each run flushes an index part after every batch of at most 32 rows (~35 batches in all); a run is
    killed once its segment holds a random 1-8 parts, plus a random 0-60 ms (inside the next forward,
    chunk write or index write), so every kill leaves work for the next run and the chain ends with a kill.
    """
    folder, passages, queries = crash_corpus
    store = tmp_path / "store"
    args = precompute_args(
        tiny_bert, store, folder, extra=("--flush-rows", "32", "--flush-seconds", "0", "--max-batch-size", "32")
    )
    rng = random.Random(20240601)
    killed: dict[str, int] = {}  # segment -> rows its index parts covered when it was killed
    for _ in range(3):
        known = segment_ids(store)
        run = ddx.start(*args)
        parts = rng.randint(1, 8)
        seg = wait_for_parts(store, known, run, parts=parts)
        time.sleep(rng.uniform(0.0, 0.06))
        run.proc.kill()
        assert run.wait() == -9 and seg is not None, f"the run ended before its kill:\n{run.stderr[-2000:]}"
        killed[seg] = flushed_rows(store / "segments" / seg)
        assert killed[seg] > 0

    final = ddx.start(*args).summary()
    salvaged = {s["segment"]: s["rows"] for s in final["salvaged"]}
    assert list(killed)[-1] in salvaged  # the resumed run reports what it kept of the last interrupted one

    s = TeacherStore.open(store)
    keys = np.unique(np.concatenate([content_keys("passage", passages), content_keys("query", queries)]))
    assert s.contains(keys).all() and len(s) == len(keys)
    assert s.index.duplicates == 0 and s.rows == len(keys)  # every key exactly once
    assert s.uncommitted_segments() == []
    assert final["already_stored"] + final["encoded"] == len(keys)  # it encoded only what the killed runs left
    resumed = {seg.seg_id: seg.rows for seg in s.segments if seg.commit.get("salvaged")}
    assert set(resumed) == set(killed)
    assert resumed == killed  # salvage kept exactly the rows the index parts covered: a kill loses only the rest

    sample = random.Random(0).sample(range(len(passages)), 300)
    texts = [passages[i] for i in sample]
    np.testing.assert_allclose(
        s.get(content_keys("passage", texts)).astype(np.float32),
        direct(tiny_bert, texts, "passage"),
        atol=default_device_atol(),
        rtol=0,
    )
    np.testing.assert_allclose(
        s.get(content_keys("query", queries)).astype(np.float32),
        direct(tiny_bert, queries, "query"),
        atol=default_device_atol(),
        rtol=0,
    )
    verify = cache_verify(store)
    assert verify.returncode == 0 and verify.stdout.startswith("OK: "), verify.stdout + verify.stderr


# -- two writers ---------------------------------------------------------------------------------------------------


def test_two_writers_into_one_store_at_once(ddx: Ddx, tiny_bert: Path, tmp_path: Path) -> None:
    shared, only_a, only_b = tiny_corpus(100, seed=50), tiny_corpus(200, seed=51), tiny_corpus(200, seed=52)
    a = write_beir(tmp_path / "a", only_a + shared)
    b = write_beir(tmp_path / "b", only_b + shared)
    store = tmp_path / "store"
    runs = [ddx.start(*precompute_args(tiny_bert, store, d, extra=("--flush-rows", "64"))) for d in (a, b)]
    sa, sb = (r.summary() for r in runs)
    assert sa["segment"] != sb["segment"]

    keys_a, keys_b = (
        np.unique(content_keys("passage", only_a + shared)),
        np.unique(content_keys("passage", only_b + shared)),
    )
    overlap = len(np.intersect1d(keys_a, keys_b))
    s = TeacherStore.open(store)
    assert {seg.seg_id for seg in s.segments} == {sa["segment"], sb["segment"]}
    everything = np.union1d(keys_a, keys_b)
    assert s.contains(everything).all() and len(s) == len(everything)
    # a key both writers encoded is stored twice (harmless: lookups take the first); one a writer found
    # already committed by the other was skipped
    assert s.index.duplicates == overlap - sa["already_stored"] - sb["already_stored"]
    assert s.rows == len(everything) + s.index.duplicates
    texts = sorted(set(only_a + only_b + shared))
    np.testing.assert_allclose(
        s.get(content_keys("passage", texts)).astype(np.float32),
        direct(tiny_bert, texts, "passage"),
        atol=default_device_atol(),
        rtol=0,
    )
    verify = cache_verify(store)
    assert verify.returncode == 0, verify.stderr
    info = subprocess.run(
        [str(Path(sys.executable).with_name("ddx")), "cache", "info", str(store), "--json", "--duplicates"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(info.stdout)["duplicate_rows"] == s.index.duplicates


# -- exit codes and messages of a real process ---------------------------------------------------------------------


def test_bad_input_exit_codes(ddx: Ddx, tiny_bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text(
        '{"_id": "a", "text": "fine"}\n{"_id": "b", "text": \n{"_id": "c", "text": "also fine"}\n'
    )
    store = tmp_path / "store"
    bad = ddx.start(*precompute_args(tiny_bert, store, folder))
    assert bad.wait() == 1
    [line] = bad.stderr.strip().splitlines()  # one clean line: no traceback, and --no-progress silences every bar
    assert re.fullmatch(
        rf"Error: {re.escape(str(folder))}/corpus\.jsonl:2: malformed JSON \(Expecting value at "
        r"column \d+\)\. Fix or remove the line\. \(Or pass --skip-bad .*\)",
        line,
    ), line
    assert "Traceback" not in bad.stderr and bad.stdout == ""

    skipped = ddx.start(*precompute_args(tiny_bert, store, folder, extra=("--skip-bad",)))
    summary = skipped.summary()
    assert (summary["skipped_bad"], summary["encoded"]) == (1, 2)

    text = ddx.start(*[a for a in precompute_args(tiny_bert, store, folder, extra=("--skip-bad",)) if a != "--json"])
    assert text.wait() == 0
    assert "1 bad records skipped" in text.stdout and "nothing to encode" in text.stdout
