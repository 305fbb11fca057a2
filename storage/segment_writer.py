"""Writing one segment: buffered appends, chunk-by-chunk flushes, a COMMIT written last.

Flushing: rows are written chunk by chunk; an index part follows each write and is what makes
those rows count. A time-based flush rewrites the current (partial) chunk atomically, so a crash
loses at most the rows since the last flush, and :func:`storage.segment.salvage_segment` commits
what the parts cover. The chunk files are written here, as zarr would write them, but the last one
holds only the rows written (format 3: no padding to a full chunk, whatever the writer's row count
turns out to be); zarr keeps the array's metadata. The on-disk layout is in :mod:`storage.segment_format`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import numpy as np

from storage.errors import DdxError, DiskFullError
from storage.fs import Location
from storage.heartbeat import Beat, beat_interval, stale_after
from storage.keys import KEY_DTYPE, ROLES, as_key_array
from storage.segment_format import (
    SEGMENTS,
    IndexColumns,
    key_seeds,
    n_chunks,
    new_segment_id,
    row_crcs,
    write_chunk,
    write_commit,
)

__all__ = ["SegmentWriter"]


class SegmentWriter:
    """Appends (key, vector) rows to a new segment and commits it.

    Use as a context manager: the segment is committed when the block ends normally, and left
    uncommitted (salvageable, never half-committed) when it raises.

    Example:
        >>> with SegmentWriter.create(loc, dim=32, dtype="float16", chunk_rows=1024) as w:
        ...     w.append(keys, vectors, roles, n_tokens)
    """

    def __init__(
        self,
        loc: Location,
        seg_id: str,
        array: Any,
        *,
        chunk_rows: int,
        flush_seconds: float,
        replaces: list[str] | None = None,
    ) -> None:
        self.loc, self.seg_id, self._array = loc, seg_id, array
        self.replaces = list(replaces or [])  # a compaction: the committed segments whose rows this one takes over
        self.dim = int(array.shape[1])
        self.dtype = np.dtype(array.dtype)
        self.chunk_rows = chunk_rows
        self.flush_seconds = flush_seconds
        self.rows_flushed = 0  # rows covered by index parts
        self._buf_vectors = np.zeros((chunk_rows, self.dim), dtype=self.dtype)
        self._buf_index: list[IndexColumns] = []
        self._buf_n = 0  # rows in the current chunk buffer (some may be flushed already)
        self._buf_flushed = 0  # of those, rows already covered by a part
        self._parts = 0
        self._crcs: dict[int, int] = {}
        self._last_flush = time.monotonic()
        self._lock_fd: int | None = None
        self._beat: Beat | None = None  # remote stores: the heartbeat thread (local ones hold an flock instead)
        self._beat_lock = threading.Lock()  # one heartbeat write at a time: its row count never goes back
        self.committed = False
        self._lost = False  # another process may have salvaged the segment: never write to it again

    @classmethod
    def create(
        cls,
        loc: Location,
        *,
        dim: int,
        dtype: str,
        chunk_rows: int,
        rank: int = 0,
        world_size: int = 1,
        flush_seconds: float = 60.0,
        seg_id: str | None = None,
        replaces: list[str] | None = None,
    ) -> SegmentWriter:
        """Create the segment's group and empty vector array, and take its writer lock.

        ``seg_id`` names the segment (default :func:`~storage.segment_format.new_segment_id`); ``replaces``
        makes it a compaction of those committed segments (:mod:`storage.compact`): recorded at creation, so an
        uncommitted one is known as a copy (its salvage removes it), and in COMMIT, from which readers skip them.

        Raises:
            DiskFullError: no space for the segment's metadata (what was created of it is removed again).
        """
        seg_id = seg_id or new_segment_id(rank, world_size)
        writer = None
        try:
            array = _create_array(
                loc, seg_id, dim=dim, dtype=dtype, chunk_rows=chunk_rows, rank=rank, world=world_size, replaces=replaces
            )
            writer = cls(loc, seg_id, array, chunk_rows=chunk_rows, flush_seconds=flush_seconds, replaces=replaces)
            writer._take_lock()
            writer._heartbeat()
            writer._start_beat()
        except OSError as exc:
            if writer is not None:
                writer._release()
            error = _disk_error(exc, loc, seg_id, 0)
            if isinstance(error, DiskFullError):
                with contextlib.suppress(OSError):  # else an empty abandoned segment, which gc removes
                    loc.remove(SEGMENTS, seg_id)  # nothing of this run is in it yet
            raise error from exc
        return writer

    def append(self, keys: np.ndarray, vectors: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray) -> None:
        """Buffer rows; full chunks (and the partial one, every ``flush_seconds``) reach disk."""
        if self.committed:
            raise ValueError(f"Segment {self.seg_id!r} is committed and immutable; append through a new writer.")
        keys, vectors, roles, n_tokens = self._checked(keys, vectors, roles, n_tokens)
        start = 0
        while start < len(keys):
            take = min(self.chunk_rows - self._buf_n, len(keys) - start)
            sl = slice(start, start + take)
            stored = self._buf_vectors[self._buf_n : self._buf_n + take]
            stored[...] = vectors[sl]
            rows = self._chunk_start + self._buf_n + np.arange(take, dtype=np.int64)
            key_arr = np.asarray(keys[sl], KEY_DTYPE)
            self._buf_index.append(
                IndexColumns(
                    key_arr,
                    rows,
                    np.asarray(roles[sl], np.uint8),
                    np.asarray(n_tokens[sl], np.int32),
                    row_crcs(key_seeds(key_arr), stored),  # of the bytes as stored, after the cast
                )
            )
            self._buf_n += take
            start += take
            if self._buf_n == self.chunk_rows:
                self._flush_chunk(complete=True)
        if self._buf_n > self._buf_flushed and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _checked(
        self, keys: np.ndarray, vectors: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rows as stored (keys S16, vectors cast to the store's dtype, roles uint8, n_tokens int32), or a
        DdxError naming the field, before anything of them is buffered: a row that cannot be stored exactly as
        given is refused, never truncated, wrapped or stored as NaN/inf."""
        where = f"Segment {self.seg_id!r}"
        keys = keys if isinstance(keys, np.ndarray) else as_key_array(keys)
        vectors, roles, n_tokens = (np.asarray(a) for a in (vectors, roles, n_tokens))
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(keys):
            raise DdxError(f"{where}: expected vectors of shape ({len(keys)}, {self.dim}), got {vectors.shape}.")
        if not (len(keys) == len(roles) == len(n_tokens)) or roles.ndim != 1 or n_tokens.ndim != 1:
            raise DdxError(
                f"{where}: keys, roles and n_tokens must be 1-d of one length, got {len(keys)}, {roles.shape} and "
                f"{n_tokens.shape}."
            )
        if keys.dtype != KEY_DTYPE:
            raise DdxError(f"{where}: keys must be 16-byte content keys (numpy S16), got dtype {keys.dtype}.")
        if vectors.dtype.kind != "f":
            raise DdxError(f"{where}: vectors must be floating point, got dtype {vectors.dtype}.")
        with np.errstate(over="ignore"):  # an overflow is reported below, as the row it spoils
            stored = vectors.astype(self._buf_vectors.dtype, copy=False)
        if len(stored) and not np.isfinite(stored).all():
            row = int(np.flatnonzero(~np.isfinite(stored).all(axis=1))[0])
            raise DdxError(
                f"{where}: vectors row {row} is NaN or infinite as {stored.dtype} (of {len(stored)} rows given, none "
                "stored); the teacher overflowed: run it in bfloat16 or float32 (--dtype), or store float32."
            )
        for name, values, top in (("roles", roles, len(ROLES) - 1), ("n_tokens", n_tokens, 2**31 - 1)):
            whole = values.dtype.kind in "iu" or (values.dtype.kind == "f" and bool(np.all(np.mod(values, 1) == 0)))
            if len(values) and (not whole or values.min() < 0 or values.max() > top):  # 3.0 is 3; 2.5 is refused
                raise DdxError(
                    f"{where}: {name} must be integers in 0..{top}, got {values.dtype} {values.min()}..{values.max()}."
                )
        return keys, stored, roles.astype(np.uint8), n_tokens.astype(np.int32)

    def flush(self) -> None:
        """Write the partial chunk now (atomically replacing its earlier version)."""
        if self._buf_n > self._buf_flushed:
            self._flush_chunk(complete=False)

    @property
    def _chunk_start(self) -> int:
        return self.rows_flushed - self._buf_flushed

    def _flush_chunk(self, *, complete: bool) -> None:
        self._check_still_mine()
        chunk = self._chunk_start // self.chunk_rows
        end = self._chunk_start + self._buf_n
        try:
            with self.loc.errors():
                if end > self._array.shape[0]:
                    self._array.resize((end, self.dim))
                self._crcs[chunk] = write_chunk(self.loc, self.seg_id, chunk, self._buf_vectors[: self._buf_n])
            part = IndexColumns.concat(self._buf_index)
            sub = part.take(part.rows >= self.rows_flushed)
            part_name = f"part-{self._parts:06d}.parquet"
            self.loc.write_atomic(sub.to_parquet_bytes(), SEGMENTS, self.seg_id, "parts", part_name)
        except OSError as exc:
            raise _disk_error(exc, self.loc, self.seg_id, self.rows_flushed) from exc
        self._parts += 1
        self.rows_flushed = end
        self._last_flush = time.monotonic()
        self._heartbeat()
        if complete:
            self._buf_index, self._buf_n, self._buf_flushed = [], 0, 0
        else:
            self._buf_index, self._buf_flushed = [part], self._buf_n

    def _check_still_mine(self) -> None:
        """Raise before writing into a segment others may have salvaged: the heartbeat lapsed for ``stale_after``
        (beats failing, or this process paused), or a COMMIT is there (salvaged: ``ddx cache gc --force``, or a
        pause). Rewriting its last chunk or vectors/zarr.json under a COMMIT would break the sha256 COMMIT
        records, and with it every open of the store."""
        try:
            if self._beat is not None:
                self._beat.check()
            if self.loc.exists(SEGMENTS, self.seg_id, "COMMIT"):
                raise DdxError(
                    f"Segment {self.seg_id!r} of {self.loc.url!r} was committed by another process while this writer "
                    f"had it open (salvaged as abandoned); its {self.rows_flushed} flushed rows are stored. Nothing "
                    "more is written to it: rerun the same command to encode the rest."
                )
        except DdxError:
            self._lost = True
            raise

    def commit(self) -> int:
        """Flush the last rows, write index.parquet and then COMMIT; returns the row count.

        Committing again is a no-op (a second commit used to rewrite the segment as empty).
        """
        if self.committed:
            return self.rows_flushed
        self.flush()
        self._check_still_mine()
        if self._beat is not None:
            self._beat.stop()  # COMMIT ends the segment's life: no heartbeat may follow it
        crcs = [self._crcs[i] for i in range(n_chunks(self.rows_flushed, self.chunk_rows))]
        with self.loc.errors():
            if self._array.shape[0] != self.rows_flushed:
                self._array.resize((self.rows_flushed, self.dim))
        try:  # index.parquet is streamed from the parts (index=None): memory stays flat whatever the rows
            write_commit(
                self.loc, self.seg_id, None, crcs, self.chunk_rows, self._array, salvaged=False, replaces=self.replaces
            )
        except OSError as exc:
            raise _disk_error(exc, self.loc, self.seg_id, self.rows_flushed) from exc
        self.committed = True
        self._release()
        return self.rows_flushed

    def abort(self) -> None:
        """Stop writing; the segment stays uncommitted and the next run salvages or gc removes it.

        A remote writer's last heartbeat says it closed, so the next run salvages at once instead of
        waiting out ``stale_after`` (best effort: an abort is often an error path, the network's included).
        """
        beating = self._beat is not None and self._beat.running
        self._release()
        if beating and not self.committed and not self._lost:  # a lost segment gets no more writes
            with contextlib.suppress(Exception):
                self._heartbeat(closed=True)

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _take_lock(self) -> None:
        path = self.loc.local_path(SEGMENTS, self.seg_id, ".lock")
        if path is None:
            return
        import fcntl

        self._lock_fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        # Blocking: the segment id is new, so nobody else ever holds this lock exclusively; a concurrent
        # state probe (storage.claim.flock_held) holds a shared lock for an instant, and a non-blocking
        # request would fail the writer in that instant.
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def _release(self) -> None:
        if self._beat is not None:
            self._beat.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _heartbeat(self, *, closed: bool = False) -> None:
        """Write HEARTBEAT: the time and the rows flushed (``closed``: this writer stopped for good)."""
        with self._beat_lock:
            doc: dict[str, Any] = {"time": time.time(), "rows": self.rows_flushed, "pid": os.getpid()}
            if closed:
                doc["closed"] = True
            try:
                self.loc.write_atomic(json.dumps(doc).encode(), SEGMENTS, self.seg_id, "HEARTBEAT")
            except OSError as exc:
                raise _disk_error(exc, self.loc, self.seg_id, self.rows_flushed) from exc
        if self._beat is not None:
            self._beat.ok()

    def _start_beat(self) -> None:
        """Remote stores: beat from a daemon thread every few seconds until commit or abort (local: the flock)."""
        if self.loc.is_local:
            return
        stale = stale_after(self.loc)
        what = f"Segment {self.seg_id!r} of store {self.loc.url!r}"
        self._beat = Beat(self._heartbeat, interval=beat_interval(stale), stale=stale, what=what).start()


def _create_array(
    loc: Location,
    seg_id: str,
    *,
    dim: int,
    dtype: str,
    chunk_rows: int,
    rank: int,
    world: int,
    replaces: list[str] | None,
) -> Any:
    """The segment's group (attributes name the writer, and a compaction's sources) and its empty vector array."""
    writer: dict[str, str | int | float] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "rank": rank,
        "world_size": world,
        "started": time.time(),
    }
    attrs: dict[str, Any] = {"writer": writer, "chunk_rows": chunk_rows}
    if replaces:
        attrs["replaces"] = sorted(replaces)
    with loc.errors():
        return _create_group_array(loc, seg_id, dim=dim, dtype=dtype, chunk_rows=chunk_rows, attrs=attrs)


def _create_group_array(
    loc: Location, seg_id: str, *, dim: int, dtype: str, chunk_rows: int, attrs: dict[str, Any]
) -> Any:
    import zarr
    from zarr.codecs import BytesCodec, Crc32cCodec

    group = zarr.open_group(
        store=loc.zarr_store(), path=f"{SEGMENTS}/{seg_id}", mode="w-", attributes={"ddx_segment": attrs}
    )
    array = group.create_array(
        "vectors",
        shape=(0, dim),
        chunks=(chunk_rows, dim),
        dtype=dtype,
        fill_value=0,
        serializer=BytesCodec(endian="little"),
        compressors=[Crc32cCodec()],
        filters=None,
        config={"write_empty_chunks": True},  # chunk files are written by SegmentWriter, never skipped
    )
    return array


def _disk_error(exc: OSError, loc: Location, seg_id: str, rows: int) -> Exception:
    import errno

    if isinstance(exc, DiskFullError) or exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"Disk full while writing segment {seg_id!r} of store {loc.url!r}: {rows} rows of this run are saved, "
            "committed segments are untouched. Free space and rerun the same command to resume."
        )
    return exc
