"""KeyIndex lookups and RowGather, through both gather paths (row-by-row copies and grouped np.take)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import storage.index as index_module
from storage import TeacherStore
from storage.index import KeyIndex, RowGather
from storage.keys import as_key_array
from tests.storage.rows import make_rows, write_rows


@pytest.fixture(params=["row_copy", "grouped"])
def gather_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once through each gather path, whatever the row size."""
    monkeypatch.setattr(index_module, "ROW_COPY_MIN_BYTES", 0 if request.param == "row_copy" else 1 << 62)
    return request.param


def _gather_over(chunks: list[np.ndarray], sizes: list[int]) -> tuple[RowGather, np.ndarray]:
    """A RowGather over ``chunks`` whose last rows past ``sizes`` are padding, and the rows it should serve."""
    starts = np.cumsum([0, *sizes[:-1]])
    loads: list[int] = []
    gather = RowGather(starts, lambda i: loads.append(i) or chunks[i], chunks[0].shape[1], chunks[0].dtype)
    gather.loads = loads  # type: ignore[attr-defined]
    return gather, np.concatenate([c[:n] for c, n in zip(chunks, sizes, strict=True)])


def _chunks(dim: int, dtype: str = "float16") -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(7)
    sizes = [4, 3, 4, 1, 4]  # two segments' worth: partial chunks in the middle, as in a store
    return [rng.standard_normal((4, dim)).astype(dtype) for _ in sizes], sizes


@pytest.mark.parametrize("dim", [8, 600])
def test_gather_random_rows_in_request_order(gather_path: str, dim: int) -> None:
    chunks, sizes = _chunks(dim)
    gather, flat = _gather_over(chunks, sizes)
    gids = np.random.default_rng(0).integers(0, len(flat), size=50)
    np.testing.assert_array_equal(gather.gather(gids), flat[gids])
    np.testing.assert_array_equal(gather.gather(gids[::-1].copy()), flat[gids[::-1]])
    assert sorted(set(gather.loads)) == [0, 1, 2, 3, 4] and len(gather.loads) == 5  # each chunk loaded once


def test_gather_within_one_chunk_and_empty(gather_path: str) -> None:
    chunks, sizes = _chunks(8)
    gather, flat = _gather_over(chunks, sizes)
    np.testing.assert_array_equal(gather.gather(np.array([9, 8, 10, 8])), flat[[9, 8, 10, 8]])
    assert gather.gather(np.array([], dtype=np.int64)).shape == (0, 8)
    assert gather.loads == [2]


@pytest.mark.parametrize("dim", [8, 600])
def test_gather_into_out_buffers(gather_path: str, dim: int) -> None:
    chunks, sizes = _chunks(dim)
    gather, flat = _gather_over(chunks, sizes)
    gids = np.array([15, 0, 7, 11, 3, 12, 4])
    out = np.full((7, dim), np.nan, dtype=np.float16)
    assert gather.gather(gids, out=out) is out
    np.testing.assert_array_equal(out, flat[gids])
    out32 = np.empty((7, dim), dtype=np.float32)  # converted on the way
    np.testing.assert_array_equal(gather.gather(gids, out=out32), flat[gids].astype(np.float32))
    wide = np.zeros((7, dim + 5), dtype=np.float16)  # a strided (non-contiguous) destination
    gather.gather(gids, out=wide[:, 2 : dim + 2])
    np.testing.assert_array_equal(wide[:, 2 : dim + 2], flat[gids])
    assert not wide[:, :2].any() and not wide[:, dim + 2 :].any()


def test_gather_float32_chunks(gather_path: str) -> None:
    chunks, sizes = _chunks(300, "float32")
    gather, flat = _gather_over(chunks, sizes)
    gids = np.arange(len(flat))[::-1].copy()
    np.testing.assert_array_equal(gather.gather(gids), flat[gids])


def test_store_gather_paths_agree_at_teacher_width(gather_path: str, new_store: Callable[..., TeacherStore]) -> None:
    """512-d float16 rows (1 KiB) through the store: two segments, partial last chunks, memory maps."""
    store = new_store(512)
    a, b = make_rows(21, 512, prefix="a"), make_rows(10, 512, prefix="b")
    write_rows(store, a, chunk_rows=8, batches=(5,))
    write_rows(store, b, chunk_rows=4)
    store.refresh()
    keys = np.concatenate([a.keys, b.keys])
    vectors = np.concatenate([a.vectors, b.vectors])
    pick = np.random.default_rng(5).integers(0, 31, size=64)
    np.testing.assert_array_equal(store.get(keys[pick]), vectors[pick])
    out = np.empty((64, 512), np.float32)
    store.get_rows(store.locate(keys[pick]), out=out)
    np.testing.assert_array_equal(out, vectors[pick].astype(np.float32))


def test_key_index_first_segment_wins_and_counts_duplicates() -> None:
    k = make_rows(6, 4).keys
    seg0 = (k[[0, 1, 2]], np.array([0, 1, 2]), np.array([0, 0, 1], np.uint8), np.array([5, 6, 7], np.int32))
    seg1 = (k[[3, 1, 4, 2]], np.array([3, 4, 5, 6]), np.zeros(4, np.uint8), np.zeros(4, np.int32))
    index = KeyIndex.build([seg0, seg1])
    assert len(index) == 5 and index.duplicates == 2
    np.testing.assert_array_equal(index.locate(k), [0, 1, 2, 3, 5, -1])
    np.testing.assert_array_equal(index.contains(k), [True] * 5 + [False])
    nul = as_key_array([b"\x09" * 8 + b"\x00" * 8])
    assert index.locate(nul).tolist() == [-1]
    empty = KeyIndex.build([])
    assert len(empty) == 0 and empty.locate(k).tolist() == [-1] * 6 and not empty.contains(k).any()
