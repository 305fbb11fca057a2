"""Write → commit → reopen → read, through every read path, and zarr-python reading the same bytes."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from storage import ROLES, MissingVectorsError, TeacherStore, content_keys, default_chunk_rows, verify_store
from tests.storage.rows import Rows, make_rows, vectors_for, write_rows

DIM = 16


def _append_in_uneven_batches(store: TeacherStore, rows: Rows) -> None:
    """Batches of 3, 1, 6, 9, 4 and the rest into 4-row chunks, with explicit flushes in between."""
    w = store.writer(chunk_rows=4)
    cuts = [0, 3, 4, 10, 19, 23, len(rows)]
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        w.append(*rows[a:b].args())
        if i in (0, 2, 4):  # partial chunks: 3 rows, then 10 (2 in chunk 2), then 23 (3 in chunk 5)
            w.flush()
            assert w.rows_flushed == b
    w.flush()
    w.flush()  # a second flush with nothing new is a no-op
    assert w.commit() == len(rows)


def test_round_trip_multi_chunk(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = make_rows(30, DIM)
    _append_in_uneven_batches(store, rows)
    store = TeacherStore.open(store.url)
    assert len(store) == 30 and store.rows == 30
    seg = store.segments[0]
    assert seg.rows == 30 and seg.chunk_rows == 4 and seg.n_chunks == 8

    perm = np.random.default_rng(1).permutation(30)
    got = store.get(rows.keys[perm])
    assert got.dtype == np.float16 and got.shape == (30, DIM)
    np.testing.assert_array_equal(got, rows.vectors[perm])
    got32 = store.get(rows.keys[perm], dtype="float32")
    assert got32.dtype == np.float32
    np.testing.assert_array_equal(got32, rows.vectors[perm].astype(np.float32))

    gids = store.locate(rows.keys[perm])
    assert sorted(gids.tolist()) == list(range(30))
    np.testing.assert_array_equal(store.get_rows(gids), rows.vectors[perm])
    np.testing.assert_array_equal(store.get_rows(gids[:3]), rows.vectors[perm[:3]])  # may be one chunk or more
    np.testing.assert_array_equal(store.get_rows(gids[[5, 5, 5]]), rows.vectors[perm[[5, 5, 5]]])  # repeats
    assert store.get_rows(np.array([], dtype=np.int64)).shape == (0, DIM)

    index = store.index
    order = np.argsort(rows.keys)
    np.testing.assert_array_equal(index.roles[np.argsort(index.keys)], rows.roles[order])
    np.testing.assert_array_equal(index.n_tokens, rows.n_tokens[order])


def test_time_based_flush(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = make_rows(7, DIM)
    w = store.writer(chunk_rows=4, flush_seconds=0)
    w.append(*rows[:1].args())
    assert w.rows_flushed == 1  # flush_seconds=0: every append reaches disk
    w.append(*rows[1:6].args())
    assert w.rows_flushed == 6
    w.append(*rows[6:].args())
    assert w.rows_flushed == 7
    w.commit()
    store.refresh()
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    lazy = store.writer(chunk_rows=4, flush_seconds=3600)
    lazy.append(*make_rows(2, DIM, prefix="lazy").args())
    assert lazy.rows_flushed == 0  # nothing due yet
    lazy.abort()


def test_contains_len_and_missing(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = make_rows(10, DIM)
    write_rows(store, rows, batches=(3,))
    store.refresh()
    others = make_rows(5, DIM, prefix="absent")
    mask = store.contains(np.concatenate([rows.keys, others.keys]))
    assert mask[:10].all() and not mask[10:].any()
    assert (store.locate(others.keys) == -1).all()
    assert len(store) == 10
    with pytest.raises(MissingVectorsError, match=r"5 of 7 keys have no vector in store .*\(first: [0-9a-f]{32}\)"):
        store.get(np.concatenate([rows.keys[:2], others.keys]))
    with pytest.raises(KeyError):  # also a KeyError for callers that catch that
        store.get(others.keys[:1])


def test_get_rows_rejects_row_ids_outside_the_store(new_store: Callable[..., TeacherStore]) -> None:
    """-1 (what locate() returns for a missing key) must not silently read another row."""
    store = new_store(DIM)
    write_rows(store, make_rows(10, DIM))
    store.refresh()
    with pytest.raises(MissingVectorsError, match=r"1 of 2 row ids are outside 0\.\.9 .*-1 marks a key"):
        store.get_rows(np.array([0, -1]))
    with pytest.raises(MissingVectorsError, match="2 of 3 row ids are outside"):
        store.get_rows(np.array([10, 3, 11]))  # 10, 11: padding rows of the last chunk


def test_iter_batches_with_role_filter(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = make_rows(27, DIM)
    write_rows(store, rows, batches=(5, 11))
    store.refresh()
    for role in (None, *ROLES):
        seen_keys, seen_vecs = [], []
        for keys, vecs in store.iter_batches(batch_size=3, role=role):
            assert len(keys) == len(vecs) <= 3
            seen_keys.append(keys)
            seen_vecs.append(vecs)
        keys, vecs = np.concatenate(seen_keys), np.concatenate(seen_vecs)
        expected = np.ones(27, bool) if role is None else rows.roles == ROLES.index(role)
        assert expected.sum() > 0
        np.testing.assert_array_equal(keys, rows.keys[expected])  # in row order
        np.testing.assert_array_equal(vecs, vectors_for(keys, DIM))


def _raw_last_chunk(store: TeacherStore, seg_id: str, chunk: int, dtype: str) -> np.ndarray:
    """A format-3 segment's trimmed last chunk, read as what it is: its rows, then their CRC32C."""
    data = (store.loc.local_path("segments", seg_id, "vectors", "c", str(chunk), "0") or Path()).read_bytes()
    assert int.from_bytes(data[-4:], "little") == google_crc32c.value(data[:-4])
    return np.frombuffer(data[:-4], dtype=dtype).reshape(-1, DIM)


def test_zarr_python_reads_the_segment(new_store: Callable[..., TeacherStore]) -> None:
    """Any Zarr v3 implementation reads the vectors (here zarr-python, without ddx code), but for a format-3
    segment's partial last chunk, which holds its rows only (Zarr's regular grid pads it): raw rows + CRC32C."""
    store = new_store(DIM)
    rows = make_rows(30, DIM)
    _append_in_uneven_batches(store, rows)
    store.refresh()
    seg_id = store.segments[0].seg_id
    arr = zarr.open_array(str(store.loc.local_path("segments", seg_id, "vectors")), mode="r")
    assert arr.shape == (30, DIM) and arr.dtype == np.float16 and arr.chunks == (4, DIM)
    np.testing.assert_array_equal(arr[:28], rows.vectors[:28])
    np.testing.assert_array_equal(_raw_last_chunk(store, seg_id, 7, "<f2"), rows.vectors[28:])
    root = zarr.open_group(store.url, mode="r")
    assert root.attrs["ddx"]["fingerprint"] == store.fingerprint
    np.testing.assert_array_equal(root[f"segments/{seg_id}/vectors"][7:13], rows.vectors[7:13])


def test_float32_store(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM, dtype="float32")
    rows = make_rows(13, DIM, dtype="float32")
    write_rows(store, rows, batches=(6,))
    store = TeacherStore.open(store.url)
    assert store.dtype == "float32"
    got = store.get(rows.keys[::-1])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rows.vectors[::-1])
    np.testing.assert_array_equal(store.get(rows.keys, dtype="float16"), rows.vectors.astype(np.float16))
    seg_id = store.segments[0].seg_id
    arr = zarr.open_array(str(store.loc.local_path("segments", seg_id, "vectors")), mode="r")
    np.testing.assert_array_equal(arr[:12], rows.vectors[:12])
    np.testing.assert_array_equal(_raw_last_chunk(store, seg_id, 3, "<f4"), rows.vectors[12:])
    with pytest.raises(ValueError, match="Store dtype must be one of"):
        new_store(DIM, dtype="bfloat16")


def test_all_zero_chunks_are_written(new_store: Callable[..., TeacherStore]) -> None:
    """zarr skips chunks equal to the fill value unless told otherwise; the memory-mapped reader needs them."""
    store = new_store(DIM)
    keys = content_keys("passage", [f"z{i}" for i in range(10)])
    vectors = np.zeros((10, DIM), np.float16)
    vectors[4:8] = 1.5  # chunk 0 and chunk 2 are all zeros
    with store.writer(chunk_rows=4) as w:
        w.append(keys, vectors, np.zeros(10, np.uint8), np.ones(10, np.int32))
    store.refresh()
    np.testing.assert_array_equal(store.get(keys), vectors)
    assert verify_store(store).ok


def test_empty_segment_and_empty_store(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    assert len(store) == 0 and store.rows == 0
    assert not store.contains(make_rows(2, DIM).keys).any()
    assert store.writer(chunk_rows=4).commit() == 0
    store.refresh()
    assert len(store.segments) == 1 and len(store) == 0
    assert list(store.iter_batches()) == []


def test_refresh_keeps_earlier_views_valid(new_store: Callable[..., TeacherStore]) -> None:
    """refresh() used to close the chunk mmaps under views iter_batches had handed out (a segfault)."""
    store = new_store(DIM)
    rows = make_rows(9, DIM)
    write_rows(store, rows)
    store.refresh()
    batches = list(store.iter_batches(batch_size=100))
    store.get(rows.keys)
    store.refresh()
    store.refresh()
    np.testing.assert_array_equal(np.concatenate([v for _, v in batches]), rows.vectors)


def test_default_chunk_rows() -> None:
    assert default_chunk_rows(3584, "float16") == 4096
    assert default_chunk_rows(768, "float32") == 8192
    assert default_chunk_rows(4, "float16") == 1 << 16  # capped
    assert default_chunk_rows(1 << 20, "float32") == 256  # floored


def test_writer_rejects_wrong_shapes(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = make_rows(3, DIM)
    with store.writer(chunk_rows=4) as w:
        with pytest.raises(ValueError, match=r"expected vectors of shape \(3, 16\), got \(3, 8\)"):
            w.append(rows.keys, rows.vectors[:, :8], rows.roles, rows.n_tokens)
        w.append(*rows.args())
    store.refresh()
    assert len(store) == 3


def test_writer_context_manager_does_not_commit_on_error(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    with pytest.raises(RuntimeError, match="boom"), store.writer(chunk_rows=4) as w:
        w.append(*make_rows(6, DIM).args())
        raise RuntimeError("boom")
    store.refresh()
    assert store.segments == [] and [s for _, s in store.uncommitted_segments()] == ["abandoned"]


def test_commit_inside_with_block_is_not_undone(new_store: Callable[..., TeacherStore]) -> None:
    """An explicit commit() and then the with-exit's commit: the second used to rewrite the segment empty."""
    store = new_store(DIM)
    rows = make_rows(10, DIM)
    with store.writer(chunk_rows=4) as w:
        w.append(*rows.args())
        assert w.commit() == 10
    assert w.commit() == 10
    with pytest.raises(ValueError, match="is committed and immutable; append through a new writer"):
        w.append(*make_rows(2, DIM, prefix="late").args())
    store.refresh()
    assert len(store) == 10
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    assert verify_store(store).ok
