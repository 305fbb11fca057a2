"""Top-k search with a FAISS CPU index (the optional ``faiss`` extra): exact ``flat``, or ``ivf``/``hnsw``.

It reads passages through the same chunking as :func:`distill.search.search.exact_search` and returns the same
arrays, so the evaluator can switch between the two with one option.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.search.search_inputs import (
    Block,
    PassageSource,
    check_positive,
    chunk_tensor,
    clamp_k,
    corpus_positions,
    iter_chunks,
    query_tensor,
)
from storage.errors import DdxError

__all__ = ["FAISS_INDEXES", "faiss_search"]

FAISS_INDEXES = ("flat", "ivf", "hnsw")


def faiss_search(
    queries: Block,
    passages: PassageSource,
    k: int,
    *,
    index: str = "flat",
    normalize: bool = False,
    chunk_size: int = 50_000,
    nlist: int = 1024,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_search: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product with a FAISS CPU index (the ``faiss`` extra): exact ``flat``, or ``ivf``/``hnsw``.

    The index is built from ``passages`` block by block (float32 copies: FAISS keeps every vector in RAM). ``ivf``
    trains its ``nlist`` centroids on the first block (``nlist`` clamped to that block's rows). Approximate
    indexes may find fewer than k results: those slots hold index -1 and score -inf. Rows are best first; among
    equal scores, both which documents make the top k and their order are FAISS's (``exact_search`` takes a
    ``tie_priority``).

    Args:
        queries, passages, k, normalize, chunk_size: as ``exact_search``.
        index: ``"flat"`` (exact), ``"ivf"`` (IndexIVFFlat) or ``"hnsw"`` (IndexHNSWFlat).
        nlist, nprobe: IVF lists and lists probed per query.
        hnsw_m, ef_search: HNSW graph degree and search beam.

    Returns:
        ``(scores, indices)``: float32 and int64 ``[nq, min(k, N)]``, best first.

    Raises:
        DdxError: faiss is not installed (install the extra), ``index`` is unknown, or arguments are invalid.
        DimensionMismatchError: as ``exact_search``.

    Example:
        >>> scores, idx = faiss_search(q, p, k=10, index="flat")  # doctest: +SKIP
    """
    faiss = _import_faiss()
    check_positive(k=k, chunk_size=chunk_size, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
    if index not in FAISS_INDEXES:
        raise DdxError(f"Unknown FAISS index {index!r}; expected one of {FAISS_INDEXES}.")
    q = query_tensor(queries, torch.device("cpu"), normalize).numpy()
    built, n_seen = None, 0
    for chunk in iter_chunks(passages, chunk_size):
        x = chunk_tensor(chunk, torch.device("cpu"), q.shape[1], normalize, torch.float32).numpy()
        if built is None:
            built = _build_faiss_index(faiss, index, x, nlist=nlist, hnsw_m=hnsw_m)
        built.add(np.ascontiguousarray(x))
        n_seen += x.shape[0]
    k_out = clamp_k(k, n_seen)
    if built is None or k_out == 0:
        return np.zeros((q.shape[0], 0), dtype=np.float32), np.zeros((q.shape[0], 0), dtype=np.int64)
    if index == "ivf":
        built.nprobe = min(nprobe, built.nlist)
    elif index == "hnsw":
        built.hnsw.efSearch = ef_search
    scores, idx = built.search(q, k_out)
    idx = corpus_positions(idx.astype(np.int64), passages, n_seen)  # a Reordered corpus: back to its positions
    return np.where(idx >= 0, scores, -np.inf).astype(np.float32), idx  # -1: not found, last


def _import_faiss() -> Any:
    """``faiss``, or a DdxError that says how to install it (it is an optional extra)."""
    try:
        import faiss
    except ImportError:
        raise DdxError(
            'faiss_search needs FAISS, which is not installed. Install the extra: pip install "ddx[faiss]" '
            "(or use exact_search, which needs nothing beyond torch)."
        ) from None
    return faiss


def _build_faiss_index(faiss: Any, kind: str, first: np.ndarray, *, nlist: int, hnsw_m: int) -> Any:
    """An empty inner-product index of ``kind`` (IVF trained on ``first``)."""
    dim = first.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    # faiss's Python wrapper keeps a reference to the quantizer for as long as the IVF index lives.
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, min(nlist, first.shape[0]), faiss.METRIC_INNER_PRODUCT)
    ivf.train(np.ascontiguousarray(first))
    return ivf
