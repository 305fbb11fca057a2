"""A corpus read in another order (a store's rows sorted by row) searches exactly like the corpus read in order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill.evaluate.metrics import trec_tie_priority
from distill.model.teacher_dims import truncate_teacher
from distill.search import search_inputs
from distill.search.search import exact_search, faiss_search
from distill.search.search_inputs import Reordered, store_blocks
from storage.errors import DdxError, MissingVectorsError
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.storage.rows import make_spec


def reordered(p: np.ndarray, order: np.ndarray, block: int) -> Reordered:
    """``p`` read as rows ``order``, ``block`` rows a block."""
    return Reordered(lambda: (p[order[s : s + block]] for s in range(0, len(order), block)), order)


@pytest.mark.parametrize("priority", ["default", "trec", "custom"])
@pytest.mark.parametrize("chunk_size", [7, 60, 500])
def test_a_reordered_corpus_ranks_exactly_as_the_corpus_in_order(priority: str, chunk_size: int) -> None:
    """Integer vectors tie everywhere: which tied documents make the top k, and their order, are unchanged."""
    rng = np.random.default_rng(chunk_size)
    q = rng.integers(-2, 3, (9, 5)).astype(np.float32)
    p = rng.integers(-2, 3, (200, 5)).astype(np.float32)
    ids = [f"d{i}" for i in rng.permutation(200)]
    tie_priority = {"default": None, "trec": trec_tie_priority(ids), "custom": rng.permutation(200)}[priority]
    order = rng.permutation(200)
    for k in (1, 13, 200):
        want = exact_search(q, p, k, chunk_size=chunk_size, query_block=4, device="cpu", tie_priority=tie_priority)
        got = exact_search(
            q, reordered(p, order, 33), k, chunk_size=chunk_size, query_block=4, device="cpu",
            tie_priority=tie_priority,
        )  # fmt: skip
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_faiss_maps_a_reordered_corpus_back_to_its_positions() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    q, p = rng.standard_normal((6, 8), dtype=np.float32), rng.standard_normal((90, 8), dtype=np.float32)
    want = faiss_search(q, p, 10, chunk_size=20)
    got = faiss_search(q, reordered(p, rng.permutation(90), 20), 10, chunk_size=20)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("source", "kwargs", "match"),
    [
        (Reordered(lambda: [np.ones((10, 4))], np.arange(10)), {"tie_priority": np.arange(3)},
         r"tie_priority has 3 entries but the corpus has 10 passages"),
        (Reordered(lambda: [np.ones((9, 4))], np.arange(10)), {}, r"A reordered corpus gave 9 rows for 10 positions"),
    ],
)  # fmt: skip
def test_reordered_errors(source: Reordered, kwargs: dict, match: str) -> None:
    with pytest.raises(DdxError, match=match):
        exact_search(np.ones((2, 4)), source, 2, device="cpu", **kwargs)


class SpyStore:
    """A store whose gathers and scans are recorded."""

    def __init__(self, store: TeacherStore) -> None:
        self.store, self.requests, self.scans, self.rows = store, [], 0, store.rows

    def get_rows(self, gids: np.ndarray, **kw: Any) -> np.ndarray:
        self.requests.append(np.asarray(gids).tolist())
        return self.store.get_rows(gids, **kw)

    def iter_batches(self, *args: Any, **kw: Any) -> Any:
        self.scans += 1
        return self.store.iter_batches(*args, **kw)


@pytest.fixture
def store(tmp_path: Path) -> TeacherStore:
    """120 rows in two segments (two writers), chunks of 16 rows."""
    rng = np.random.default_rng(0)
    keys = content_keys("passage", [f"p{i}" for i in range(120)])
    # Exact scores, so exact ties: small integers, and first three dims a signed one-hot (unit length once cut
    # to dims=3, exactly). Otherwise a passage's score may differ in its last bit with its place in the matmul,
    # as it does between chunk sizes.
    vectors = rng.integers(-2, 3, (120, 6)).astype(np.float16)
    vectors[:, :3] = np.eye(3)[rng.integers(0, 3, 120)] * rng.choice([-1, 1], (120, 1))
    s = TeacherStore.create(tmp_path / "s", make_spec(6, normalize=False), dtype="float16")
    for part in (slice(0, 70), slice(70, 120)):
        with s.writer(chunk_rows=16) as w:
            w.append(keys[part], vectors[part], np.zeros(len(keys[part]), np.uint8), np.ones(len(keys[part]), np.int32))
    s.refresh()
    assert len(s.segments) == 2
    return s


@pytest.mark.parametrize("read", ["gather", "scan"])
@pytest.mark.parametrize("dims", [None, 3])
def test_store_blocks_read_in_row_order_and_search_as_in_document_order(
    store: TeacherStore, monkeypatch: pytest.MonkeyPatch, dims: int | None, read: str
) -> None:
    """Documents in a random row order, one stored twice: the store is read ascending (sorted gathers, or one
    scan), in blocks of 25 either way, and the search (trec ties) equals one over the vectors gathered in document
    order."""
    monkeypatch.setattr(search_inputs, "SCAN_DENSITY", {"gather": 2.0, "scan": 0.0}[read])
    rng = np.random.default_rng(1)
    rows = np.r_[rng.permutation(120), 17]
    ids = [f"d{i}" for i in range(len(rows))]
    spy = SpyStore(store)
    source = store_blocks(spy, rows, 25, dims=dims)  # type: ignore[arg-type]
    assert [len(b) for b in source.blocks()] == [25] * 4 + [21]
    if read == "gather":
        assert [r for request in spy.requests for r in request] == sorted(rows.tolist()) and spy.scans == 0
    else:
        assert spy.requests == [] and spy.scans == 1
    q = rng.integers(-2, 3, (7, dims or 6)).astype(np.float32)
    got = exact_search(q, source, 30, chunk_size=10, device="cpu", tie_priority=trec_tie_priority(ids))
    in_order = truncate_teacher(store.get_rows(rows, dtype="float32"), dims)
    want = exact_search(q, in_order, 30, chunk_size=10, device="cpu", tie_priority=trec_tie_priority(ids))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_store_blocks_scan_a_store_for_a_large_share_of_its_rows(store: TeacherStore) -> None:
    """From SCAN_DENSITY of the store's rows up, one scan; below, gathers; a row the store lacks: get_rows's error."""
    spy = SpyStore(store)
    dense = np.arange(int(np.ceil(search_inputs.SCAN_DENSITY * 120)))
    for rows, scans in ((dense, 1), (dense[:-1], 0)):
        list(store_blocks(spy, rows).blocks())  # type: ignore[arg-type]
        assert spy.scans == scans
        spy.scans = 0
    with pytest.raises(MissingVectorsError, match=r"outside 0\.\.119"):
        list(store_blocks(spy, np.r_[np.arange(100), 120]).blocks())  # type: ignore[arg-type]


def test_a_reordered_corpus_is_read_through_its_blocks_only() -> None:
    """Not callable: nothing reads it as a plain block source and mistakes the read order for the corpus order."""
    source = reordered(np.eye(3, dtype=np.float32), np.array([2, 0, 1]), 2)
    assert not callable(source)
    blocks: Iterator[np.ndarray] = iter(source.blocks())
    np.testing.assert_array_equal(next(blocks), np.eye(3, dtype=np.float32)[[2, 0]])
