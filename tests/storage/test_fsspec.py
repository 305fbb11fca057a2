"""Stores at fsspec URLs: written through zarr, rows read by byte range (no memory maps), crash states by heartbeat.

Found while writing these: zarr's FsspecStore works over fsspec's in-memory filesystem (zarr wraps the
synchronous filesystem in its AsyncFileSystemWrapper), so ``memory://`` exercises the remote code path
end to end with no network. A ``file://`` URL resolves to the local filesystem and memory-maps like a
plain path; forcing the zarr read path there reads the same values.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

import storage.segment_reader as segment_reader
from storage import TeacherStore, gc_store, verify_store
from storage.segment import SegmentReader
from tests.storage.rows import make_rows, make_spec, write_rows

DIM = 8


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"ddx-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture
def zarr_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Chunk indices read through SegmentReader._zarr_chunk (the non-memmap path)."""
    calls: list[int] = []
    original = SegmentReader._zarr_chunk

    def spy(self: SegmentReader, i: int) -> np.ndarray:
        calls.append(i)
        return original(self, i)

    monkeypatch.setattr(SegmentReader, "_zarr_chunk", spy)
    return calls


def test_memory_url_round_trip(memory_url: str, zarr_reads: list[int]) -> None:
    store = TeacherStore.create(memory_url, make_spec(DIM))
    assert not store.loc.is_local and store.loc.local_path("x") is None
    rows = make_rows(23, DIM)
    write_rows(store, rows, batches=(3, 7, 1))
    write_rows(store, make_rows(5, DIM, prefix="second"))
    store = TeacherStore.open(memory_url, make_spec(DIM))
    assert len(store.segments) == 2 and len(store) == 28
    perm = np.random.default_rng(3).permutation(23)
    np.testing.assert_array_equal(store.get(rows.keys[perm]), rows.vectors[perm])
    np.testing.assert_array_equal(store.get(rows.keys, dtype="float32"), rows.vectors.astype(np.float32))
    assert zarr_reads == []  # remote rows come by byte range, not as whole chunks through zarr
    ranges = store._row_gather().ranges
    assert ranges is not None and (ranges.requests, ranges.bytes_fetched) == (6, 23 * DIM * 2)  # a range a chunk, once
    keys = np.concatenate([k for k, _ in store.iter_batches(batch_size=4)])
    assert len(keys) == 28
    assert verify_store(store).ok
    fs = fsspec.filesystem("memory")
    assert fs.exists(memory_url.removeprefix("memory:/") + "/zarr.json")


def test_memory_url_crash_states_by_heartbeat(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TeacherStore.create(memory_url, make_spec(DIM))
    rows = make_rows(10, DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows[:7].args())
    w.flush()
    w.append(*rows[7:].args())  # row 7 fills chunk 1 and is flushed with it; rows 8, 9 are not
    assert w.rows_flushed == 8
    assert store.uncommitted_segments() == [(w.seg_id, "active")]  # fresh heartbeat
    assert gc_store(store) == []
    assert w._beat is not None and w._beat.running  # a remote writer beats from a thread
    w._beat.stop()  # as if its process were killed: no more beats, nothing marked closed
    monkeypatch.setattr(store.loc, "stale_after", 0.0)  # and its last beat is old enough now
    assert store.uncommitted_segments() == [(w.seg_id, "abandoned")]
    assert store.salvage() == [(w.seg_id, 8)]
    np.testing.assert_array_equal(store.get(rows.keys[:8]), rows.vectors[:8])
    assert not store.contains(rows.keys[8:]).any()
    assert verify_store(store).ok


def test_memory_url_errors(memory_url: str) -> None:
    from storage import StoreExistsError, StoreNotFoundError

    with pytest.raises(StoreNotFoundError, match=r"No teacher store at 'memory://"):
        TeacherStore.open(memory_url)
    TeacherStore.create(memory_url, make_spec(DIM))
    with pytest.raises(StoreExistsError, match="already exists and is not empty"):
        TeacherStore.create(memory_url, make_spec(DIM))


def test_file_url_reads_the_same_through_zarr(
    tmp_path: Path, zarr_reads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = (tmp_path / "s").as_uri()
    assert url.startswith("file://")
    store = TeacherStore.create(url, make_spec(DIM))
    assert store.loc.is_local
    rows = make_rows(11, DIM)
    write_rows(store, rows, batches=(5,))
    mapped = TeacherStore.open(url).get(rows.keys)
    assert zarr_reads == []  # a local store memory-maps its chunks
    monkeypatch.setattr(segment_reader, "_is_plain_layout", lambda meta, chunk_rows: False)
    via_zarr = TeacherStore.open(url).get(rows.keys)
    assert sorted(zarr_reads) == [0, 1, 2]
    np.testing.assert_array_equal(mapped, rows.vectors)
    np.testing.assert_array_equal(via_zarr, rows.vectors)
