"""A precompute started while another writer's segment still looks 'active' (issue 13, problems 1 and 2).

On an object store a writer is 'active' while its heartbeat is younger than ``stale_after``, which a writer
SIGKILLed a moment ago also is. The rerun watches such heartbeats before its scan: one that stays still is a
dead writer, salvaged at once (its rows are not encoded again); one that advances is a live overlapping run,
named in a warning on stderr. Real processes (the writer) against moto's S3 server (``s3``), the tiny BERT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from precompute.pipeline import PrecomputeConfig, PrecomputeSummary, precompute
from precompute.recovery import may_overlap, salvage_abandoned
from precompute.sources import SourceOptions, parse_source
from precompute.teacher import TeacherConfig, TeacherEncoder, load_teacher
from storage.keys import key_slice, role_code
from storage.store import TeacherStore
from tests.precompute.test_pipeline import write_beir
from tests.storage.rows import make_spec
from tests.storage.s3 import S3

REPO = Path(__file__).resolve().parents[2]
STALE = 3.0  # seconds: beats every 0.5 s
TEXTS = [f"passage number {i} about {topic}" for i, topic in enumerate(["rivers", "stars", "bees", "salt"] * 3)]

# Opens the store, writes rows for the keys given (hex) in 4-row chunks, flushes all but the last, prints
# "<rows flushed> <segment id>" and hangs, its heartbeat thread beating, until killed.
WRITER = """
import sys, time
import numpy as np
from storage import TeacherStore
store = TeacherStore.open(sys.argv[1])
keys = np.array([bytes.fromhex(h) for h in sys.argv[2].split(",")], dtype="S16")
n = len(keys)
vectors = np.random.default_rng(0).standard_normal((n, store.dim)).astype(store.dtype)
roles = np.full(n, int(sys.argv[3]), np.uint8)
tokens = np.full(n, 5, np.int32)
w = store.writer(chunk_rows=4, flush_seconds=3600)
w.append(keys[:-1], vectors[:-1], roles[:-1], tokens[:-1])
w.flush()
w.append(keys[-1:], vectors[-1:], roles[-1:], tokens[-1:])  # never flushed: lost with the process
print(w.rows_flushed, w.seg_id, flush=True)
time.sleep(300)
"""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bert(tiny_bert: Path) -> TeacherEncoder:
    return load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))


@pytest.fixture
def stale(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setenv("DDX_STALE_AFTER", str(STALE))  # this process and the writers it starts
    return STALE


def passage_keys(folder: Path) -> np.ndarray:
    """The content keys precompute gives the folder's passages, in file order."""
    source = parse_source(f"beir:{folder}", SourceOptions())
    return np.concatenate([b.keys() for b in source.iter_text_blocks() if b.role == "passage"])


def start_writer(url: str, keys: np.ndarray) -> tuple[subprocess.Popen[str], int, str]:
    """A writer process holding an uncommitted segment of ``keys`` (all but the last flushed)."""
    hexkeys = ",".join(bytes(k).ljust(16, b"\0").hex() for k in keys)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, hexkeys, str(role_code("passage"))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        proc.wait(10)
        pytest.fail(f"writer failed: {proc.stderr.read()}")  # type: ignore[union-attr]
    flushed, seg_id = line.split()
    return proc, int(flushed), seg_id


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def run(url: str, folder: Path, encoder: TeacherEncoder) -> PrecomputeSummary:
    config = PrecomputeConfig(
        store=url, data=(f"beir:{folder}",), teacher=TeacherConfig(model=encoder.spec.model), progress=False
    )
    return precompute(config, encoder=encoder)


def test_a_rerun_right_after_a_kill_salvages_the_killed_rows_instead_of_encoding_them(
    s3: S3, stale: float, bert: TeacherEncoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL a writer that flushed 5 rows, rerun at once (its last beat is fresh: 'active'): the rerun waits
    until the heartbeat is stale, salvages the 5 rows, encodes only the other 7. Every key stored once."""
    url, folder = s3.url(), write_beir(tmp_path / "corpus", TEXTS)
    TeacherStore.create(url, bert.spec)
    keys = passage_keys(folder)
    proc, flushed, seg_id = start_writer(url, keys[:6])
    try:
        assert flushed == 5
        assert TeacherStore.open(url).uncommitted_segments() == [(seg_id, "active")]
    finally:
        stop(proc)
    killed = time.monotonic()
    summary = run(url, folder, bert)
    waited = time.monotonic() - killed

    assert summary.salvaged == [{"segment": seg_id, "rows": 5}]
    assert (summary.already_stored, summary.to_encode, summary.encoded) == (5, 7, 7)
    assert waited < stale + 10, waited  # at most stale_after (+ a poll) of watching, then a tiny encode
    err = capsys.readouterr().err
    assert f"waiting up to {stale:g} s" in err and seg_id in err and "warning" not in err
    store = TeacherStore.open(url)
    assert store.uncommitted_segments() == [] and store.rows == len(TEXTS)
    assert store.index.duplicates == 0 and store.contains(keys).all()
    assert run(url, folder, bert).encoded == 0


def test_b_a_live_overlapping_writer_is_named_in_a_warning_and_the_run_completes(
    s3: S3, stale: float, bert: TeacherEncoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer alive (heartbeat advancing) while the run starts: one warning naming its segment, found within
    a beat or two (not after stale_after), and the run encodes and commits everything it lacks."""
    url, folder = s3.url(), write_beir(tmp_path / "corpus", TEXTS)
    TeacherStore.create(url, bert.spec)
    proc, _, seg_id = start_writer(url, passage_keys(folder)[:6])
    try:
        started = time.monotonic()
        summary = salvage_abandoned(TeacherStore.open(url))
        assert summary == [] and time.monotonic() - started < stale, "a live writer is told within a few beats"
        summary_run = run(url, folder, bert)
        assert proc.poll() is None, "the writer lived throughout"
    finally:
        stop(proc)
    assert summary_run.salvaged == [] and summary_run.encoded == len(TEXTS)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings  # one per run
    assert all(seg_id in w and "encoded twice" in w and "lookups use the first" in w for w in warnings)
    store = TeacherStore.open(url)
    assert store.rows == len(TEXTS) and store.index.duplicates == 0  # the live writer's rows are not committed


def test_other_ranks_of_the_same_world_size_are_not_watched(
    s3: S3, stale: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """A live writer of rank 1 of 2 owns keys rank 0 of 2 never encodes: rank 0 goes on at once, silently;
    rank 1 of 2 and a single-process run do overlap it (only rank 0 prints, so the latter says so)."""
    store = TeacherStore.create(s3.url(), make_spec(16))
    w = store.writer(rank=1, world_size=2, chunk_rows=4, flush_seconds=3600)
    try:
        started = time.monotonic()
        assert salvage_abandoned(store, rank=0, world=2) == []
        assert time.monotonic() - started < stale / 2 and capsys.readouterr().err == ""
        assert salvage_abandoned(store, rank=1, world=2) == []  # watched (its own slice), found live: rank 0 warns
        assert time.monotonic() - started < stale and capsys.readouterr().err == ""
        assert salvage_abandoned(store) == []
        assert w.seg_id in capsys.readouterr().err
    finally:
        w.abort()


def test_a_live_local_writer_is_named_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Local 'active' is exact (the writer's flock): the warning comes at once, with no heartbeat to watch."""
    store = TeacherStore.create(tmp_path / "store", make_spec(16))
    with store.writer(chunk_rows=4) as w:
        started = time.monotonic()
        assert salvage_abandoned(store) == []
        assert time.monotonic() - started < 1.0
        err = capsys.readouterr().err
        assert err.startswith("warning:") and w.seg_id in err and "waiting" not in err


@pytest.mark.parametrize(("theirs", "mine"), [((1, 2), (0, 2)), ((0, 2), (0, 4)), ((1, 4), (3, 6)), ((2, 3), (0, 1))])
def test_may_overlap_agrees_with_key_slice(theirs: tuple[int, int], mine: tuple[int, int]) -> None:
    keys = np.random.default_rng(0).bytes(16 * 4000)
    arr = np.frombuffer(keys, dtype="S16")
    shared = bool((key_slice(arr, *theirs) & key_slice(arr, *mine)).any())
    seg_id = f"20250101T000000-host-1-12-r{theirs[0]}of{theirs[1]}-abc123"
    assert may_overlap(seg_id, *mine) == shared
    assert may_overlap("made-up-id", *mine)
