"""One writer's immutable slice of a store: Zarr v3 vectors, an Arrow key index, a COMMIT marker.

Layout of ``segments/<id>/``::

    zarr.json          group; attributes name the writer
    vectors/           Zarr v3 array (rows, dim), chunks of ``chunk_rows`` rows, codecs bytes + crc32c
    parts/part-N.parquet  key index of the rows flushed so far (while the segment is open)
    index.parquet      key, row, role, n_tokens of every row (written at commit)
    COMMIT             JSON, written last and atomically: rows, chunk checksums, index sha256

With codecs ``bytes`` + ``crc32c`` and no compression, a chunk file is the raw little-endian rows
followed by a 4-byte CRC32C, so readers memory-map it directly (see DESIGN: zarr's own decode path
gathers 1–7 k random rows/s, a memory map ~1 M) while any Zarr v3 implementation can still read it.

Flushing: rows are written chunk by chunk; an index part follows each write and is what makes
those rows count. A time-based flush rewrites the current (partial) chunk atomically, so a crash
loses at most the rows since the last flush, and :func:`salvage_segment` commits what the parts cover.
"""

from __future__ import annotations

import calendar
import io
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import DiskFullError, IntegrityError
from storage.fs import Location
from storage.keys import KEY_BYTES, KEY_DTYPE

__all__ = [
    "SegmentReader",
    "SegmentWriter",
    "new_segment_id",
    "salvage_segment",
    "segment_state",
]

SEGMENTS = "segments"
INDEX_SCHEMA = pa.schema(
    [("key", pa.binary(KEY_BYTES)), ("row", pa.int64()), ("role", pa.uint8()), ("n_tokens", pa.int32())]
)
STALE_HEARTBEAT_S = 15 * 60  # a remote writer silent this long is presumed dead


def new_segment_id(rank: int = 0, world_size: int = 1) -> str:
    """Sortable, unique id: UTC time, host, pid, rank and a random suffix."""
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:24]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{stamp}-{host}-{os.getpid()}-r{rank}of{world_size}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class IndexColumns:
    """A segment's key index as numpy arrays."""

    keys: np.ndarray  # S16
    rows: np.ndarray  # int64
    roles: np.ndarray  # uint8
    n_tokens: np.ndarray  # int32

    @classmethod
    def from_table(cls, table: pa.Table) -> IndexColumns:
        keys = table.column("key").combine_chunks()
        key_bytes = keys.buffers()[1]
        offset = keys.offset * KEY_BYTES
        raw = np.frombuffer(key_bytes, dtype=np.uint8)[offset : offset + len(keys) * KEY_BYTES]
        return cls(
            keys=raw.view(KEY_DTYPE).copy(),
            rows=table.column("row").to_numpy().astype(np.int64),
            roles=table.column("role").to_numpy().astype(np.uint8),
            n_tokens=table.column("n_tokens").to_numpy().astype(np.int32),
        )

    def to_parquet_bytes(self) -> bytes:
        keys = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(KEY_BYTES), len(self.keys), [None, pa.py_buffer(self.keys.tobytes())]
        )
        table = pa.table([keys, self.rows, self.roles, self.n_tokens], schema=INDEX_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    @staticmethod
    def concat(parts: list[IndexColumns]) -> IndexColumns:
        if not parts:
            return IndexColumns(
                np.empty(0, KEY_DTYPE), np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.int32)
            )
        return IndexColumns(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("keys", "rows", "roles", "n_tokens"))
        )


def read_index_bytes(data: bytes) -> IndexColumns:
    return IndexColumns.from_table(pq.read_table(pa.BufferReader(data)))


def chunk_crc(block: np.ndarray) -> int:
    """CRC32C of a chunk's raw bytes, the value zarr's crc32c codec appends to the chunk file."""
    return int(google_crc32c.value(np.ascontiguousarray(block).tobytes()))


def _zarr_array(loc: Location, seg_id: str):
    import zarr

    return zarr.open_array(store=loc.zarr_store(), path=f"{SEGMENTS}/{seg_id}/vectors", mode="r+")


class SegmentWriter:
    """Appends (key, vector) rows to a new segment and commits it.

    Use as a context manager: the segment is committed when the block ends normally, and left
    uncommitted (salvageable, never half-committed) when it raises.

    Example:
        >>> with SegmentWriter.create(loc, dim=32, dtype="float16", chunk_rows=1024) as w:
        ...     w.append(keys, vectors, roles, n_tokens)
    """

    def __init__(self, loc: Location, seg_id: str, array: Any, *, chunk_rows: int, flush_seconds: float) -> None:
        self.loc, self.seg_id, self._array = loc, seg_id, array
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
        self.committed = False

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
    ) -> SegmentWriter:
        """Create the segment's group and empty vector array, and take its writer lock."""
        import zarr
        from zarr.codecs import BytesCodec, Crc32cCodec

        seg_id = seg_id or new_segment_id(rank, world_size)
        writer = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rank": rank,
            "world_size": world_size,
            "started": time.time(),
        }
        group = zarr.open_group(
            store=loc.zarr_store(),
            path=f"{SEGMENTS}/{seg_id}",
            mode="w-",
            attributes={"ddx_segment": {"writer": writer, "chunk_rows": chunk_rows}},
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
            # zarr skips chunks that equal the fill value; readers memory-map every chunk file, so write them all
            config={"write_empty_chunks": True},
        )
        self = cls(loc, seg_id, array, chunk_rows=chunk_rows, flush_seconds=flush_seconds)
        self._take_lock()
        self._heartbeat()
        return self

    def append(self, keys: np.ndarray, vectors: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray) -> None:
        """Buffer rows; full chunks (and the partial one, every ``flush_seconds``) reach disk."""
        if self.committed:
            raise ValueError(f"Segment {self.seg_id!r} is committed and immutable; append through a new writer.")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(keys):
            raise ValueError(f"Expected vectors of shape ({len(keys)}, {self.dim}), got {vectors.shape}.")
        start = 0
        while start < len(keys):
            take = min(self.chunk_rows - self._buf_n, len(keys) - start)
            sl = slice(start, start + take)
            self._buf_vectors[self._buf_n : self._buf_n + take] = vectors[sl]
            rows = self._chunk_start + self._buf_n + np.arange(take, dtype=np.int64)
            self._buf_index.append(
                IndexColumns(
                    np.asarray(keys[sl], KEY_DTYPE),
                    rows,
                    np.asarray(roles[sl], np.uint8),
                    np.asarray(n_tokens[sl], np.int32),
                )
            )
            self._buf_n += take
            start += take
            if self._buf_n == self.chunk_rows:
                self._flush_chunk(complete=True)
        if self._buf_n > self._buf_flushed and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the partial chunk now (atomically replacing its earlier version)."""
        if self._buf_n > self._buf_flushed:
            self._flush_chunk(complete=False)

    def _padded_buffer(self) -> np.ndarray:
        """The chunk as zarr stores it: rows past ``_buf_n`` hold the fill value 0."""
        if self._buf_n == self.chunk_rows:
            return self._buf_vectors
        padded = self._buf_vectors.copy()
        padded[self._buf_n :] = 0
        return padded

    @property
    def _chunk_start(self) -> int:
        return self.rows_flushed - self._buf_flushed

    def _flush_chunk(self, *, complete: bool) -> None:
        chunk = self._chunk_start // self.chunk_rows
        end = self._chunk_start + self._buf_n
        try:
            if end > self._array.shape[0]:
                self._array.resize((end, self.dim))
            block = self._buf_vectors if complete else self._buf_vectors[: self._buf_n]
            self._array[self._chunk_start : end] = block
            self._crcs[chunk] = chunk_crc(self._padded_buffer())
            part = IndexColumns.concat(self._buf_index)
            new = part.rows >= self.rows_flushed
            sub = IndexColumns(part.keys[new], part.rows[new], part.roles[new], part.n_tokens[new])
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

    def commit(self) -> int:
        """Flush the last rows, write index.parquet and then COMMIT; returns the row count.

        Committing again is a no-op (a second commit used to rewrite the segment as empty).
        """
        if self.committed:
            return self.rows_flushed
        self.flush()
        parts = _read_parts(self.loc, self.seg_id)
        index = IndexColumns.concat(parts)
        crcs = [self._crcs[i] for i in range(_n_chunks(self.rows_flushed, self.chunk_rows))]
        try:
            _write_commit(self.loc, self.seg_id, index, crcs, self.chunk_rows, self._array, salvaged=False)
        except OSError as exc:
            raise _disk_error(exc, self.loc, self.seg_id, self.rows_flushed) from exc
        self.committed = True
        self._release()
        return self.rows_flushed

    def abort(self) -> None:
        """Stop writing; the segment stays uncommitted and the next run salvages or gc removes it."""
        self._release()

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
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _heartbeat(self) -> None:
        payload = json.dumps({"time": time.time(), "rows": self.rows_flushed}).encode()
        try:
            self.loc.write_atomic(payload, SEGMENTS, self.seg_id, "HEARTBEAT")
        except OSError as exc:
            raise _disk_error(exc, self.loc, self.seg_id, self.rows_flushed) from exc


def _disk_error(exc: OSError, loc: Location, seg_id: str, rows: int) -> Exception:
    import errno

    if isinstance(exc, DiskFullError) or exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"Disk full while writing segment {seg_id!r} of store {loc.url!r}: {rows} rows of this run are saved, "
            "committed segments are untouched. Free space and rerun the same command to resume."
        )
    return exc


def _n_chunks(rows: int, chunk_rows: int) -> int:
    return -(-rows // chunk_rows)


def _read_parts(loc: Location, seg_id: str) -> list[IndexColumns]:
    names = [n for n in loc.listdir(SEGMENTS, seg_id, "parts") if n.endswith(".parquet")]
    return [read_index_bytes(loc.read_bytes(SEGMENTS, seg_id, "parts", n)) for n in sorted(names)]


def _write_commit(
    loc: Location, seg_id: str, index: IndexColumns, crcs: list[int], chunk_rows: int, array: Any, *, salvaged: bool
) -> None:
    import hashlib

    rows = len(index.keys)
    if rows != (int(index.rows.max()) + 1 if rows else 0) or len(np.unique(index.rows)) != rows:
        raise IntegrityError(f"Segment {seg_id!r}: index rows are not 0..{rows - 1} exactly once.")
    if array.shape[0] != rows:
        array.resize((rows, array.shape[1]))
    index_bytes = index.to_parquet_bytes()
    loc.write_atomic(index_bytes, SEGMENTS, seg_id, "index.parquet")
    commit = {
        "format_version": 1,
        "rows": rows,
        "chunk_rows": chunk_rows,
        "chunk_crc32c": crcs,
        "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        "committed_at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "salvaged": salvaged,
    }
    loc.write_atomic(json.dumps(commit, indent=1).encode(), SEGMENTS, seg_id, "COMMIT")
    loc.remove(SEGMENTS, seg_id, "parts")
    loc.remove(SEGMENTS, seg_id, "HEARTBEAT")


def segment_state(loc: Location, seg_id: str) -> str:
    """'committed', 'active' (a live writer holds it) or 'abandoned' (its writer died)."""
    if loc.exists(SEGMENTS, seg_id, "COMMIT"):
        return "committed"
    lock = loc.local_path(SEGMENTS, seg_id, ".lock")
    if lock is not None:
        if not lock.exists():
            return "active" if _just_created(seg_id) else "abandoned"
        import fcntl

        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "active"
        finally:
            os.close(fd)
        return "abandoned"
    try:
        beat = json.loads(loc.read_bytes(SEGMENTS, seg_id, "HEARTBEAT"))["time"]
    except (FileNotFoundError, KeyError, ValueError):
        return "active" if _just_created(seg_id) else "abandoned"
    return "active" if time.time() - beat < STALE_HEARTBEAT_S else "abandoned"


def _just_created(seg_id: str) -> bool:
    """True when the id's UTC stamp is younger than the heartbeat timeout.

    A writer creates its segment's group before it takes the lock and writes the first heartbeat;
    without this grace period a concurrent ``gc`` would delete a segment that is just starting.
    """
    try:
        started = calendar.timegm(time.strptime(seg_id[:15], "%Y%m%dT%H%M%S"))
    except ValueError:
        return False
    return time.time() - started < STALE_HEARTBEAT_S


def salvage_segment(loc: Location, seg_id: str) -> int:
    """Commit the rows an abandoned segment's index parts cover; returns how many (0: removed).

    Rows past the last part (written but never indexed) are dropped: that is the at-most-one-flush
    loss a crash costs. A segment with nothing to keep is deleted.
    """
    try:
        array = _zarr_array(loc, seg_id)
    except Exception:  # no readable array: nothing to keep
        loc.remove(SEGMENTS, seg_id)
        return 0
    parts = _read_parts(loc, seg_id)
    index = IndexColumns.concat(parts)
    if len(index.keys) == 0:
        loc.remove(SEGMENTS, seg_id)
        return 0
    order = np.argsort(index.rows, kind="stable")
    index = IndexColumns(index.keys[order], index.rows[order], index.roles[order], index.n_tokens[order])
    gaps = np.flatnonzero(index.rows != np.arange(len(index.rows)))
    keep = int(gaps[0]) if len(gaps) else len(index.rows)  # rows 0..keep-1 are all covered
    index = IndexColumns(index.keys[:keep], index.rows[:keep], index.roles[:keep], index.n_tokens[:keep])
    chunk_rows = int(array.chunks[0])
    array.resize((keep, array.shape[1]))
    crcs = [_read_chunk_trailer(loc, seg_id, i) for i in range(_n_chunks(keep, chunk_rows))]
    _write_commit(loc, seg_id, index, crcs, chunk_rows, array, salvaged=True)
    return keep


def _chunk_file(seg_id: str, chunk: int) -> tuple[str, ...]:
    return (SEGMENTS, seg_id, "vectors", "c", str(chunk), "0")


def _read_chunk_trailer(loc: Location, seg_id: str, chunk: int) -> int:
    data = loc.read_bytes(*_chunk_file(seg_id, chunk))
    return int.from_bytes(data[-4:], "little")


class SegmentReader:
    """Read access to one committed segment: its index and its chunk memory maps."""

    def __init__(self, loc: Location, seg_id: str) -> None:
        self.loc, self.seg_id = loc, seg_id
        self.commit: dict[str, Any] = json.loads(loc.read_bytes(SEGMENTS, seg_id, "COMMIT"))
        self.rows: int = int(self.commit["rows"])
        self.chunk_rows: int = int(self.commit["chunk_rows"])
        meta = json.loads(loc.read_bytes(SEGMENTS, seg_id, "vectors", "zarr.json"))
        self.dim = int(meta["shape"][1])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self._plain = _is_plain_layout(meta, self.chunk_rows)
        self._maps: dict[int, np.ndarray] = {}
        self._array: Any = None

    @property
    def n_chunks(self) -> int:
        return _n_chunks(self.rows, self.chunk_rows)

    def index(self) -> IndexColumns:
        return read_index_bytes(self.loc.read_bytes(SEGMENTS, self.seg_id, "index.parquet"))

    def chunk(self, i: int) -> np.ndarray:
        """Rows of chunk ``i`` (a read-only memory map for local stores; padded rows included)."""
        cached = self._maps.get(i)
        if cached is not None:
            return cached
        path = self.loc.local_path(*_chunk_file(self.seg_id, i))
        if path is not None and self._plain:
            expected = self.chunk_rows * self.dim * self.dtype.itemsize + 4
            size = path.stat().st_size if path.exists() else -1
            if size != expected:
                raise IntegrityError(
                    f"Chunk file {path} has {size} bytes, expected {expected}. Run 'ddx cache verify {self.loc.url}'."
                )
            arr = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.chunk_rows, self.dim))
        else:
            arr = self._zarr_chunk(i)
        self._maps[i] = arr
        return arr

    def _zarr_chunk(self, i: int) -> np.ndarray:
        if self._array is None:
            import zarr

            path = f"{SEGMENTS}/{self.seg_id}/vectors"
            self._array = zarr.open_array(store=self.loc.zarr_store(), path=path, mode="r")
        stop = min((i + 1) * self.chunk_rows, self.rows)
        out = np.zeros((self.chunk_rows, self.dim), dtype=self.dtype)
        out[: stop - i * self.chunk_rows] = self._array[i * self.chunk_rows : stop]
        return out

    def verify_chunk(self, i: int) -> str | None:
        """None when chunk ``i`` matches its trailer and COMMIT's checksum, else what is wrong."""
        try:
            data = self.loc.read_bytes(*_chunk_file(self.seg_id, i))
        except FileNotFoundError:
            return f"chunk {i} is missing"
        expected_len = self.chunk_rows * self.dim * self.dtype.itemsize + 4
        if len(data) != expected_len:
            return f"chunk {i} has {len(data)} bytes, expected {expected_len}"
        computed = int(google_crc32c.value(data[:-4]))
        trailer = int.from_bytes(data[-4:], "little")
        recorded = self.commit["chunk_crc32c"][i] if i < len(self.commit["chunk_crc32c"]) else None
        if computed != trailer or computed != recorded:
            return f"chunk {i} checksum mismatch (computed {computed:08x}, file {trailer:08x}, COMMIT {recorded})"
        return None

    def close(self) -> None:
        """Drop this reader's maps; each unmaps once no array still views it.

        Closing the mmap here would leave views handed out earlier (``iter_batches`` yields views)
        pointing at unmapped memory: reading them crashes the process.
        """
        self._maps.clear()


def _is_plain_layout(meta: dict[str, Any], chunk_rows: int) -> bool:
    """True when chunk files are raw little-endian rows + crc32c at the default keys (memory-mappable)."""
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    endian = (meta.get("codecs") or [{}])[0].get("configuration", {}).get("endian", "little")
    enc = meta.get("chunk_key_encoding", {})
    sep = enc.get("configuration", {}).get("separator", "/")
    chunk_shape = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [None])
    return (
        codecs == ["bytes", "crc32c"]
        and endian == "little"
        and enc.get("name") == "default"
        and sep == "/"
        and chunk_shape[0] == chunk_rows
    )
