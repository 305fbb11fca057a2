"""What each mode searches: the student corpus spilled to an unnamed temp file (bounded memory, nothing left
behind), stored teacher passages read in store-row order; either way the search results of the in-memory,
document-order inputs."""

from __future__ import annotations

import os
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from distill.evaluate.inputs import SetVectors, SpilledVectors, _student_corpus, mode_inputs
from distill.evaluate.metrics import trec_tie_priority
from distill.search.search import exact_search
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.storage.rows import make_spec


class Corpus:
    """An eval set's corpus stand-in: ``n`` documents whose texts are their numbers, ``block`` a block."""

    def __init__(self, n: int, block: int = 1000) -> None:
        self.doc_ids, self.block = np.array([f"d{i}" for i in range(n)]), block

    def doc_text_blocks(self, size: int = 0) -> Iterator[list[str]]:
        for s in range(0, len(self.doc_ids), self.block):
            yield [str(i) for i in range(s, min(s + self.block, len(self.doc_ids)))]


class Encoder:
    """Small-integer vectors made from the text (exact ties abound); a fixed linear projection; fails on demand."""

    def __init__(self, dim: int = 6, fail_at: int | None = None) -> None:
        self.dim, self.fail_at, self.calls = dim, fail_at, 0
        self.model = np.random.default_rng(1).integers(-1, 2, (dim, 3)).astype(np.float32)

    def student_vectors(self, texts: list[str], role: str) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("encoder crashed")
        seeds = np.array([int(t) for t in texts], dtype=np.int64)[:, None] * np.arange(1, self.dim + 1)
        return (seeds % 3 - 1).astype(np.float32)

    def project_blocks(self, vectors: np.ndarray, rows: int = 7) -> Iterator[np.ndarray]:
        for s in range(0, len(vectors), rows):
            yield vectors[s : s + rows] @ self.model


def test_modes_search_the_spilled_corpus_as_they_searched_it_in_memory() -> None:
    """Student and projected: the same scores and documents, ties (trec order) included, as the in-RAM array."""
    es, enc = Corpus(530, block=100), Encoder()
    in_memory = np.concatenate([enc.student_vectors(t, "passage") for t in es.doc_text_blocks()])
    v = SetVectors(in_memory[:9] + 0.5, _student_corpus(es, enc))  # type: ignore[arg-type]
    v.q_p = v.q_s @ enc.model
    assert len(v.student_corpus()) == 530
    np.testing.assert_array_equal(v.student_corpus()[np.array([0, 529, 7])], in_memory[[0, 529, 7]])
    old = {"student": (v.q_s, in_memory), "projected": (v.q_p, lambda: enc.project_blocks(in_memory))}
    for mode, (queries, passages) in old.items():
        new_q, new_p = mode_inputs(mode, v, enc)  # type: ignore[arg-type]
        kwargs = {"chunk_size": 64, "device": "cpu", "tie_priority": trec_tie_priority(es.doc_ids)}
        want = exact_search(queries, passages, 40, **kwargs)  # type: ignore[arg-type]
        got = exact_search(new_q, new_p, 40, **kwargs)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_encoding_memory_does_not_grow_with_the_corpus() -> None:
    """Doubling the corpus (20k → 40k passages of 64-d) leaves the traced peak within a quarter of the extra 20k
    vectors' float32 size: one array of the whole corpus grew it by all of it (5 MB)."""
    dim = 64

    def peak(n: int) -> int:
        es, enc = Corpus(n), Encoder(dim)
        tracemalloc.start()
        try:
            spilled = _student_corpus(es, enc)  # type: ignore[arg-type]
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert len(spilled) == n

    small, large = peak(20_000), peak(40_000)
    assert large - small < 0.25 * 20_000 * dim * 4, (small, large)


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_the_spilled_file_is_freed_after_an_error_and_never_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _open_files()
    with pytest.raises(RuntimeError, match="encoder crashed"):
        _student_corpus(Corpus(5000), Encoder(fail_at=3))  # type: ignore[arg-type]
    assert _open_files() == before, "the file of the two encoded blocks is closed (and so freed) at once"
    spilled = _student_corpus(Corpus(5000), Encoder())  # type: ignore[arg-type]
    assert _open_files() == before + 1 and list(tmp_path.iterdir()) == [], "open, but with no name to leave behind"
    spilled.close()
    assert _open_files() == before


def test_spilled_vectors_read_back_in_blocks_and_by_index() -> None:
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    spilled = SpilledVectors(3)
    assert len(spilled) == 0 and list(spilled.blocks()) == [] and spilled[np.array([], np.int64)].shape == (0, 3)
    spilled.append(rows[:4])
    spilled.append(rows[4:].astype(np.float64))
    assert [b.shape[0] for b in spilled.blocks(4)] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(list(spilled.blocks(4))), rows)
    np.testing.assert_array_equal(spilled[np.array([9, 0, 9])], rows[[9, 0, 9]])
    with pytest.raises(IndexError, match=r"row indices must be in 0\.\.9, got 3\.\.10"):
        spilled[np.array([3, 10])]


class CutEncoder:
    """A ``--projection none`` run's stand-in: its hybrid searches the teacher's first 3 dims."""

    teacher_dims = 3


@pytest.mark.parametrize("mode", ["teacher", "hybrid"])
def test_teacher_passages_are_read_in_row_order_and_rank_as_in_document_order(tmp_path: Path, mode: str) -> None:
    """Documents listed in a random row order (one text twice): the store is read ascending, and the search
    (trec ties) equals one over the passages gathered in document order, the path before row-order reads."""
    rng = np.random.default_rng(2)
    keys = content_keys(["query"] * 5 + ["passage"] * 300, [f"t{i}" for i in range(305)])
    store = TeacherStore.create(tmp_path / "s", make_spec(6, normalize=False), dtype="float16")
    # A signed one-hot, then three ±1: length 2, and 1 cut to 3 dims. Normalised scores are then exact (sums of
    # quarters, or one product), so they tie exactly and never differ in the last bit with their place in a matmul.
    vectors = np.c_[np.eye(3)[rng.integers(0, 3, 305)] * rng.choice([-1, 1], (305, 1)), rng.choice([-1, 1], (305, 3))]
    vectors = vectors.astype(np.float16)
    with store.writer(chunk_rows=32) as w:
        w.append(keys, vectors, np.r_[np.ones(5), np.zeros(300)].astype(np.uint8), np.ones(305, np.int32))
    store.refresh()
    rows_d = np.r_[5 + rng.permutation(300), 9]
    ids = np.array([f"d{i}" for i in rng.permutation(len(rows_d))])
    v = SetVectors(np.zeros((5, 2), np.float32), None, None, store, np.arange(5), rows_d)
    v.q_p = rng.integers(-2, 3, (5, 3)).astype(np.float32)
    queries, passages = mode_inputs(mode, v, CutEncoder())  # type: ignore[arg-type]
    in_order = store.get_rows(rows_d, dtype="float32")
    old_q, old_p = (store.get_rows(np.arange(5), dtype="float32"), in_order) if mode == "teacher" else (
        v.q_p, in_order[:, :3])  # fmt: skip
    kwargs = {"chunk_size": 40, "device": "cpu", "normalize": True, "tie_priority": trec_tie_priority(ids)}
    want = exact_search(old_q, old_p, 50, **kwargs)  # type: ignore[arg-type]
    got = exact_search(queries, passages, 50, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert np.array_equal(passages.order, np.argsort(rows_d, kind="stable")), "read ascending by store row"
