"""What a search takes: queries and passage sources, checked, chunked and moved to the device.

Passages may be one ``[N, d]`` array (``np.memmap`` and float16 welcome), a torch tensor, an iterable of
``[n_i, d]`` blocks, or a callable returning one (a store's block reader): :func:`iter_chunks` cuts any of
them into chunks of bounded size, so the exact and the FAISS search read a corpus the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.model.teacher_dims import truncate_teacher
from storage.errors import DdxError, DimensionMismatchError

if TYPE_CHECKING:
    from storage.store import TeacherStore

__all__ = [
    "Block",
    "PassageSource",
    "as_tensor",
    "check_positive",
    "chunk_tensor",
    "clamp_k",
    "default_device",
    "iter_chunks",
    "query_tensor",
    "store_blocks",
    "unit_rows",
]

Block = np.ndarray | torch.Tensor
PassageSource = Block | Iterable[Block] | Callable[[], Iterable[Block]]


def default_device() -> torch.device:
    """CUDA when present: scoring is one large matmul per chunk, where a GPU is 100× a CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_positive(**values: int | None) -> None:
    """Raise a DdxError naming every argument that is given but not a positive int."""
    bad = {
        n: v
        for n, v in values.items()
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1)
    }
    if bad:
        raise DdxError(f"Expected positive integers, got {bad}.")


def query_tensor(queries: Block, dev: torch.device, normalize: bool) -> torch.Tensor:
    """Queries as a float32 ``[nq, d]`` tensor on ``dev``, normalised if asked."""
    q = as_tensor(queries).to(dev).float()
    if q.ndim != 2:
        raise DimensionMismatchError(f"queries must be 2-D [nq, dim], got shape {tuple(q.shape)}.")
    return F.normalize(q, dim=1) if normalize else q


def as_tensor(block: Any) -> torch.Tensor:
    """A torch view of a numpy block (no copy), or the tensor itself.

    Read-only arrays (``np.memmap(mode="r")``) trigger torch's not-writable warning; it is silenced because
    nothing here writes to the view (every later step makes a new tensor).
    """
    if isinstance(block, torch.Tensor):
        return block
    arr = np.asarray(block)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(arr))


def iter_chunks(passages: PassageSource, chunk_size: int) -> Iterator[Block]:
    """Blocks of at most ``chunk_size`` rows from any supported passage source, in corpus order."""
    if isinstance(passages, np.ndarray | torch.Tensor):
        source: Iterable[Block] = [passages]
    elif callable(passages):
        source = passages()
    elif isinstance(passages, Iterable):
        source = passages
    else:
        raise DdxError(
            f"passages must be an array, a tensor, an iterable of blocks or a callable returning one; "
            f"got {type(passages).__name__}."
        )
    for block in source:
        block = block if isinstance(block, np.ndarray | torch.Tensor) else np.asarray(block)
        if block.ndim != 2:
            raise DimensionMismatchError(f"Passage blocks must be 2-D [n, dim], got shape {tuple(block.shape)}.")
        for start in range(0, block.shape[0], chunk_size):
            yield block[start : start + chunk_size]


def chunk_tensor(block: Block, dev: torch.device, dim: int, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
    """One passage chunk on ``dev`` in ``dtype`` (float16 storage moves as float16, then is upcast there)."""
    if block.shape[1] != dim:
        raise DimensionMismatchError(
            f"Passage vectors are {block.shape[1]}-d but queries are {dim}-d. "
            "Search queries and passages from the same embedding space."
        )
    p = as_tensor(block).to(dev).float()
    if normalize:
        p = F.normalize(p, dim=1)
    return p if dtype == torch.float32 else p.to(dtype)


def store_blocks(
    store: TeacherStore, rows: np.ndarray, size: int = 65_536, *, dims: int | None = None
) -> Callable[[], Iterator[np.ndarray]]:
    """A passage source of the store's ``rows``: their float32 vectors, ``size`` rows a gather; with ``dims``, their
    first ``dims`` dimensions renormalised (:func:`distill.model.teacher_dims.truncate_teacher`)."""
    return lambda: (
        truncate_teacher(store.get_rows(rows[s : s + size], dtype="float32"), dims) for s in range(0, len(rows), size)
    )


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 with every row scaled to unit length (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clamp_k(k: int, n: int) -> int:
    """``min(k, n)``, warning when the corpus is smaller than k (the evaluator reports it; nothing fails)."""
    if k > n:
        warnings.warn(f"k={k} exceeds the corpus size ({n} passages); returning {n} results per query.", stacklevel=3)
    return min(k, n)
