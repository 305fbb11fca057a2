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

:class:`DiskChunks` is the optional local disk cache for training (``TeacherStore.open(url, cache_dir=...)``,
``$DDX_REMOTE_CACHE_DIR``, ``--remote-cache-dir``): each chunk file is downloaded whole, once, checked against
its CRC32C in COMMIT, into ``<cache_dir>/<store fingerprint>/<segment id>/c/<chunk>``, and rows are then read
from it with ``pread`` as from a local store (still checked row by row).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from storage.fs import Location

__all__ = ["REMOTE_CACHE_BYTES", "REMOTE_CACHE_DIR_ENV", "REMOTE_CACHE_MAX_GB_ENV", "DiskChunks", "RangeReader"]

REMOTE_CACHE_BYTES = 128 << 20  # per process (each rank, each DataLoader worker); TeacherStore.open(cache_bytes=)
RANGE_GAP_BYTES = 64 << 10  # rows of one chunk closer than this are fetched in one range (fsspec's parquet default)
REMOTE_CACHE_DIR_ENV = "DDX_REMOTE_CACHE_DIR"  # default of TeacherStore.open(cache_dir=); set by --remote-cache-dir
REMOTE_CACHE_MAX_GB_ENV = "DDX_REMOTE_CACHE_MAX_GB"  # bound of that cache (GB; unset: unbounded)


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


def remote_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """``cache_dir``, else ``$DDX_REMOTE_CACHE_DIR``, else None (no disk cache)."""
    value = cache_dir if cache_dir is not None else os.environ.get(REMOTE_CACHE_DIR_ENV) or None
    return None if value is None else Path(value).expanduser()


def _max_cache_bytes() -> int | None:
    value = os.environ.get(REMOTE_CACHE_MAX_GB_ENV)
    return int(float(value) * 1e9) if value else None


class DiskChunks:
    """Whole remote chunk files kept on local disk, opened for ``pread`` row reads (a :class:`ChunkFiles` opener).

    The first time a chunk is asked for it is downloaded whole, checked (size, CRC32C against the segment's
    COMMIT) in memory, written to a temporary name beside its place and renamed there: readers see a whole,
    checked file or none. Processes racing for one chunk (DataLoader workers, ranks of one machine) each
    download it and the last rename wins; every copy is the same checked bytes, and a descriptor opened on
    the loser's file stays valid. A file found in the cache is checked the same way when this process first
    opens it: a damaged or truncated one is deleted and fetched again, never read.

    No invalidation: a committed segment never changes (its chunk files are immutable once COMMIT is written,
    and a new run writes a new segment with a new unique id), so ``<store fingerprint>/<segment id>/c/<chunk>``
    names the same bytes forever. With ``$DDX_REMOTE_CACHE_MAX_GB`` set, files are removed least recently
    opened first (atime, set on every open) after each download once the whole cache directory exceeds it.

    Args:
        root: the cache directory (all stores); files go under ``root/<fingerprint>``.
        fingerprint: the store's fingerprint.
        loc: the store.
        files: path below the store root of each chunk file, by chunk number.
        names: ``<segment id>/c/<chunk>`` of each chunk, by chunk number.
        check: what is wrong with the bytes of chunk ``i``'s file (size, CRC32C against COMMIT), or None.
        damage: the exception for chunk ``i`` of the store being damaged (``what``).
    """

    def __init__(
        self,
        root: Path,
        fingerprint: str,
        loc: Location,
        files: list[str],
        names: list[str],
        check: Callable[[int, np.ndarray], str | None],
        damage: Callable[[int, str], Exception],
    ) -> None:
        self.root, self.dir, self.loc, self.files, self.names = root, root / fingerprint, loc, files, names
        self._check, self._damage = check, damage
        self.max_bytes = _max_cache_bytes()
        self.downloads = 0  # chunk files fetched so far (tests count them)
        self.discarded = 0  # damaged cached files deleted

    def path(self, i: int) -> Path:
        return self.dir / self.names[i]

    def open(self, i: int) -> int:
        """A descriptor of chunk ``i``'s checked local copy, downloaded first when absent or damaged."""
        path = self.path(i)
        fd = self._open_checked(i, path)
        if fd is None:
            fd = self._download(i, path)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def _open_checked(self, i: int, path: Path) -> int | None:
        from storage.segment_reader import read_into

        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            data = np.empty(os.fstat(fd).st_size, dtype=np.uint8)
            got = read_into(fd, data, 0)
            problem = self._check(i, data[:got])
        except BaseException:
            os.close(fd)
            raise
        if problem is None:
            with contextlib.suppress(OSError):  # the LRU order of the size bound (atime is not updated by reads)
                os.utime(path, (time.time(), os.fstat(fd).st_mtime))
            return fd
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # another process may have replaced or removed it meanwhile
            path.unlink()
        self.discarded += 1
        return None

    def _download(self, i: int, path: Path) -> int:
        try:
            data = self.loc.read_bytes(self.files[i])
        except FileNotFoundError as exc:
            raise self._damage(i, "is missing") from exc
        if (problem := self._check(i, np.frombuffer(data, dtype=np.uint8))) is not None:
            raise self._damage(i, problem)  # the store's own file is damaged: nothing is cached
        self.downloads += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        if self.max_bytes is not None:
            self._evict(keep=path)
        return fd

    def _evict(self, keep: Path) -> None:
        """Remove the least recently opened files until the cache directory fits ``max_bytes``."""
        assert self.max_bytes is not None
        entries = []
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                p = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    entries.append((st.st_atime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p == keep or name_is_temporary(p):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()  # a descriptor open on it (this or another process) stays valid
            total -= size


def name_is_temporary(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")
