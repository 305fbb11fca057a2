"""Issue 10, storage rows, as operation counts (not wall clock): what each read path touches per row or chunk.

``bench/store_scale.py`` has the timings at millions of rows; these keep the mechanisms from regressing:
commits fsync the chunks before COMMIT, ls/info read COMMITs only, gathers read exactly the bytes they
return from a bounded set of open files, and scans read each chunk once into a reused buffer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storage import IntegrityError, TeacherStore, content_keys, segment_format, store_info
from storage import index as storage_index
from storage.fs import Location
from storage.segment import SegmentReader
from tests.storage.rows import ntok_for, roles_for, vectors_for

DIM, CHUNK = 16, 8


def _fill(store: TeacherStore, n: int, start: int = 0) -> np.ndarray:
    keys = content_keys("passage", [f"scale text {i}" for i in range(start, start + n)])
    with store.writer(chunk_rows=CHUNK) as w:
        w.append(keys, vectors_for(keys, DIM), roles_for(keys), ntok_for(keys))
    return keys


def test_commit_fsyncs_every_chunk_and_vectors_dir_before_commit(
    new_store: Callable[..., TeacherStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(DIM)
    events: list[str] = []
    real_fsync, real_write = os.fsync, Location.write_atomic

    def fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def write_atomic(self: Location, data: bytes, *parts: str, sync: bool = True) -> None:
        events.append("WRITE " + "/".join(parts))
        real_write(self, data, *parts, sync=sync)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Location, "write_atomic", write_atomic)
    _fill(store, 3 * CHUNK + 5)
    seg = Path(store.url, "segments", TeacherStore.open(store.url).segments[0].seg_id)
    commit = next(i for i, e in enumerate(events) if e.startswith("WRITE") and e.endswith("/COMMIT"))
    index = next(i for i, e in enumerate(events) if "index.parquet" in e)  # its temp file's fsync (streamed)
    synced = events[:index]
    chunks = [str(seg / "vectors" / "c" / str(c) / "0") for c in range(4)]
    dirs = [str(seg / "vectors" / "c" / str(c)) for c in range(4)] + [str(seg / "vectors" / "c"), str(seg / "vectors")]
    assert set(chunks + dirs + [str(seg)]) <= set(synced), synced
    assert index < commit


def test_commit_streams_the_index_from_its_parts(
    new_store: Callable[..., TeacherStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's commit holds one part at a time, never the whole index (flat memory at any row count)."""
    store = new_store(DIM)

    def whole(*args: object) -> None:
        raise AssertionError("commit built the whole index in memory")

    monkeypatch.setattr(segment_format, "write_index", whole)
    monkeypatch.setattr(segment_format, "read_parts", whole)
    keys = _fill(store, 5 * CHUNK + 3)
    reopened = TeacherStore.open(store.url)
    np.testing.assert_array_equal(reopened.get(keys), vectors_for(keys, DIM))
    seg = reopened.segments[0]
    queries = int(roles_for(keys).sum())
    assert seg.commit["roles"] == {"passage": len(keys) - queries, "query": queries} and len(seg.index()) == len(keys)


def test_ls_and_info_read_commits_only(new_store: Callable[..., TeacherStore], monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(DIM)
    _fill(store, 20)
    _fill(store, 13, start=10)  # 10 keys repeat the first segment's
    store.refresh()
    reads: list[str] = []
    real = Location.read_bytes

    def read_bytes(self: Location, *parts: str) -> bytes:
        reads.append("/".join(parts))
        return real(self, *parts)

    monkeypatch.setattr(Location, "read_bytes", read_bytes)
    info = store_info(TeacherStore.open(store.url))
    assert not [r for r in reads if r.endswith("index.parquet")], reads
    assert len(reads) == 1 + 2 * 2  # root zarr.json; COMMIT and vectors/zarr.json of each segment
    assert info["rows"] == 33 and sum(info["roles"].values()) == 33 and info["keys"] is None
    counted = store_info(TeacherStore.open(store.url), duplicates=True)
    assert (counted["keys"], counted["duplicate_rows"]) == (23, 10)


def test_pread_gather_reads_exactly_the_rows_returned(
    new_store: Callable[..., TeacherStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(DIM)
    keys = _fill(store, 10 * CHUNK)
    store = TeacherStore.open(store.url)
    gids = store.locate(keys)
    calls: list[int] = []
    real = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(storage_index.os, "preadv", preadv)
    pick = np.random.default_rng(0).permutation(len(keys))[:37]
    got = store.get_rows(gids[pick])
    np.testing.assert_array_equal(got, vectors_for(keys[pick], DIM))
    assert calls == [DIM * 2] * 37  # one read a row, of the row's bytes only
    files = store._row_gather().files
    assert files is not None and files.opened <= 10
    assert not any(seg._maps for seg in store.segments)  # nothing memory-mapped


@pytest.mark.parametrize("threaded", [False, True])
def test_pread_open_files_stay_bounded_and_match_mmap(new_store: Callable[..., TeacherStore], threaded: bool) -> None:
    store = new_store(DIM)
    keys = _fill(store, 12 * CHUNK + 3)
    pread, mmap = TeacherStore.open(store.url), TeacherStore.open(store.url)
    mmap.gather_mode = "mmap"
    gather = pread._row_gather()
    files = gather.files
    assert files is not None
    files.max_open = 3
    for seed in range(6):
        n = storage_index.PREAD_SPLIT_MIN + 30 if seed % 2 else 2
        pick = np.random.default_rng(seed).integers(0, len(keys), n)
        gids = pread.locate(keys[pick])
        gather._cold = threaded  # as if the last batch came from disk: this one is read by threads
        np.testing.assert_array_equal(pread.get_rows(gids), mmap.get_rows(gids))
        touched = len(np.unique(gids // CHUNK))
        assert len(files) <= max(3, touched)  # a batch's own files stay open while it reads, no more
    assert mmap._row_gather().files is None


def test_pread_gather_of_a_chunk_cut_while_open_is_an_integrity_error(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    keys = _fill(store, 3 * CHUNK)
    store = TeacherStore.open(store.url)
    store.get(keys[:1])  # opens chunk 0
    seg = store.segments[0]
    path = Path(store.url, "segments", seg.seg_id, "vectors", "c", "0", "0")
    os.truncate(path, DIM * 2 * 2)
    with pytest.raises(IntegrityError, match=r"vectors/c/0/0 is damaged: ends before row \d"):
        store.get(keys[:CHUNK])


def test_scan_reads_each_chunk_once_into_a_reused_buffer(
    new_store: Callable[..., TeacherStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(DIM)
    keys = _fill(store, 9 * CHUNK + 1)
    store = TeacherStore.open(store.url)
    reads: list[bool] = []
    real = SegmentReader.read_raw

    def read_raw(self: SegmentReader, i: int, buf: np.ndarray | None = None) -> np.ndarray:
        reads.append(buf is not None)
        return real(self, i, buf)

    monkeypatch.setattr(SegmentReader, "read_raw", read_raw)
    seen = [k for k, _ in store.iter_batches(batch_size=3)]  # keeps keys only: vectors' buffers are free
    assert len(np.concatenate(seen)) == len(keys) and len(reads) == 10
    assert sum(reads) >= len(reads) - 3  # at most three buffers allocated, whatever the store size
    assert not any(seg._maps for seg in store.segments)
    kept = list(store.iter_batches(batch_size=100))  # holding every batch: each chunk gets its own buffer
    np.testing.assert_array_equal(np.concatenate([v for _, v in kept]), vectors_for(np.concatenate(seen), DIM))
