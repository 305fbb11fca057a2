"""Several segments: sequential and simultaneous writers, shared keys, first segment wins."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from storage import TeacherStore, store_info, verify_store
from storage.segment import SegmentWriter
from tests.storage.rows import Rows, make_rows, write_rows

DIM = 16


def _gids_by_segment(store: TeacherStore) -> list[tuple[int, int]]:
    spans, offset = [], 0
    for seg in store.segments:
        spans.append((offset, offset + seg.rows))
        offset += seg.rows
    return spans


def test_two_sequential_writers(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    a, b = make_rows(11, DIM, prefix="a"), make_rows(9, DIM, prefix="b")
    write_rows(store, a, batches=(5,))
    write_rows(store, b, chunk_rows=8)  # segments may differ in chunk size
    store = TeacherStore.open(store.url)
    assert len(store.segments) == 2 and store.rows == 20 and len(store) == 20
    assert store.index.duplicates == 0
    both = np.concatenate([a.keys, b.keys])
    perm = np.random.default_rng(0).permutation(20)
    np.testing.assert_array_equal(store.get(both[perm]), np.concatenate([a.vectors, b.vectors])[perm])
    gids = store.locate(both)
    (s0, e0), _ = _gids_by_segment(store)
    first_is_a = store.segments[0].index().keys[0] in set(a.keys.tolist())
    in_first = (gids >= s0) & (gids < e0)
    assert in_first.sum() == (11 if first_is_a else 9)


def _write_segment(store: TeacherStore, rows: Rows, barrier: threading.Barrier, errors: list) -> None:
    try:
        w = store.writer(chunk_rows=4, flush_seconds=0)
        barrier.wait()  # both writers open before either writes
        for s in range(0, len(rows), 5):
            w.append(*rows[s : s + 5].args())
            w.flush()
        barrier.wait()  # both still open here
        w.commit()
    except Exception as exc:  # pragma: no cover - reported by the test
        errors.append(exc)
        barrier.abort()


def test_two_simultaneous_writers_in_threads_with_shared_keys(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    shared = make_rows(6, DIM, prefix="shared")
    a = make_rows(14, DIM, prefix="a")
    b = make_rows(17, DIM, prefix="b")
    rows_a = Rows(*(np.concatenate([x, y]) for x, y in zip(a.args(), shared.args(), strict=True)))
    rows_b = Rows(*(np.concatenate([y, x]) for x, y in zip(b.args(), shared.args(), strict=True)))
    barrier, errors = threading.Barrier(2), []
    threads = [threading.Thread(target=_write_segment, args=(store, r, barrier, errors)) for r in (rows_a, rows_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    store.refresh()
    assert len(store.segments) == 2 and store.rows == 20 + 23
    assert len(store) == 14 + 17 + 6
    assert store.index.duplicates == 6
    all_keys = np.concatenate([a.keys, b.keys, shared.keys])
    np.testing.assert_array_equal(store.get(all_keys), np.concatenate([a.vectors, b.vectors, shared.vectors]))
    # first segment (in id order) wins for the shared keys
    (s0, e0), _ = _gids_by_segment(store)
    gids = store.locate(shared.keys)
    assert ((gids >= s0) & (gids < e0)).all()
    report = verify_store(store)
    assert report.ok and any("6 rows repeat a key" in n for n in report.notes)
    info = store_info(store, duplicates=True)
    assert info["keys"] == 37 and info["rows"] == 43 and info["duplicate_rows"] == 6
    assert store_info(store)["duplicate_rows"] is None  # counting duplicates needs the keys: only on request


def _process_writer(url: str, prefix: str, n: int, start: int, ready: mp.Event, go: mp.Event) -> None:
    store = TeacherStore.open(url)
    rows = make_rows(n, DIM, prefix=prefix, start=start)
    with store.writer(chunk_rows=4, rank=start // 100, world_size=2) as w:
        ready.set()
        go.wait(30)
        for s in range(0, n, 3):
            w.append(*rows[s : s + 3].args())


def test_two_simultaneous_writers_in_processes(tmp_path: Path, new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    readies = [ctx.Event(), ctx.Event()]
    # rank 0 writes "p 0..12", rank 1 "p 5..18": rows 5..12 are written by both
    procs = [
        ctx.Process(target=_process_writer, args=(store.url, "p", 13, 0, readies[0], go)),
        ctx.Process(target=_process_writer, args=(store.url, "p", 14, 5, readies[1], go)),
    ]
    for p in procs:
        p.start()
    for r in readies:
        assert r.wait(30)
    assert sorted(s for _, s in store.uncommitted_segments()) == ["active", "active"]
    go.set()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store.refresh()
    expected = make_rows(19, DIM, prefix="p")
    assert [s.rows for s in store.segments] in ([13, 14], [14, 13])
    assert len(store) == 19 and store.index.duplicates == 8
    np.testing.assert_array_equal(store.get(expected.keys), expected.vectors)
    assert store.uncommitted_segments() == []


def test_segment_ids_sort_by_time_and_name_the_rank(tmp_path: Path, new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    w = SegmentWriter.create(store.loc, dim=DIM, dtype="float16", chunk_rows=4, rank=2, world_size=3)
    assert "-r2of3-" in w.seg_id
    w.commit()
    assert store.loc.exists("segments", w.seg_id, "COMMIT")
