"""verify_store: a clean store passes; each kind of damage is reported with its segment and chunk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from storage import IntegrityError, TeacherStore, verify_store
from storage.segment import IndexColumns
from tests.storage.rows import make_rows, write_rows

DIM = 16
CHUNK_BYTES = 4 * DIM * 2 + 4  # 4 rows of float16 and the crc32c trailer


@pytest.fixture
def store(new_store: Callable[..., TeacherStore]) -> TeacherStore:
    store = new_store(DIM)
    write_rows(store, make_rows(10, DIM, prefix="a"))
    write_rows(store, make_rows(6, DIM, prefix="b"))
    store.refresh()
    return store


def _seg_id(store: TeacherStore, rows: int) -> str:
    """Id of the segment with ``rows`` rows (ids sort by time and a random suffix, not by write order)."""
    return next(s.seg_id for s in store.segments if s.rows == rows)


def _chunk_path(store: TeacherStore, rows: int, chunk: int) -> Path:
    return Path(store.url, "segments", _seg_id(store, rows), "vectors", "c", str(chunk), "0")


def test_clean_store_verifies(store: TeacherStore) -> None:
    report = verify_store(store)
    assert report.ok and report.problems == [] and report.notes == []
    assert (report.segments, report.rows, report.chunks) == (2, 16, 5)
    assert report.to_dict()["ok"] is True


def test_flipped_byte_in_a_chunk(store: TeacherStore) -> None:
    path = _chunk_path(store, 6, 1)
    data = bytearray(path.read_bytes())
    data[5] ^= 0x40
    path.write_bytes(bytes(data))
    report = verify_store(store)
    seg_id = _seg_id(store, 6)
    assert not report.ok and len(report.problems) == 1
    assert report.problems[0].startswith(f"segment {seg_id}: chunk 1 checksum mismatch")
    with pytest.raises(IntegrityError, match=rf"Segment '{seg_id}' of .*: chunk 1 checksum mismatch"):
        list(TeacherStore.open(store.url).iter_batches())  # sequential scans verify too


def test_truncated_chunk(store: TeacherStore) -> None:
    path = _chunk_path(store, 10, 2)
    path.write_bytes(path.read_bytes()[:50])
    report = verify_store(store)
    assert report.problems == [f"segment {_seg_id(store, 10)}: chunk 2 has 50 bytes, expected {CHUNK_BYTES}"]
    fresh = TeacherStore.open(store.url)
    gid = fresh.locate(make_rows(10, DIM, prefix="a").keys[8:9])  # a row of chunk 2
    with pytest.raises(IntegrityError, match=rf"has 50 bytes, expected {CHUNK_BYTES}\. Run 'ddx cache verify"):
        fresh.get_rows(gid)


def test_missing_chunk(store: TeacherStore) -> None:
    _chunk_path(store, 10, 0).unlink()
    assert verify_store(store).problems == [f"segment {_seg_id(store, 10)}: chunk 0 is missing"]


def test_tampered_index(store: TeacherStore) -> None:
    """A valid Parquet file with other content (two keys swapped) fails the COMMIT checksum."""
    seg = store.segments[0]
    path = Path(store.url, "segments", seg.seg_id, "index.parquet")
    cols = seg.index()
    keys = cols.keys.copy()
    keys[[0, 1]] = keys[[1, 0]]
    path.write_bytes(IndexColumns(keys, cols.rows, cols.roles, cols.n_tokens).to_parquet_bytes())
    problems = verify_store(store).problems
    assert problems == [f"segment {seg.seg_id}: index.parquet does not match the checksum in COMMIT"]


def test_unreadable_index_is_reported_not_raised(store: TeacherStore) -> None:
    path = Path(store.url, "segments", store.segments[0].seg_id, "index.parquet")
    path.write_bytes(path.read_bytes()[:-9])  # torn footer
    problems = verify_store(store).problems
    assert len(problems) == 2
    assert "checksum in COMMIT" in problems[0] and "index.parquet is unreadable" in problems[1]
    path.unlink()
    assert verify_store(store).problems == [f"segment {store.segments[0].seg_id}: index.parquet is missing"]


def test_missing_commit_hides_the_segment(store: TeacherStore) -> None:
    a = make_rows(10, DIM, prefix="a")
    seg_id, other = (s.seg_id for s in sorted(store.segments, key=lambda s: s.rows != 10))  # a's segment first
    Path(store.url, "segments", seg_id, "COMMIT").unlink()
    store.refresh()
    assert [s.seg_id for s in store.segments] == [other]
    assert len(store) == 6 and not store.contains(a.keys).any()
    assert store.uncommitted_segments() == [(seg_id, "abandoned")]
    report = verify_store(store)
    assert report.ok and report.segments == 1
    assert report.notes == [
        f"segment {seg_id} is uncommitted (left by a crashed run; the next precompute salvages it, "
        "'ddx cache gc' removes it)"
    ]
