"""A writer killed mid-run: its segment is reported, salvaged to exactly the flushed rows, or collected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storage import TeacherStore, gc_store, store_info, verify_store
from tests.storage.rows import make_rows, write_rows

DIM = 16
REPO = Path(__file__).resolve().parents[2]

# Appends 11 rows into 4-row chunks with two explicit flushes, then hangs with rows 9 and 10 unflushed.
CHILD = """
import sys, time
from storage import TeacherStore
from tests.storage.rows import make_rows
store = TeacherStore.open(sys.argv[1])
rows = make_rows(30, 16, prefix="crash")
w = store.writer(chunk_rows=4, flush_seconds=3600)
w.append(*rows[:6].args())   # chunk 0 full: rows 0-3 reach disk; 4, 5 wait in the buffer
w.flush()                    # rows 4, 5 (partial chunk 1)
w.append(*rows[6:9].args())  # chunk 1 full: rewritten whole; row 8 waits
w.flush()                    # row 8 (partial chunk 2)
w.append(*rows[9:11].args()) # rows 9, 10: never flushed
print(w.rows_flushed, w.seg_id, flush=True)
time.sleep(120)
"""


@pytest.fixture
def crashed_writer(new_store: Callable[..., TeacherStore]):
    """A store with one committed segment and a writer process that hangs after two flushes."""
    store = new_store(DIM)
    write_rows(store, make_rows(7, DIM, prefix="kept"))
    store.refresh()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, store.url], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        flushed, seg_id = line.split()
        yield store, proc, int(flushed), seg_id
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_crashed_writer_is_reported_salvaged_exactly(crashed_writer) -> None:
    store, proc, flushed, seg_id = crashed_writer
    assert flushed == 9
    assert store.uncommitted_segments() == [(seg_id, "active")]  # its process still holds the lock
    assert store.salvage() == []  # never touches a live writer
    assert gc_store(store) == []

    os.kill(proc.pid, signal.SIGKILL)  # no commit, no abort, no atexit
    proc.wait(10)
    assert store.uncommitted_segments() == [(seg_id, "abandoned")]
    report = verify_store(store)
    assert report.ok and any(seg_id in n and "crashed run" in n for n in report.notes)
    store.refresh()
    assert len(store) == 7  # readers never see the uncommitted rows

    assert store.salvage() == [(seg_id, 9)]
    assert store.uncommitted_segments() == []
    assert len(store) == 16
    rows = make_rows(30, DIM, prefix="crash")
    np.testing.assert_array_equal(store.get(rows.keys[:9]), rows.vectors[:9])
    assert not store.contains(rows.keys[9:]).any()  # the unflushed rows are the (only) loss
    assert verify_store(store).ok
    salvaged = [s for s in store_info(store)["segments"] if s["id"] == seg_id]
    assert salvaged[0]["salvaged"] and salvaged[0]["rows"] == 9
    reopened = TeacherStore.open(store.url)
    np.testing.assert_array_equal(reopened.get(rows.keys[:9]), rows.vectors[:9])


def test_gc_salvages_rows_removes_only_empty_segments(crashed_writer, new_store: Callable[..., TeacherStore]) -> None:
    """gc never deletes a row it could keep: the crashed segment's flushed rows are committed, not removed."""
    store, proc, _, crashed_id = crashed_writer
    committed_id = store.segments[0].seg_id
    live = store.writer(chunk_rows=4)
    live.append(*make_rows(5, DIM, prefix="live").args())
    live.flush()
    empty = store.writer(chunk_rows=4, flush_seconds=3600)
    empty.append(*make_rows(2, DIM, prefix="never flushed").args())
    empty.abort()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    states = dict(store.uncommitted_segments())
    assert states == {crashed_id: "abandoned", live.seg_id: "active", empty.seg_id: "abandoned"}

    dry = {d["id"]: d for d in gc_store(store, dry_run=True)}
    assert {k: (d["action"], d["rows"]) for k, d in dry.items()} == {
        empty.seg_id: ("removed", 0),
        crashed_id: ("salvaged", 9),
    }
    assert dry[empty.seg_id]["bytes"] > 0
    assert store.loc.exists("segments", empty.seg_id) and not store.loc.exists("segments", crashed_id, "COMMIT")
    done = {d["id"]: (d["action"], d["rows"]) for d in gc_store(store)}
    assert done == {empty.seg_id: ("removed", 0), crashed_id: ("salvaged", 9)}
    assert not store.loc.exists("segments", empty.seg_id)
    assert store.loc.exists("segments", committed_id, "COMMIT")
    assert store.loc.exists("segments", crashed_id, "COMMIT")  # salvaged: its 9 flushed rows are kept
    crashed = make_rows(9, DIM, prefix="crash")
    np.testing.assert_array_equal(store.get(crashed.keys), crashed.vectors)
    assert dict(store.uncommitted_segments()) == {live.seg_id: "active"}

    live.append(*make_rows(5, DIM, prefix="live", start=5).args())
    live.commit()  # the live writer was left alone and still commits
    store.refresh()
    live_rows = make_rows(10, DIM, prefix="live")
    np.testing.assert_array_equal(store.get(live_rows.keys), live_rows.vectors)
    assert len(store) == 7 + 9 + 10 and verify_store(store).ok


def test_salvage_removes_a_segment_with_nothing_flushed(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(3, DIM).args())  # buffered only
    w.abort()
    assert store.uncommitted_segments() == [(w.seg_id, "abandoned")]
    assert store.salvage() == [(w.seg_id, 0)]
    assert not store.loc.exists("segments", w.seg_id)


def test_salvage_of_an_aborted_writer_after_a_full_chunk(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = make_rows(14, DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows[:6].args())
    w.flush()
    w.append(*rows[6:14].args())  # chunks 1, 2 complete; rows 12, 13 buffered
    assert w.rows_flushed == 12
    w.abort()
    assert store.salvage() == [(w.seg_id, 12)]
    np.testing.assert_array_equal(store.get(rows.keys[:12]), rows.vectors[:12])
    assert verify_store(store).ok


def test_a_segment_still_starting_is_not_collected(
    new_store: Callable[..., TeacherStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer creates its group before its lock: gc in that window must not delete it."""
    from storage.segment import SegmentWriter

    store = new_store(DIM)
    monkeypatch.setattr(SegmentWriter, "_take_lock", lambda self: None)  # freeze the writer in that window
    starting = SegmentWriter.create(store.loc, dim=DIM, dtype="float16", chunk_rows=4)
    old = SegmentWriter.create(store.loc, dim=DIM, dtype="float16", chunk_rows=4, seg_id="20000101T000000-h-1-r0of1-x")
    assert not store.loc.exists("segments", starting.seg_id, ".lock")
    assert dict(store.uncommitted_segments()) == {starting.seg_id: "active", old.seg_id: "abandoned"}
    assert [d["id"] for d in gc_store(store)] == [old.seg_id]
    assert store.loc.exists("segments", starting.seg_id, "zarr.json")
