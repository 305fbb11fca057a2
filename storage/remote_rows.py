"""Rows of a remote store by byte range, behind a bounded cache of rows.

Chunk files are raw little-endian rows followed by a 4-byte CRC32C (:mod:`storage.segment_format`), so
row *r* of chunk *c* is bytes ``r * row_bytes`` to ``(r + 1) * row_bytes`` of ``segments/<id>/vectors/c/<c>/0``.
A remote gather asks the object store for those bytes: the batch's missing rows, sorted by chunk and row,
rows of one chunk less than ``max_gap_bytes`` apart merged into one range (the gap is read and dropped:
one request costs more than 64 KiB of transfer on S3), all ranges fetched concurrently (``cat_ranges``: one
ranged GET each on S3/GCS). Rows are kept in a fixed slab of ``cache_bytes`` (an LRU of rows), so a process holds
at most that many bytes of vectors whatever the store's size. It used to download each whole 28 MiB chunk
touched and keep it for the process's life: every rank and DataLoader worker ended up holding the whole
store (issue 13). Every row is still checked against its CRC32C(key ‖ row) by the caller
(:class:`storage.index.RowGather`), cached or not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from storage.fs import Location

__all__ = ["REMOTE_CACHE_BYTES", "RangeReader"]

REMOTE_CACHE_BYTES = 128 << 20  # per process (each rank, each DataLoader worker); TeacherStore.open(cache_bytes=)
RANGE_GAP_BYTES = 64 << 10  # rows of one chunk closer than this are fetched in one range (fsspec's parquet default)


class RangeReader:
    """Fetches rows of remote chunk files by byte range; keeps the last ``cache_bytes`` of them.

    Args:
        loc: the store.
        files: path below the store root of each chunk file, by chunk number (as :class:`RowGather` numbers them).
        row_bytes: bytes of one row.
        cache_bytes: bytes of rows kept (0: none).
        max_gap_bytes: rows of one chunk separated by fewer bytes than this share one range request.
        short_read: builds the exception for chunk ``i`` missing (``missing``) or ending before row ``row``.
    """

    def __init__(
        self,
        loc: Location,
        files: list[str],
        row_bytes: int,
        cache_bytes: int,
        *,
        max_gap_bytes: int = RANGE_GAP_BYTES,
        short_read: Callable[[int, int, bool], Exception] | None = None,
    ) -> None:
        self.loc, self.files, self.row_bytes = loc, files, row_bytes
        self.gap_rows = max(0, max_gap_bytes // row_bytes)
        self.capacity = max(0, cache_bytes // row_bytes)  # rows
        self._short = short_read
        self._slab: np.ndarray | None = None  # (capacity, row_bytes) uint8, allocated on first use
        self._slots: OrderedDict[tuple[int, int], int] = OrderedDict()  # (chunk, row) -> slot, oldest first
        self.requests = 0  # ranges fetched so far (tests and the bench count them)
        self.bytes_fetched = 0
        self.hits = 0

    def clear(self) -> None:
        """Drop every cached row (and the slab)."""
        self._slots.clear()
        self._slab = None

    @property
    def cached_bytes(self) -> int:
        return len(self._slots) * self.row_bytes

    def read(self, ci: np.ndarray, local: np.ndarray, dst: np.ndarray) -> None:
        """Fill ``dst`` (C-contiguous, one row per request) with rows ``local`` of chunks ``ci``."""
        n = len(ci)
        out = dst.reshape(n, -1).view(np.uint8)
        want = list(zip(ci.tolist(), local.tolist(), strict=True))
        missing: dict[tuple[int, int], list[int]] = {}
        slab = self._slab
        for k, key in enumerate(want):
            slot = self._slots.get(key)
            if slot is not None and slab is not None:
                self._slots.move_to_end(key)
                out[k] = slab[slot]
                self.hits += 1
            else:
                missing.setdefault(key, []).append(k)
        if missing:
            self._fetch(missing, out)

    def _fetch(self, missing: dict[tuple[int, int], list[int]], out: np.ndarray) -> None:
        """One ranged read per run of nearby rows of one chunk; each row into its places in ``out`` and the cache."""
        keys = sorted(missing)
        runs: list[tuple[int, int, int]] = []  # (chunk, first row, rows spanned)
        for c, r in keys:
            if runs and runs[-1][0] == c and r - (runs[-1][1] + runs[-1][2]) <= self.gap_rows:
                runs[-1] = (c, runs[-1][1], r - runs[-1][1] + 1)
            else:
                runs.append((c, r, 1))
        rb = self.row_bytes
        try:
            blocks = self.loc.read_ranges([(self.files[c], r * rb, (r + m) * rb) for c, r, m in runs])
        except FileNotFoundError as exc:  # which chunk is not said: find it
            for c, r, _ in runs:
                if not self.loc.exists(self.files[c]):
                    raise self._error(c, r, True) from exc
            raise
        self.requests += len(runs)
        for (c, r, m), block in zip(runs, blocks, strict=True):
            self.bytes_fetched += len(block)
            if len(block) != m * rb:
                raise self._error(c, r + len(block) // rb, False)
            rows = np.frombuffer(block, dtype=np.uint8).reshape(m, rb)
            for j in range(m):
                places = missing.get((c, r + j))
                if places is None:
                    continue  # a row of the gap: read, not asked for
                for k in places:
                    out[k] = rows[j]
                self._put((c, r + j), rows[j])

    def _put(self, key: tuple[int, int], row: np.ndarray) -> None:
        if self.capacity == 0:
            return
        if self._slab is None:
            self._slab = np.empty((self.capacity, self.row_bytes), dtype=np.uint8)  # pages touched as filled
        full = len(self._slots) >= self.capacity
        slot = self._slots.popitem(last=False)[1] if full else len(self._slots)  # the oldest row's slot, or a new one
        self._slots[key] = slot
        self._slab[slot] = row

    def _error(self, c: int, row: int, missing: bool) -> Exception:
        if self._short is not None:
            return self._short(c, row, missing)
        return OSError(f"chunk {c} {'is missing' if missing else f'ends before row {row}'}")
