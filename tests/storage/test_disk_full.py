"""A full disk while writing: DiskFullError that says what is safe, and a salvage that keeps the flushed rows."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr.storage._local as zarr_local

from storage import DdxError, DiskFullError, TeacherStore, segment_format, verify_store
from storage.fs import Location
from tests.storage.rows import make_rows, write_rows

DIM = 16
SAFE = r"rows of this run are saved, committed segments are untouched\. Free space and rerun the same command"


@pytest.fixture
def store(new_store: Callable[..., TeacherStore]) -> TeacherStore:
    """A store with one committed segment of 9 'old' rows."""
    store = new_store(DIM)
    write_rows(store, make_rows(9, DIM, prefix="old"))
    store.refresh()
    return store


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Append a path fragment: from then on, writes whose path contains it fail with ENOSPC; clear() frees space.

    Array metadata goes through zarr's LocalStore (``zarr.storage._local._put``), index.parquet through
    ``open`` in ``storage.segment_format`` (streamed), everything else (chunk files included) through
    ``Location.write_atomic``; all three are patched.
    """
    fragments: list[str] = []
    put, write_atomic = zarr_local._put, Location.write_atomic

    def check(path: str) -> None:
        if any(f in path for f in fragments):
            raise OSError(errno.ENOSPC, "No space left on device", path)

    def fake_put(path: Path, value: object, exclusive: bool = False) -> int:
        check(str(path))
        return put(path, value, exclusive=exclusive)

    def fake_write_atomic(self: Location, data: bytes, *parts: str, sync: bool = True) -> None:
        check(self.join(*parts))
        write_atomic(self, data, *parts, sync=sync)

    def fake_open(file: object, *args: Any, **kwargs: Any) -> Any:  # index.parquet is streamed to a temp file
        check(str(file))
        return open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(zarr_local, "_put", fake_put)
    monkeypatch.setattr(Location, "write_atomic", fake_write_atomic)
    monkeypatch.setattr(segment_format, "open", fake_open, raising=False)
    yield fragments


def _old_rows_still_read(store: TeacherStore) -> None:
    old = make_rows(9, DIM, prefix="old")
    fresh = TeacherStore.open(store.url)
    np.testing.assert_array_equal(fresh.get(old.keys), old.vectors)


def test_chunk_write_fails(store: TeacherStore, full_disk: list[str]) -> None:
    rows = make_rows(20, DIM)
    message = rf"Disk full while writing segment '.*' of store '.*': 6 {SAFE}"
    with pytest.raises(DiskFullError, match=message), store.writer(chunk_rows=4, flush_seconds=3600) as w:
        w.append(*rows[:6].args())
        w.flush()  # rows 0-5 are on disk and indexed
        full_disk.append("/vectors/c/")
        w.append(*rows[6:20].args())  # chunk 1 fills: its write fails
    _old_rows_still_read(store)
    full_disk.clear()  # space freed
    assert store.salvage() == [(w.seg_id, 6)]
    np.testing.assert_array_equal(store.get(rows.keys[:6]), rows.vectors[:6])
    assert not store.contains(rows.keys[6:]).any()
    assert verify_store(store).ok


def test_index_part_write_fails(store: TeacherStore, full_disk: list[str]) -> None:
    rows = make_rows(12, DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows[:5].args())  # chunk 0 flushed
    full_disk.append("/parts/")
    with pytest.raises(DiskFullError, match=rf": 4 {SAFE}") as info:
        w.append(*rows[5:12].args())  # chunk 1's vectors reach disk, its index part does not
    assert isinstance(info.value, OSError) and isinstance(info.value, DdxError)
    assert info.value.__cause__ is not None and info.value.__cause__.errno == errno.ENOSPC
    w.abort()
    full_disk.clear()
    _old_rows_still_read(store)
    assert store.salvage() == [(w.seg_id, 4)]  # rows without an index part do not count
    np.testing.assert_array_equal(store.get(rows.keys[:4]), rows.vectors[:4])
    assert verify_store(store).ok


def test_commit_write_fails(store: TeacherStore, full_disk: list[str]) -> None:
    rows = make_rows(7, DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows.args())
    w.flush()
    full_disk.append("index.parquet")
    with pytest.raises(DiskFullError, match=rf": 7 {SAFE}"):
        w.commit()
    w.abort()
    assert not store.loc.exists("segments", w.seg_id, "COMMIT")
    full_disk.clear()
    assert store.salvage() == [(w.seg_id, 7)]
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)


def test_write_atomic_maps_enospc_and_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loc = Location(tmp_path)
    loc.write_atomic(b"old", "f.json")

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(DiskFullError, match=r"Disk full while writing '.*f\.json'"):
        loc.write_atomic(b"new", "f.json")
    assert (tmp_path / "f.json").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temp file left behind
