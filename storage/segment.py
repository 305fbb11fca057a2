"""Segments after their writer: reading committed ones, telling live from abandoned, salvaging the dead.

A reader memory-maps the chunk files of a local store (plain layout, see :mod:`storage.segment_format`)
and reads through zarr otherwise. An uncommitted segment is *active* while its writer holds the lock
(local) or beats its heartbeat (remote), else *abandoned*: :func:`salvage_segment` commits the rows
its index parts cover. The writer lives in :mod:`storage.segment_writer`; its names are re-exported
here, so ``storage.segment`` stays the one import path for segments.
"""

from __future__ import annotations

import calendar
import json
import os
import time
from typing import Any

import google_crc32c
import numpy as np

from storage.errors import IntegrityError
from storage.fs import Location
from storage.segment_format import (
    SEGMENTS,
    IndexColumns,
    chunk_file,
    n_chunks,
    new_segment_id,
    read_index_bytes,
    read_parts,
    write_commit,
)
from storage.segment_writer import SegmentWriter

__all__ = [
    "SEGMENTS",
    "IndexColumns",
    "SegmentReader",
    "SegmentWriter",
    "new_segment_id",
    "read_index_bytes",
    "salvage_segment",
    "segment_state",
]

STALE_HEARTBEAT_S = 15 * 60  # a remote writer silent this long is presumed dead


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
    parts = read_parts(loc, seg_id)
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
    crcs = [_read_chunk_trailer(loc, seg_id, i) for i in range(n_chunks(keep, chunk_rows))]
    write_commit(loc, seg_id, index, crcs, chunk_rows, array, salvaged=True)
    return keep


def _zarr_array(loc: Location, seg_id: str) -> Any:
    """The segment's vector array (a ``zarr.Array``), opened for resizing."""
    import zarr

    return zarr.open_array(store=loc.zarr_store(), path=f"{SEGMENTS}/{seg_id}/vectors", mode="r+")


def _read_chunk_trailer(loc: Location, seg_id: str, chunk: int) -> int:
    data = loc.read_bytes(*chunk_file(seg_id, chunk))
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
        return n_chunks(self.rows, self.chunk_rows)

    def index(self) -> IndexColumns:
        return read_index_bytes(self.loc.read_bytes(SEGMENTS, self.seg_id, "index.parquet"))

    def chunk(self, i: int) -> np.ndarray:
        """Rows of chunk ``i`` (a read-only memory map for local stores; padded rows included)."""
        cached = self._maps.get(i)
        if cached is not None:
            return cached
        path = self.loc.local_path(*chunk_file(self.seg_id, i))
        if path is not None and self._plain:
            expected = self.chunk_rows * self.dim * self.dtype.itemsize + 4
            size = path.stat().st_size if path.exists() else -1
            if size != expected:
                raise IntegrityError(
                    f"Chunk file {path} has {size} bytes, expected {expected}. Run 'ddx cache verify {self.loc.url}'."
                )
            arr: np.ndarray = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.chunk_rows, self.dim))
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
            data = self.loc.read_bytes(*chunk_file(self.seg_id, i))
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
