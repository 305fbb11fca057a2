"""The on-disk format of a segment, shared by its writer and its readers: paths, key index, COMMIT.

A segment is one writer's immutable slice of a store. Layout of ``segments/<id>/``::

    zarr.json          group; attributes name the writer
    vectors/           Zarr v3 array (rows, dim), chunks of ``chunk_rows`` rows, codecs bytes + crc32c
    parts/part-N.parquet  key index of the rows flushed so far (while the segment is open)
    index.parquet      key, row, role, n_tokens of every row (written at commit)
    COMMIT             JSON, written last and atomically: rows, chunk checksums, index sha256

With codecs ``bytes`` + ``crc32c`` and no compression, a chunk file is the raw little-endian rows
followed by a 4-byte CRC32C, so readers memory-map it directly (see DESIGN: zarr's own decode path
gathers 1–7 k random rows/s, a memory map ~1 M) while any Zarr v3 implementation can still read it.
"""

from __future__ import annotations

import hashlib
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

from storage.errors import IntegrityError
from storage.fs import Location
from storage.keys import KEY_BYTES, KEY_DTYPE

__all__ = [
    "INDEX_SCHEMA",
    "SEGMENTS",
    "IndexColumns",
    "chunk_crc",
    "chunk_file",
    "n_chunks",
    "new_segment_id",
    "read_index_bytes",
    "read_parts",
    "write_commit",
]

SEGMENTS = "segments"
INDEX_SCHEMA = pa.schema(
    [("key", pa.binary(KEY_BYTES)), ("row", pa.int64()), ("role", pa.uint8()), ("n_tokens", pa.int32())]
)


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


def n_chunks(rows: int, chunk_rows: int) -> int:
    """Chunks that ``rows`` rows fill (the last one may be partial)."""
    return -(-rows // chunk_rows)


def chunk_file(seg_id: str, chunk: int) -> tuple[str, ...]:
    """Path parts of chunk ``chunk``'s file (zarr v3 default keys: ``vectors/c/<chunk>/0``)."""
    return (SEGMENTS, seg_id, "vectors", "c", str(chunk), "0")


def read_parts(loc: Location, seg_id: str) -> list[IndexColumns]:
    """The index parts an open segment has flushed so far, in order."""
    names = [n for n in loc.listdir(SEGMENTS, seg_id, "parts") if n.endswith(".parquet")]
    return [read_index_bytes(loc.read_bytes(SEGMENTS, seg_id, "parts", n)) for n in sorted(names)]


def write_commit(
    loc: Location, seg_id: str, index: IndexColumns, crcs: list[int], chunk_rows: int, array: Any, *, salvaged: bool
) -> None:
    """Write index.parquet, then COMMIT (the commit marker, last), then drop the parts and the heartbeat."""
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
