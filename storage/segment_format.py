"""The on-disk format of a segment, shared by its writer and its readers: paths, key index, COMMIT.

A segment is one writer's immutable slice of a store. Layout of ``segments/<id>/``::

    zarr.json          group; attributes name the writer
    vectors/           Zarr v3 array (rows, dim), chunks of ``chunk_rows`` rows, codecs bytes + crc32c
    parts/part-N.parquet  key index of the rows flushed so far (while the segment is open)
    index.parquet      key, row, role, n_tokens, crc32c of every row (written at commit)
    COMMIT             JSON, written last and atomically: rows, chunk checksums, index sha256, sealed

Row checksums (format 2): ``crc32c`` is CRC32C(key ‖ the row's stored bytes), recorded when the row
is appended. Readers check it on every row they gather, so a changed byte in a chunk, or an index
line that points a key at another row, is an ``IntegrityError`` instead of a wrong vector. Binding
the key matters: a checksum of the row alone would still match when two index lines trade keys.
Format-1 segments have no ``crc32c`` column; their readers check whole chunks instead.

With codecs ``bytes`` + ``crc32c`` and no compression, a chunk file is the raw little-endian rows
followed by a 4-byte CRC32C, so readers read rows at fixed offsets straight from the file (``pread``,
or a memory map; see DESIGN: zarr's own decode path gathers 1–7 k random rows/s) while any Zarr v3
implementation can still read it. A commit fsyncs the chunk files before index.parquet and COMMIT.

Trimmed last chunk (format 3): the writer writes the chunk files itself (:func:`write_chunk`: the bytes
zarr would write), and the last chunk holds only the rows the segment has, not ``chunk_rows`` of them
padded with zeros. A writer does not know its row count in advance (a Ray actor, a run's last rows), and
at 3584-d fp16 the padding of one 4,096-row chunk is 28 MiB: a 10-row top-up cost 28 MiB on disk. Zarr v3's
regular chunk grid cannot describe a shorter last chunk, so zarr-python reads every chunk of a format-3
segment but a partial last one (``vectors/c/<last>/0`` is still rows + CRC32C, readable as raw bytes); ddx's
readers and ``ddx cache verify`` expect exactly :func:`chunk_rows_in` rows in each chunk file. Formats 1
and 2 keep their padded last chunk and stay readable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import IntegrityError
from storage.fs import Location
from storage.keys import KEY_BYTES, KEY_DTYPE, ROLES, keys_from_arrow, keys_to_arrow
from storage.metadata import FORMAT_VERSION, Damage, sealed

__all__ = [
    "INDEX_SCHEMA",
    "SEGMENTS",
    "IndexColumns",
    "IndexSummary",
    "check_rows",
    "chunk_crc",
    "chunk_file",
    "chunk_payload",
    "chunk_rows_in",
    "key_seeds",
    "n_chunks",
    "new_segment_id",
    "read_index_bytes",
    "read_parts",
    "role_counts",
    "row_crcs",
    "stream_index",
    "sync_vectors",
    "write_chunk",
    "write_commit",
    "write_index",
]

SEGMENTS = "segments"
INDEX_SCHEMA_V1 = pa.schema(
    [("key", pa.binary(KEY_BYTES)), ("row", pa.int64()), ("role", pa.uint8()), ("n_tokens", pa.int32())]
)
INDEX_SCHEMA = INDEX_SCHEMA_V1.append(pa.field("crc32c", pa.uint32()))
_FIELDS = ("keys", "rows", "roles", "n_tokens", "crcs")  # IndexColumns, in INDEX_SCHEMA's order
_CONTENT_CRC = b"ddx_content_crc32c"  # parquet metadata: CRC32C of the columns' bytes (parts are not in COMMIT)


def new_segment_id(rank: int = 0, world_size: int = 1) -> str:
    """Sortable, unique id: UTC time, host, pid, rank and a random suffix."""
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:24]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{stamp}-{host}-{os.getpid()}-r{rank}of{world_size}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class IndexColumns:
    """A segment's key index as numpy arrays, one entry per row (``crcs`` is None in format-1 segments)."""

    keys: np.ndarray  # S16
    rows: np.ndarray  # int64
    roles: np.ndarray  # uint8
    n_tokens: np.ndarray  # int32
    crcs: np.ndarray | None  # uint32: CRC32C(key ‖ row bytes)

    @classmethod
    def from_table(cls, table: pa.Table) -> IndexColumns:
        crcs = table.column("crc32c").to_numpy().astype(np.uint32) if "crc32c" in table.column_names else None
        cols = cls(
            keys=keys_from_arrow(table.column("key")),
            rows=table.column("row").to_numpy().astype(np.int64),
            roles=table.column("role").to_numpy().astype(np.uint8),
            n_tokens=table.column("n_tokens").to_numpy().astype(np.int32),
            crcs=crcs,
        )
        recorded = (table.schema.metadata or {}).get(_CONTENT_CRC)
        if recorded is not None and int(recorded) != cols.content_crc():
            computed = cols.content_crc()
            raise IntegrityError(f"content does not match its checksum ({computed:08x} != {int(recorded):08x})")
        return cols

    def content_crc(self) -> int:
        """CRC32C over every column's bytes, in field order (written into the parquet metadata)."""
        crc = 0
        for name in _FIELDS:
            col = getattr(self, name)
            if col is not None:
                crc = google_crc32c.extend(crc, np.ascontiguousarray(col).tobytes())
        return int(crc)

    def to_table(self) -> pa.Table:
        """The columns as an Arrow table of INDEX_SCHEMA (INDEX_SCHEMA_V1 without row checksums)."""
        columns = [keys_to_arrow(self.keys), self.rows, self.roles, self.n_tokens]
        if self.crcs is not None:
            columns.append(self.crcs)
        return pa.table(columns, schema=INDEX_SCHEMA_V1 if self.crcs is None else INDEX_SCHEMA)

    def to_parquet_bytes(self) -> bytes:
        """Parquet with the content checksum in its metadata (parts; salvaged indexes)."""
        table = self.to_table()
        table = table.replace_schema_metadata({_CONTENT_CRC: str(self.content_crc()).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    def take(self, sel: np.ndarray | slice) -> IndexColumns:
        """The entries at ``sel`` (indices, mask or slice), every column kept."""
        crcs = None if self.crcs is None else self.crcs[sel]
        return IndexColumns(self.keys[sel], self.rows[sel], self.roles[sel], self.n_tokens[sel], crcs)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: list[IndexColumns]) -> IndexColumns:
        """One index from parts of one segment (all of one format)."""
        if not parts:
            empty = [np.empty(0, t) for t in (KEY_DTYPE, np.int64, np.uint8, np.int32, np.uint32)]
            return IndexColumns(*empty)
        if len({p.crcs is None for p in parts}) > 1:
            raise IntegrityError("index parts mix formats (some have row checksums, some do not)")
        crcs = None if parts[0].crcs is None else np.concatenate([p.crcs for p in parts if p.crcs is not None])
        keys, rows, roles, n_tokens = (np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS[:4])
        return IndexColumns(keys, rows, roles, n_tokens, crcs)


def read_index_bytes(data: bytes) -> IndexColumns:
    """Parse an index file or part.

    Raises:
        IntegrityError: it is not readable Parquet, lacks a column, or its content checksum fails.
    """
    try:
        return IndexColumns.from_table(pq.read_table(pa.BufferReader(data)))
    except IntegrityError:
        raise
    except (pa.ArrowException, KeyError, ValueError, OSError) as exc:
        raise IntegrityError(f"not a readable index ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc


def key_seeds(keys: np.ndarray) -> np.ndarray:
    """CRC32C of each key: the state a row checksum starts from (see :func:`row_crcs`)."""
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, KEY_BYTES)
    return np.fromiter(map(google_crc32c.value, raw), dtype=np.uint32, count=len(raw))


def row_crcs(seeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """CRC32C(key ‖ row bytes) of each row of ``rows`` (C-contiguous, storage dtype), given its key's seed.

    One C call a row (~0.45 µs for a 7 KiB row); CRC32C has no multi-buffer form to vectorise further.
    """
    return np.fromiter(map(google_crc32c.extend, seeds.tolist(), rows), dtype=np.uint32, count=len(rows))


def check_rows(seeds: np.ndarray, expected: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions of ``rows`` whose checksum differs from ``expected`` (empty when all match)."""
    return np.flatnonzero(row_crcs(seeds, rows) != expected)


def chunk_crc(block: np.ndarray) -> int:
    """CRC32C of a chunk's raw bytes, the value zarr's crc32c codec appends to the chunk file."""
    return int(google_crc32c.value(np.ascontiguousarray(block).tobytes()))


def n_chunks(rows: int, chunk_rows: int) -> int:
    """Chunks that ``rows`` rows fill (the last one may be partial)."""
    return -(-rows // chunk_rows)


def chunk_rows_in(rows: int, chunk_rows: int, chunk: int, *, trimmed: bool) -> int:
    """Rows chunk ``chunk``'s file holds: ``chunk_rows``, except the last chunk of a trimmed (format-3) segment,
    which holds only its own rows (formats 1 and 2 pad it with zeros to ``chunk_rows``, as zarr does).
    """
    return min(chunk_rows, rows - chunk * chunk_rows) if trimmed else chunk_rows


def chunk_payload(block: np.ndarray) -> tuple[bytes, int]:
    """(file bytes, CRC32C of the data) of a chunk holding ``block``'s rows: raw rows + 4-byte little-endian CRC32C,
    what zarr's ``bytes`` + ``crc32c`` codecs write for a chunk of that shape."""
    data = np.ascontiguousarray(block).tobytes()
    crc = int(google_crc32c.value(data))
    return data + crc.to_bytes(4, "little"), crc


def write_chunk(loc: Location, seg_id: str, chunk: int, block: np.ndarray) -> int:
    """Write chunk ``chunk`` of the segment holding exactly ``block``'s rows, atomically; returns its data's CRC32C.

    A partial chunk rewritten by a later flush is replaced whole (readers see the old file or the new one). Not
    fsynced here: a commit (or salvage) fsyncs every chunk file before COMMIT (:func:`sync_vectors`).
    """
    payload, crc = chunk_payload(block)
    loc.write_atomic(payload, *chunk_file(seg_id, chunk), sync=False)
    return crc


def chunk_file(seg_id: str, chunk: int) -> tuple[str, ...]:
    """Path parts of chunk ``chunk``'s file (zarr v3 default keys: ``vectors/c/<chunk>/0``)."""
    return (SEGMENTS, seg_id, "vectors", "c", str(chunk), "0")


def sync_vectors(loc: Location, seg_id: str, chunks: int) -> None:
    """fsync every chunk file of the segment, then the directories naming them (deepest first).

    zarr writes chunk files without fsync; COMMIT must never reach disk before the rows it vouches
    for, or a power cut right after a commit leaves a committed segment whose vectors are lost.
    """
    vectors = (SEGMENTS, seg_id, "vectors")
    for i in range(chunks):
        loc.fsync(*chunk_file(seg_id, i))
        loc.fsync(*chunk_file(seg_id, i)[:-1])
    if chunks:
        loc.fsync(*vectors, "c")
    loc.fsync(*vectors)
    loc.fsync(SEGMENTS, seg_id)
    loc.fsync(SEGMENTS)  # the segment's own name, or a power cut can drop the whole folder


def sync_vectors_meta(loc: Location, seg_id: str) -> None:
    """fsync ``vectors/zarr.json`` and its folder: zarr rewrites it on every resize (temp file and rename, no
    fsync), and COMMIT records its sha256, which every open checks."""
    loc.fsync(SEGMENTS, seg_id, "vectors", "zarr.json")
    loc.fsync(SEGMENTS, seg_id, "vectors")


def role_counts(roles: np.ndarray) -> dict[str, int]:
    """Rows per role name (what COMMIT records, so ``ddx cache ls`` needs no index)."""
    counts = np.bincount(roles, minlength=len(ROLES)) if len(roles) else np.zeros(len(ROLES), np.int64)
    return {name: int(counts[i]) for i, name in enumerate(ROLES)}


def read_parts(loc: Location, seg_id: str) -> list[IndexColumns]:
    """The index parts an open segment has flushed so far, in order.

    Raises:
        IntegrityError: a part is damaged (the message names it).
    """
    names = [n for n in loc.listdir(SEGMENTS, seg_id, "parts") if n.endswith(".parquet")]
    parts = []
    for name in sorted(names):
        try:
            parts.append(read_index_bytes(loc.read_bytes(SEGMENTS, seg_id, "parts", name)))
        except IntegrityError as exc:
            raise Damage(f"{SEGMENTS}/{seg_id}/parts/{name}", str(exc)).error(loc.url) from exc
    return parts


@dataclass(frozen=True)
class IndexSummary:
    """What COMMIT records of a written index.parquet."""

    rows: int
    roles: dict[str, int]
    sha256: str
    row_checksums: bool


def write_index(loc: Location, seg_id: str, index: IndexColumns) -> IndexSummary:
    """Write ``index`` (in row order, rows 0..n-1 once) as index.parquet, atomically, from memory (salvage).

    Raises:
        IntegrityError: the rows are not 0..n-1 exactly once.
    """
    rows = len(index.keys)
    if rows != (int(index.rows.max()) + 1 if rows else 0) or len(np.unique(index.rows)) != rows:
        raise IntegrityError(f"Segment {seg_id!r}: index rows are not 0..{rows - 1} exactly once.")
    data = index.to_parquet_bytes()
    loc.write_atomic(data, SEGMENTS, seg_id, "index.parquet")
    return IndexSummary(rows, role_counts(index.roles), hashlib.sha256(data).hexdigest(), index.crcs is not None)


def stream_index(loc: Location, seg_id: str) -> IndexSummary:
    """Write index.parquet from the segment's parts one part at a time: memory stays at one part.

    A writer's parts hold consecutive rows in order (each follows its chunk write), so they are checked
    to continue each other and appended as they are; the file is written beside, fsynced, hashed while
    read back, and renamed into place. Remote stores, whose files are written whole, get :func:`write_index`.

    Raises:
        IntegrityError: a part is damaged, or the parts do not hold rows 0..n-1 in order.
    """
    path = loc.local_path(SEGMENTS, seg_id, "index.parquet")
    if path is None:
        return write_index(loc, seg_id, IndexColumns.concat(read_parts(loc, seg_id)))
    tmp = path.with_name(f".index.parquet.{uuid.uuid4().hex[:8]}.tmp")
    rows, counts = 0, np.zeros(len(ROLES), np.int64)
    try:
        # through a Python file: a full disk is an OSError with errno ENOSPC (DiskFullError upstream)
        with open(tmp, "wb") as f, pq.ParquetWriter(f, INDEX_SCHEMA, compression="zstd") as out:
            for part in _iter_parts(loc, seg_id):
                if not np.array_equal(part.rows, np.arange(rows, rows + len(part), dtype=np.int64)):
                    raise IntegrityError(f"Segment {seg_id!r}: index parts do not hold rows 0..n-1 in order.")
                out.write_table(part.to_table())
                rows += len(part)
                counts += np.bincount(part.roles, minlength=len(ROLES))[: len(ROLES)]
        sha = _fsync_and_hash(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    loc.fsync(SEGMENTS, seg_id)
    return IndexSummary(rows, {r: int(counts[i]) for i, r in enumerate(ROLES)}, sha, True)


def _iter_parts(loc: Location, seg_id: str) -> Iterator[IndexColumns]:
    names = sorted(n for n in loc.listdir(SEGMENTS, seg_id, "parts") if n.endswith(".parquet"))
    for name in names:
        try:
            part = read_index_bytes(loc.read_bytes(SEGMENTS, seg_id, "parts", name))
        except IntegrityError as exc:
            raise Damage(f"{SEGMENTS}/{seg_id}/parts/{name}", str(exc)).error(loc.url) from exc
        if part.crcs is None:
            raise IntegrityError(f"Segment {seg_id!r}: part {name} has no row checksums.")
        yield part


def _fsync_and_hash(path: Any) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_commit(
    loc: Location,
    seg_id: str,
    index: IndexColumns | None,
    crcs: list[int],
    chunk_rows: int,
    array: Any,
    *,
    salvaged: bool,
    replaces: list[str] | None = None,
) -> None:
    """fsync the vectors, write index.parquet, then COMMIT (the commit marker, last), then drop the parts.

    ``index`` None streams index.parquet from the parts (a writer's commit: flat memory); an index
    given is written from memory (salvage). An index with row checksums commits as the current format
    (COMMIT sealed, vectors/zarr.json's sha256 in it; the last chunk file must hold its rows only); one
    without (parts an older ddx wrote, salvaged now) commits as format 1, as that ddx would have.
    ``replaces``: the segments whose rows this one holds (a compaction, :mod:`storage.compact`); readers
    skip them from the moment this COMMIT exists.
    """
    rows = int(array.shape[0]) if index is None else len(index.keys)
    sync_vectors(loc, seg_id, n_chunks(rows, chunk_rows))  # the rows are on disk before anything vouches for them
    summary = stream_index(loc, seg_id) if index is None else write_index(loc, seg_id, index)
    rows = summary.rows
    if array.shape[0] != rows:
        array.resize((rows, array.shape[1]))
    commit: dict[str, Any] = {
        "format_version": 1,
        "rows": rows,
        "chunk_rows": chunk_rows,
        "chunk_crc32c": crcs,
        "index_sha256": summary.sha256,
        "committed_at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "salvaged": salvaged,
    }
    if replaces:
        commit["replaces"] = sorted(replaces)
    sync_vectors_meta(loc, seg_id)  # after the last resize: what COMMIT vouches for is on disk first
    if summary.row_checksums:
        meta = loc.read_bytes(SEGMENTS, seg_id, "vectors", "zarr.json")
        commit.update(
            format_version=FORMAT_VERSION,
            dim=int(array.shape[1]),
            dtype=str(np.dtype(array.dtype)),
            vectors_meta_sha256=hashlib.sha256(meta).hexdigest(),
            roles=summary.roles,  # ls/info read COMMITs only; older COMMITs lack it (index read then)
        )
        commit = sealed(commit)
    loc.write_atomic(json.dumps(commit, indent=1).encode(), SEGMENTS, seg_id, "COMMIT")
    loc.remove(SEGMENTS, seg_id, "parts")
    loc.remove(SEGMENTS, seg_id, "HEARTBEAT")
