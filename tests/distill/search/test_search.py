"""distill.search.search: chunked exact search equals a dense q @ P.T + topk, with trec_eval-consistent ties."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from distill.evaluate.metrics import metrics_from_topk, trec_tie_priority
from distill.search.search import exact_search, faiss_search
from storage.errors import DdxError, DimensionMismatchError

N, DIM, NQ, K = 203, 24, 17, 25
CHUNKS = (1, 7, 64, N, N + 5)
KINDS = ("numpy", "tensor", "memmap16", "iterable", "callable")
# One-row chunks (203 steps) only for an array and a stream: they are the slow cases.
SOURCE_CASES = [(kind, c) for kind in KINDS for c in CHUNKS if c > 1 or kind in ("numpy", "iterable")]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((NQ, DIM), dtype=np.float32), rng.standard_normal((N, DIM), dtype=np.float32)


def dense_topk(q: np.ndarray, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    top = torch.topk(torch.from_numpy(q) @ torch.from_numpy(p.astype(np.float32)).T, k, dim=1)
    return top.values.numpy(), top.indices.numpy()


def trec_reference(scores: np.ndarray, priority: np.ndarray, k: int) -> np.ndarray:
    """Top-k columns of a full score matrix: score descending, then priority descending."""
    order = np.lexsort((np.broadcast_to(priority, scores.shape), scores), axis=-1)[:, ::-1]
    return order[:, :k]


def assert_same_topk(got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    """Scores equal to 1e-5 position by position; documents equal as sets except near-ties at the k-th place."""
    (s, i), (rs, ri) = got, ref
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == rs.shape
    np.testing.assert_allclose(s, rs, atol=1e-5)
    for row in range(len(i)):
        for j in set(i[row]) ^ set(ri[row]):
            col = np.flatnonzero((i[row] == j) | (ri[row] == j))[0]
            assert abs(max(s[row, col], rs[row, col]) - rs[row, -1]) <= 1e-5, (row, j)


def as_source(kind: str, p: np.ndarray, tmp_path: Path) -> Any:
    """The passages as each supported input kind."""
    if kind == "numpy":
        return p
    if kind == "tensor":
        return torch.from_numpy(p)
    if kind == "memmap16":
        mm = np.memmap(tmp_path / "p.f16", dtype=np.float16, mode="w+", shape=p.shape)
        mm[:] = p
        mm.flush()
        return np.memmap(tmp_path / "p.f16", dtype=np.float16, mode="r", shape=p.shape)
    blocks = [p[:50], torch.from_numpy(p[50:51]), p[51:]]  # uneven blocks, mixed types
    if kind == "iterable":
        return iter(blocks)
    return lambda: iter(blocks)


@pytest.mark.parametrize(("kind", "chunk_size"), SOURCE_CASES)
def test_exact_search_equals_dense(data: tuple, tmp_path: Path, kind: str, chunk_size: int) -> None:
    q, p = data
    source = as_source(kind, p, tmp_path)
    expected_p = p.astype(np.float16).astype(np.float32) if kind == "memmap16" else p
    query_block = 5 if chunk_size > 1 else None  # several query blocks, except in the 203-step case
    got = exact_search(q, source, K, chunk_size=chunk_size, query_block=query_block, device="cpu")
    assert_same_topk(got, dense_topk(q, expected_p, K))


def test_default_blocks_and_normalize(data: tuple) -> None:
    q, p = data
    got = exact_search(q, p, K, normalize=True)
    qn, pn = q / np.linalg.norm(q, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
    assert_same_topk(got, dense_topk(qn, pn, K))
    assert np.all(got[0] <= 1 + 1e-6)


def test_k_larger_than_corpus_is_clamped_with_a_warning(data: tuple) -> None:
    q, p = data
    with pytest.warns(UserWarning, match=r"k=500 exceeds the corpus size \(203 passages\); returning 203"):
        scores, idx = exact_search(q, p, 500, chunk_size=50, device="cpu")
    assert scores.shape == idx.shape == (NQ, N)
    assert_same_topk((scores, idx), dense_topk(q, p, N))
    with pytest.warns(UserWarning, match="exceeds the corpus size"):
        empty = exact_search(q, p[:0], 5, device="cpu")
    assert empty[0].shape == empty[1].shape == (NQ, 0)


def test_numpy_integer_arguments_and_list_blocks(data: tuple) -> None:
    q, p = data
    k: Any = np.int64(K)  # numpy integers (e.g. from a config array) are accepted
    chunk: Any = np.int32(64)
    got = exact_search(q, [p[:100].tolist(), p[100:]], k, chunk_size=chunk, device="cpu")
    assert_same_topk(got, dense_topk(q, p, K))


def test_no_queries(data: tuple) -> None:
    scores, idx = exact_search(data[0][:0], data[1], K, chunk_size=50, device="cpu")
    assert scores.shape == idx.shape == (0, K)


@pytest.mark.parametrize("chunk_size", (1, 3, 10, 60, 1000))
@pytest.mark.parametrize("custom_priority", [False, True])
def test_ties_follow_the_priority_rule(chunk_size: int, custom_priority: bool) -> None:
    """Integer vectors give exact float ties; selection at the k-th place and order follow (score, priority)."""
    rng = np.random.default_rng(chunk_size)
    q = rng.integers(-2, 3, (9, 5)).astype(np.float32)
    p = rng.integers(-2, 3, (60, 5)).astype(np.float32)
    priority = rng.permutation(60) if custom_priority else -np.arange(60)
    for k in (1, 4, 17, 60):
        scores, idx = exact_search(
            q, p, k, chunk_size=chunk_size, query_block=4, device="cpu",
            tie_priority=priority if custom_priority else None,
        )  # fmt: skip
        expected = trec_reference(q @ p.T, priority, k)
        np.testing.assert_array_equal(idx, expected)
        np.testing.assert_array_equal(scores, np.take_along_axis(q @ p.T, expected, axis=1))


def test_trec_priority_makes_topk_equal_trec_eval_on_the_full_run() -> None:
    """With trec_tie_priority the top k is trec_eval's top k of the whole ranking: its metrics at cut-offs ≤ k equal
    pytrec_eval's on the complete run. The default tie rule (earlier passage first) does not: ties straddle k."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(7)
    docs = [f"d{i}" for i in rng.permutation(80)]
    q = rng.integers(0, 2, (12, 4)).astype(np.float32)
    p = rng.integers(0, 2, (80, 4)).astype(np.float32)  # 16 distinct vectors: every score is a big tie
    qids = [f"q{i}" for i in range(12)]
    qrels = {qid: {d: int(rng.integers(0, 3)) for d in rng.choice(docs, 10, replace=False)} for qid in qids}
    full = q @ p.T
    full_run = {qid: dict(zip(docs, map(float, row), strict=True)) for qid, row in zip(qids, full, strict=True)}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10,20", "recall.10,20"})
    reference = evaluator.evaluate(full_run)
    names = {"nDCG@10": "ndcg_cut_10", "nDCG@20": "ndcg_cut_20", "Recall@10": "recall_10", "Recall@20": "recall_20"}
    for priority, agrees in ((trec_tie_priority(docs), True), (None, False)):
        scores, idx = exact_search(q, p, 20, chunk_size=7, device="cpu", tie_priority=priority)
        fast = metrics_from_topk(qrels, qids, docs, idx, scores, k_values=(10, 20))
        same = [fast.per_query[qid][ours] == pytest.approx(reference[qid][theirs], abs=1e-12)
                for qid in qids for ours, theirs in names.items()]  # fmt: skip
        assert all(same) if agrees else not all(same)


class _MaxTensorSize(TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded_by_blocks_not_corpus() -> None:
    """No tensor grows with N: the largest is a chunk (chunk × dim) or a score block (query_block × chunk)."""
    rng = np.random.default_rng(3)
    q, p = rng.standard_normal((16, 8), dtype=np.float32), rng.standard_normal((4000, 8), dtype=np.float32)
    chunks_alive = []

    def blocks() -> Iterator[np.ndarray]:
        for s in range(0, len(p), 500):
            chunks_alive.append(s)
            yield p[s : s + 500]

    with _MaxTensorSize() as probe:
        got = exact_search(q, blocks, 10, chunk_size=100, query_block=4, device="cpu")
    assert probe.largest <= max(100 * 8, 4 * 100, 16 * 8)  # vs 16 × 4000 for a dense score matrix
    assert len(chunks_alive) == 8
    assert_same_topk(got, dense_topk(q, p, 10))


@pytest.mark.parametrize(
    ("queries", "passages", "kwargs", "error", "match"),
    [
        (np.ones(4), np.ones((3, 4)), {}, DimensionMismatchError, r"queries must be 2-D"),
        (np.ones((2, 4)), np.ones((3, 5)), {}, DimensionMismatchError, r"5-d but queries are 4-d"),
        (np.ones((2, 4)), [np.ones(4)], {}, DimensionMismatchError, r"blocks must be 2-D"),
        (np.ones((2, 4)), np.ones((3, 4)), {"k": 0}, DdxError, r"positive integers.*'k': 0"),
        (np.ones((2, 4)), np.ones((3, 4)), {"k": True}, DdxError, r"'k': True"),
        (np.ones((2, 4)), np.ones((3, 4)), {"chunk_size": 0}, DdxError, r"'chunk_size': 0"),
        (np.ones((2, 4)), np.ones((3, 4)), {"query_block": -1}, DdxError, r"'query_block': -1"),
        (np.ones((2, 4)), 5, {}, DdxError, r"passages must be an array.*got int"),
        (np.ones((2, 4)), np.ones((3, 4)), {"tie_priority": np.arange(2)}, DdxError, r"tie_priority has 2 entries"),
    ],
)
def test_exact_search_errors(queries: Any, passages: Any, kwargs: dict, error: type, match: str) -> None:
    kwargs = {"k": 2, "device": "cpu"} | kwargs
    with pytest.raises(error, match=match):
        exact_search(queries, passages, **kwargs)


# --- FAISS --------------------------------------------------------------------------------------------------------


def test_faiss_flat_equals_exact(data: tuple) -> None:
    pytest.importorskip("faiss")
    q, p = data
    assert_same_topk(faiss_search(q, p, K, chunk_size=50), exact_search(q, p, K, device="cpu"))
    with pytest.warns(UserWarning, match="exceeds the corpus size"):
        assert faiss_search(q, p, 500)[0].shape == (NQ, N)


def test_faiss_ivf_with_all_lists_probed_is_exact_and_hnsw_is_close(data: tuple) -> None:
    pytest.importorskip("faiss")
    q, p = data
    exact = exact_search(q, p, K, device="cpu", normalize=True)
    assert_same_topk(faiss_search(q, p, K, index="ivf", nlist=8, nprobe=8, normalize=True), exact)
    scores, idx = faiss_search(q, p, K, index="hnsw", normalize=True)
    overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(idx, exact[1], strict=True)])
    assert overlap > 0.9 and np.all(np.diff(scores, axis=1) <= 0)


def test_faiss_errors(data: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    with pytest.raises(DdxError, match="Unknown FAISS index 'lsh'"):
        faiss_search(data[0], data[1], 3, index="lsh")
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(DdxError, match=r'pip install "ddx\[faiss\]"'):
        faiss_search(data[0], data[1], 3)


# --- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_equals_cpu_and_half_precision_is_close(data: tuple, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, p = data
    cpu = exact_search(q, p, K, chunk_size=64, device="cpu")
    p16 = as_source("memmap16", p, tmp_path)
    assert_same_topk(exact_search(q, p16, K, chunk_size=64), dense_topk(q, np.asarray(p16, np.float32), K))
    assert_same_topk(exact_search(q, p, K, chunk_size=64, device="cuda"), cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores, _ = exact_search(q, torch.from_numpy(p).cuda(), K, chunk_size=64, score_dtype=torch.bfloat16)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, cpu[0], atol=0.1 * np.abs(cpu[0]).max())
