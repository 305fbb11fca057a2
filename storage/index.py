"""Key → row lookup across committed segments, and the fast batched row gather.

``KeyIndex`` holds every committed key once, sorted, as an ``S16`` array beside its global row id
(segment offset + row): 28 bytes a key, so 10 M keys cost ~280 MB and a lookup is a binary search.
A key stored twice (two writers raced on the same text) resolves to the first segment in id order;
the duplicates are counted, never an error: both rows hold the same teacher's vector.

``RowGather`` serves random rows. Local format-2 chunks are read with one ``preadv`` a row straight into
the output, in file and offset order, from descriptors kept in a bounded LRU (:mod:`storage.chunk_files`):
no read-ahead and no maps, so a store larger than RAM reads about the bytes it returns. Remote format-2
chunks are read by byte range, adjacent rows merged, behind a bounded LRU of rows
(:mod:`storage.remote_rows`): a process holds at most its cache, not the chunks it touched. Otherwise rows
come from chunk memory maps (format-1 chunks, remote stores, ``gather_mode="mmap"``): a batch inside one chunk is one
``np.take(..., mode="clip", out=...)`` (the default ``mode="raise"`` is ~2× slower). Otherwise long rows
(teacher vectors) are copied one memcpy a row straight into request order, and short rows are grouped
by chunk, taken, then scattered back. DESIGN.md and ``bench/store_read.py`` have the measurements.

Every gathered row is checked before it is returned (:class:`RowChecks`): CRC32C(key ‖ row) against
the value recorded at write time, one C call a row on bytes the copy just brought into cache.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from storage.chunk_files import ChunkFiles
from storage.keys import KEY_DTYPE, as_key_array
from storage.remote_rows import RangeReader
from storage.segment_format import check_rows, row_crcs

__all__ = ["KeyIndex", "RowChecks", "RowGather"]

# Rows at least this long are copied one by one (one memcpy each, straight into place); shorter rows
# are grouped by chunk and taken with np.take, then scattered. At 3584-d float16 (7 KiB rows) the
# grouped path copies every byte twice and pays ~5 µs of calls per chunk touched, which a large store
# makes one per row. bench/store_read.py (200k x 3584 fp16, batches of 288, 2 shared cores): grouped
# 0.39-0.43 of in-RAM np.take, row by row 0.56-0.65.
ROW_COPY_MIN_BYTES = 1024
# pread gathers: threads reading one batch (a cold store answers several requests at once faster than
# one at a time), and the smallest batch worth splitting. bench/store_scale.py has the measurements.
PREAD_THREADS = int(os.environ.get("DDX_PREAD_THREADS", "4"))
PREAD_SPLIT_MIN = 64
PREAD_COLD_S = 20e-6  # a row from the page cache takes ~3 us, from disk ~100 us
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """The gather threads of this process (made anew after a fork: DataLoader workers get their own)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(PREAD_THREADS, thread_name_prefix="ddx-pread"))
    return _POOL[1]


class KeyIndex:
    """Sorted unique keys with their global rows, roles and token counts."""

    def __init__(
        self, keys: np.ndarray, gids: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray, duplicates: int = 0
    ) -> None:
        self.keys, self.gids, self.roles, self.n_tokens = keys, gids, roles, n_tokens
        self.duplicates = duplicates

    @classmethod
    def build(cls, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> KeyIndex:
        """From (keys, global rows, roles, n_tokens) per segment, in segment order (first wins)."""
        if not parts:
            return cls(np.empty(0, KEY_DTYPE), np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.int32))
        keys, gids, roles, ntok = (np.concatenate([p[i] for p in parts]) for i in range(4))
        sorted_keys, first = np.unique(keys, return_index=True)
        return cls(sorted_keys, gids[first], roles[first], ntok[first], duplicates=len(keys) - len(sorted_keys))

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Index into the sorted arrays for each key, -1 where absent."""
        keys = as_key_array(keys)
        if len(self.keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, keys)
        pos[pos == len(self.keys)] = 0
        return np.where(self.keys[pos] == keys, pos, -1).astype(np.int64)

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Global row of each key, -1 where the store has no vector for it."""
        pos = self.positions(keys)
        if len(self.gids) == 0:
            return pos
        return np.where(pos >= 0, self.gids[np.maximum(pos, 0)], -1)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.positions(keys) >= 0


@dataclass(frozen=True)
class RowChecks:
    """What each global row must hash to: CRC32C(key ‖ row bytes) = ``extend(seeds[g], row)`` == ``tags[g]``.

    Args:
        seeds: CRC32C of the key the index names for each global row (uint32).
        tags: CRC32C(key ‖ row) recorded when the row was written (uint32).
        checked: per chunk, whether its rows have tags (format-1 chunks are checked whole on load instead).
        error: builds the exception for (global row, CRC read, CRC recorded).
    """

    seeds: np.ndarray
    tags: np.ndarray
    checked: np.ndarray
    error: Callable[[int, int, int], Exception]

    def verify(self, gids: np.ndarray, ci: np.ndarray, rows: np.ndarray) -> None:
        """Raise ``error`` for the first of ``rows`` (global ids ``gids``, chunks ``ci``) that fails its check.

        One CRC32C call a row over the gathered batch (~0.45 µs for a 7 KiB row, about what copying it
        costs). Taking each row's checksum right after its copy, while it is in L1, measured 2 % faster:
        not worth a second copy loop.
        """
        keep = self.checked[ci]
        if not keep.all():
            if not keep.any():
                return
            idx = np.flatnonzero(keep)
            gids, rows = gids[idx], rows[idx]
        seeds, tags = self.seeds[gids], self.tags[gids]
        bad = check_rows(seeds, tags, rows)
        if len(bad):
            i = int(bad[0])
            got = int(row_crcs(seeds[i : i + 1], rows[i : i + 1])[0])
            raise self.error(int(gids[i]), got, int(tags[i]))


class RowGather:
    """Batched random row reads over many chunks, every row checked.

    Args:
        chunk_starts: global row of each chunk's first row, increasing.
        chunk_loader: returns chunk ``i`` as an array (a memory map for local stores).
        dim, dtype: row shape and storage dtype.
        checks: per-row checksums (None: no rows have any; the loader checks whole chunks).
        files: open chunk files for ``pread`` gathers, with ``preadable`` marking the chunks they serve
            (the rest, and every batch touching one of the rest, go through ``chunk_loader``).
        short_read: builds the exception for chunk ``i`` ending before row ``row``.
        ranges: byte-range reads of remote chunk files, with ``rangeable`` marking the chunks it serves
            (rows of the rest go through ``chunk_loader``).
    """

    def __init__(
        self,
        chunk_starts: np.ndarray,
        chunk_loader: Callable[[int], np.ndarray],
        dim: int,
        dtype: np.dtype,
        checks: RowChecks | None = None,
        *,
        files: ChunkFiles | None = None,
        preadable: np.ndarray | None = None,
        short_read: Callable[[int, int], Exception] | None = None,
        ranges: RangeReader | None = None,
        rangeable: np.ndarray | None = None,
    ) -> None:
        self.files, self._short_read = files, short_read
        self.ranges = ranges
        self.rangeable = np.zeros(len(chunk_starts), bool) if rangeable is None or ranges is None else rangeable
        self._cold = True  # whether the last pread batch came from disk (see _pread_rows)
        self.preadable = np.zeros(len(chunk_starts), bool) if preadable is None or files is None else preadable
        self.chunk_starts = np.asarray(chunk_starts, dtype=np.int64)
        self._load = chunk_loader
        self._chunks: list[np.ndarray | None] = [None] * len(self.chunk_starts)
        self._byte_views: list[memoryview | None] = [None] * len(self.chunk_starts)
        self.dim, self.dtype = dim, np.dtype(dtype)
        self.checks = checks

    def _chunk(self, i: int) -> np.ndarray:
        arr = self._chunks[i]
        if arr is None:
            arr = self._chunks[i] = self._load(i)
        return arr

    def gather(self, gids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``gids`` (global ids) in request order, in the storage dtype unless ``out`` says otherwise."""
        gids = np.asarray(gids, dtype=np.int64)
        n = len(gids)
        if out is None:
            out = np.empty((n, self.dim), dtype=self.dtype)
        if n == 0:
            return out
        ci = np.searchsorted(self.chunk_starts, gids, side="right") - 1
        local = gids - self.chunk_starts[ci]
        direct = out.dtype == self.dtype and out.flags.c_contiguous and out.flags.writeable
        dst = out if direct else np.empty((n, self.dim), dtype=self.dtype)  # rows as stored, checked, then cast
        if self.files is not None and self.preadable[ci].all():
            self._pread_rows(ci, local, dst)
        elif self.ranges is not None and self.rangeable[ci].any():
            self._range_rows(ci, local, dst)
        elif ci[0] == ci[-1] and (ci == ci[0]).all():
            np.take(self._chunk(int(ci[0])), local, axis=0, mode="clip", out=dst)
        elif self.dim * self.dtype.itemsize >= ROW_COPY_MIN_BYTES:
            self._copy_rows(ci, local, dst)
        else:
            self._take_grouped(ci, local, dst)
        if self.checks is not None:
            self.checks.verify(gids, ci, dst)
        if dst is not out:
            out[...] = dst
        return out

    def _range_rows(self, ci: np.ndarray, local: np.ndarray, dst: np.ndarray) -> None:
        """Remote rows by byte range (:class:`RangeReader`); rows of other chunks (format 1) from their chunk."""
        assert self.ranges is not None
        sel = self.rangeable[ci]
        if sel.all():
            self.ranges.read(ci, local, dst)
            return
        for mask, fill in ((sel, self.ranges.read), (~sel, self._copy_rows)):
            idx = np.flatnonzero(mask)
            buf = np.empty((len(idx), self.dim), dtype=self.dtype)
            fill(ci[idx], local[idx], buf)
            dst[idx] = buf

    def _copy_rows(self, ci: np.ndarray, local: np.ndarray, dst: np.ndarray) -> None:
        """One memcpy a row from its chunk straight into ``dst``, in request order (one copy in all)."""
        row_bytes = self.dim * self.dtype.itemsize
        # numpy's stubs give ndarray ``__buffer__`` only for Python >= 3.12 (mypy targets 3.11)
        views, dst_bytes, o = self._byte_views, memoryview(dst).cast("B"), 0  # type: ignore[arg-type]
        for c, s in zip(ci.tolist(), (local * row_bytes).tolist(), strict=True):
            src = views[c]
            if src is None:
                src = views[c] = memoryview(np.ascontiguousarray(self._chunk(c))).cast("B")  # type: ignore[arg-type]
            dst_bytes[o : o + row_bytes] = src[s : s + row_bytes]
            o += row_bytes

    def _pread_rows(self, ci: np.ndarray, local: np.ndarray, dst: np.ndarray) -> None:
        """One ``preadv`` a row, straight into ``dst``, in file and offset order (no map, no read-ahead).

        While rows come from disk (the last batch took over ``PREAD_COLD_S`` a row), a batch of at least
        ``PREAD_SPLIT_MIN`` rows is split into ``PREAD_THREADS`` runs read by threads (``preadv`` releases
        the GIL), so the disk sees several requests at once; from the page cache one thread is faster.
        """
        assert self.files is not None
        order = np.lexsort((local, ci))
        jobs = PREAD_THREADS if self._cold and len(order) >= PREAD_SPLIT_MIN else 1
        fds = self.files.fds(np.unique(ci).tolist())  # every descriptor taken before any read starts
        runs = [
            (order[k], ci[order[k]], local[order[k]], dst, fds) for k in np.array_split(np.arange(len(order)), jobs)
        ]
        t0 = time.perf_counter()
        if jobs == 1:
            self._pread_run(*runs[0])
        else:
            for _ in _pool().map(lambda run: self._pread_run(*run), runs):
                pass
        self._cold = (time.perf_counter() - t0) * jobs > PREAD_COLD_S * len(order)

    def _pread_run(
        self, rows_out: np.ndarray, ci: np.ndarray, local: np.ndarray, dst: np.ndarray, fds: dict[int, int]
    ) -> None:
        """Read rows ``local`` of chunks ``ci`` into rows ``rows_out`` of ``dst`` (one thread's share)."""
        row_bytes = self.dim * self.dtype.itemsize
        dst_bytes = memoryview(dst).cast("B")  # type: ignore[arg-type]
        last, fd = -1, -1
        for k, c, r in zip(rows_out.tolist(), ci.tolist(), local.tolist(), strict=True):
            if c != last:
                last, fd = c, fds[c]
            o = k * row_bytes
            if os.preadv(fd, [dst_bytes[o : o + row_bytes]], r * row_bytes) != row_bytes:
                raise (self._short_read or _short)(c, r)

    def _take_grouped(self, ci: np.ndarray, local: np.ndarray, dst: np.ndarray) -> None:
        """One ``np.take`` per chunk, then a scatter into request order (wins for short rows)."""
        order = np.argsort(ci, kind="stable")
        ci_sorted, local_sorted = ci[order], local[order]
        cuts = np.flatnonzero(np.diff(ci_sorted)) + 1
        buf = np.empty_like(dst)
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(ci)], strict=True):
            np.take(self._chunk(int(ci_sorted[s])), local_sorted[s:e], axis=0, mode="clip", out=buf[s:e])
        dst[order] = buf


def _short(chunk: int, row: int) -> Exception:
    return OSError(f"chunk {chunk} ends before row {row}")
