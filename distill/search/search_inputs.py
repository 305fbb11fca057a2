"""What a search takes: queries and passage sources, checked, chunked and moved to the device.

Passages may be one ``[N, d]`` array (``np.memmap`` and float16 welcome), a torch tensor, an iterable of
``[n_i, d]`` blocks, a callable returning one, or a :class:`Reordered` corpus (blocks read in another order than
the corpus's, with the permutation): :func:`iter_chunks` cuts any of them into chunks of bounded size, so the
exact and the FAISS search read a corpus the same way.

A store's rows are read as a :class:`Reordered` corpus sorted by store row (:func:`store_blocks`): a gather is
one ``preadv`` a row, and rows in document or key order land anywhere in the store. Rows covering at least
:data:`SCAN_DENSITY` of the store are picked out of one sequential scan instead. ``python bench/corpus_passes.py
read`` (200k rows of 384-d float16): warm 0.95 s in key order, 0.35 s sorted, 0.29 s scanned; cold (files evicted)
2.88 / 2.65 / 0.44 s. At a quarter of 300k rows the scan reads 4× the rows it keeps: 0.39 s warm against 0.21 s
gathered, 0.67 s cold against 1.37 s; below that share, gathers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
    "Reordered",
    "as_tensor",
    "check_positive",
    "chunk_tensor",
    "clamp_k",
    "corpus_positions",
    "default_device",
    "iter_chunks",
    "query_tensor",
    "read_order_priority",
    "store_blocks",
    "unit_rows",
]

Block = np.ndarray | torch.Tensor
# Share of a store's rows from which a pass over them scans the whole store instead of gathering them: a gather
# costs one preadv a row, a scan a sequential read of every chunk (the module docstring has the measurements).
SCAN_DENSITY = 0.25


@dataclass(frozen=True)
class Reordered:
    """A corpus read in another order than its own: ``blocks()`` yields the vectors of corpus positions ``order``
    (a permutation of ``0 .. N-1``), in that order.

    Both searches take it like any passage source and return corpus positions, with ties broken as if the corpus
    had been read in its own order (:func:`read_order_priority`), so results equal an in-order read's. It is not
    itself callable: a caller iterating it by hand sees ``order`` beside the rows.
    """

    blocks: Callable[[], Iterable[Block]]
    order: np.ndarray


PassageSource = Block | Iterable[Block] | Callable[[], Iterable[Block]] | Reordered


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
    elif isinstance(passages, Reordered):
        source = passages.blocks()
    elif callable(passages):
        source = passages()
    elif isinstance(passages, Iterable):
        source = passages
    else:
        raise DdxError(
            f"passages must be an array, a tensor, an iterable of blocks, a callable returning one or Reordered; "
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


def store_blocks(store: TeacherStore, rows: np.ndarray, size: int = 65_536, *, dims: int | None = None) -> Reordered:
    """A passage source of the store's ``rows``: their float32 vectors, ``size`` rows a block, read in store-row
    order (searches map results back to positions in ``rows``); with ``dims``, their first ``dims`` dimensions
    renormalised (:func:`distill.model.teacher_dims.truncate_teacher`).

    Rows covering at least :data:`SCAN_DENSITY` of the store are picked out of one sequential scan
    (:func:`_scan_rows`); fewer are gathered, ``size`` a ``get_rows`` call. Both give the same blocks.
    """
    order = np.argsort(rows, kind="stable")
    ordered = np.asarray(rows, dtype=np.int64)[order]
    in_range = not len(ordered) or (ordered[0] >= 0 and ordered[-1] < store.rows)  # else get_rows says which
    read = _scan_rows if in_range and len(ordered) >= SCAN_DENSITY * store.rows else _gather_rows
    return Reordered(lambda: (truncate_teacher(b, dims) for b in read(store, ordered, size)), order)


def _gather_rows(store: TeacherStore, ordered: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(ordered), size):
        yield store.get_rows(ordered[s : s + size], dtype="float32")


def _scan_rows(store: TeacherStore, ordered: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Rows ``ordered`` (ascending global rows) as float32 blocks of ``size``, from one scan of the store.

    :meth:`TeacherStore.iter_batches` reads each chunk once, sequentially, and checks every row, in global-row
    order (segments in order, each in row order): the scan's n-th row is global row n. Each row is copied once,
    cast into its block; the scan stops after the last row asked for.
    """
    out: np.ndarray | None = None
    held = start = taken = 0
    for _, vectors in store.iter_batches(size):
        stop = start + len(vectors)
        end = int(np.searchsorted(ordered, stop))
        while taken < end:
            if out is None:
                out, held = np.empty((min(size, len(ordered) - taken), vectors.shape[1]), np.float32), 0
            n = min(end - taken, len(out) - held)
            local = ordered[taken : taken + n] - start
            contiguous = local[-1] - local[0] == n - 1  # ascending: no gap and no repeat
            out[held : held + n] = vectors[local[0] : local[-1] + 1] if contiguous else vectors[local]
            held, taken = held + n, taken + n
            if held == len(out):
                yield out
                out = None
        if taken == len(ordered):
            return
        start = stop


def read_order_priority(
    tie_priority: np.ndarray | torch.Tensor | None, passages: PassageSource
) -> np.ndarray | torch.Tensor | None:
    """The tie priority of passages in the order the search reads them: for a :class:`Reordered` corpus
    ``tie_priority[order]``, and ``-order`` for the default rule (the earlier corpus position first).

    Raises:
        DdxError: ``tie_priority`` is shorter than the reordered corpus.
    """
    if not isinstance(passages, Reordered):
        return tie_priority
    if tie_priority is None:
        return -passages.order
    prio = as_tensor(tie_priority)
    if prio.shape[0] < len(passages.order):
        raise DdxError(f"tie_priority has {prio.shape[0]} entries but the corpus has {len(passages.order)} passages.")
    return prio[torch.from_numpy(np.asarray(passages.order, dtype=np.int64))]


def corpus_positions(idx: np.ndarray, passages: PassageSource, n_read: int) -> np.ndarray:
    """Search results ``idx`` (positions in read order; -1 for none) as corpus positions.

    Raises:
        DdxError: a :class:`Reordered` corpus gave another number of rows than it has positions.
    """
    if not isinstance(passages, Reordered):
        return idx
    if n_read != len(passages.order):
        raise DdxError(f"A reordered corpus gave {n_read} rows for {len(passages.order)} positions.")
    return np.where(idx >= 0, passages.order[idx], idx) if idx.size else idx


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 with every row scaled to unit length (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clamp_k(k: int, n: int) -> int:
    """``min(k, n)``, warning when the corpus is smaller than k (the evaluator reports it; nothing fails)."""
    if k > n:
        warnings.warn(f"k={k} exceeds the corpus size ({n} passages); returning {n} results per query.", stacklevel=3)
    return min(k, n)
