"""Reading one committed segment, and checking everything read before anyone uses it.

Opening checks ``COMMIT`` and ``vectors/zarr.json`` (:mod:`storage.metadata`); :meth:`SegmentReader.index`
checks ``index.parquet`` against the sha256 in COMMIT and that it names every row once;
:meth:`~SegmentReader.chunk` maps a chunk file after checking its size. What the bytes of a chunk are
checked against depends on the segment's format:

* format 2: each row's CRC32C(key ‖ row), from the index (:meth:`~SegmentReader.row_checks`); gathers
  check every row they return, so a damaged row or an index line pointing a key at another row fails;
* format 1: the chunk's CRC32C in COMMIT (:meth:`~SegmentReader.check_chunk`), checked once per chunk
  by gathers and on every pass by scans.

Every failure is an ``IntegrityError`` naming the file, what is wrong and the repair.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google_crc32c
import numpy as np

from storage.errors import FormatVersionError, IntegrityError
from storage.fs import Location, remote_error
from storage.metadata import (
    FORMAT_VERSION,
    Damage,
    commit_problems,
    commit_store_problems,
    parse_json,
    seal_matches,
    vectors_meta_problems,
)
from storage.segment_format import (
    SEGMENTS,
    IndexColumns,
    chunk_file,
    chunk_rows_in,
    key_seeds,
    n_chunks,
    read_index_bytes,
)

__all__ = ["SegmentReader", "commit_replaces", "read_commit"]


class SegmentReader:
    """Read access to one committed segment: its checked metadata, its index and its chunk files
    (sequential reads for scans, descriptors for ``pread`` gathers, memory maps for the ``mmap`` path).

    Args:
        loc, seg_id: the store and the segment.
        dim, dtype: what the store expects (from its root metadata); None skips that comparison.

    Raises:
        IntegrityError: COMMIT or vectors/zarr.json is missing, unreadable or inconsistent.
        FormatVersionError: the segment was committed by a newer ddx.
    """

    def __init__(
        self,
        loc: Location,
        seg_id: str,
        *,
        dim: int | None = None,
        dtype: str | None = None,
        commit: dict[str, Any] | None = None,
    ) -> None:
        self.loc, self.seg_id = loc, seg_id
        found = commit if commit is not None else read_commit(loc, seg_id)
        if found is None:
            raise self.damage("is missing", "COMMIT")
        self.commit: dict[str, Any] = found
        if problems := commit_store_problems(self.commit, self.file("COMMIT"), dim=dim, dtype=dtype):
            raise problems[0].error(loc.url)
        self.format_version = int(self.commit["format_version"])
        self.rows: int = int(self.commit["rows"])
        self.chunk_rows: int = int(self.commit["chunk_rows"])
        meta = self._read_vectors_meta(dim, dtype)
        self.dim = int(meta["shape"][1])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.plain = _is_plain_layout(meta, self.chunk_rows)
        self._maps: dict[int, np.ndarray] = {}
        self._raw: dict[int, np.ndarray] = {}
        self._array: Any = None

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.rows, self.chunk_rows)

    @property
    def trimmed(self) -> bool:
        """Format 3+: the last chunk file holds only the segment's own rows (no padding)."""
        return self.format_version >= 3

    def rows_in(self, i: int) -> int:
        """Rows chunk ``i``'s file holds (padding included in formats 1 and 2)."""
        return chunk_rows_in(self.rows, self.chunk_rows, i, trimmed=self.trimmed)

    @property
    def replaces(self) -> list[str]:
        """Segments whose rows this one holds (a compaction, :mod:`storage.compact`); readers skip them."""
        return commit_replaces(self.commit)

    @property
    def has_row_checksums(self) -> bool:
        """Format 2+: every row carries a CRC32C bound to its key."""
        return self.format_version >= 2

    def file(self, *parts: str) -> str:
        """Path of a file of this segment below the store root (as damage reports name it)."""
        return "/".join((SEGMENTS, self.seg_id, *parts))

    def damage(self, what: str, *parts: str) -> IntegrityError:
        return Damage(self.file(*parts), what).error(self.loc.url)

    def _read(self, *parts: str) -> bytes:
        try:
            return self.loc.read_bytes(SEGMENTS, self.seg_id, *parts)
        except FileNotFoundError as exc:
            raise self.damage("is missing", *parts) from exc

    def _read_vectors_meta(self, dim: int | None, dtype: str | None) -> dict[str, Any]:
        data = self._read("vectors", "zarr.json")
        problems = vectors_meta_problems(data, self.commit, self.file("vectors", "zarr.json"), dim=dim, dtype=dtype)
        if problems:
            raise problems[0].error(self.loc.url)
        meta, _ = parse_json(data)
        assert meta is not None  # no problems: it parsed
        return meta

    # -- index ---------------------------------------------------------------------------------

    def index(self) -> IndexColumns:
        """The segment's key index, checked against COMMIT (sha256, one entry per row, row checksums)."""
        data = self._read("index.parquet")
        if hashlib.sha256(data).hexdigest() != self.commit["index_sha256"]:
            raise self.damage("does not match the sha256 recorded in COMMIT", "index.parquet")
        try:
            cols = read_index_bytes(data)
        except IntegrityError as exc:
            raise self.damage(str(exc), "index.parquet") from exc
        if problem := self._index_problem(cols):
            raise self.damage(problem, "index.parquet")
        return cols

    def _index_problem(self, cols: IndexColumns) -> str | None:
        rows = cols.rows
        seen = np.zeros(self.rows, dtype=bool)
        in_range = len(rows) == self.rows and (not len(rows) or (rows.min() >= 0 and rows.max() < self.rows))
        if in_range:
            seen[rows] = True
        if not in_range or not seen.all():
            return f"has {len(rows)} entries, not rows 0..{self.rows - 1} exactly once"
        if self.has_row_checksums and cols.crcs is None:
            return f"has no crc32c column (format {self.format_version} records a checksum per row)"
        return None

    def row_checks(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(CRC32C of the key, recorded CRC32C(key ‖ row)) per row, in row order; None in format 1.

        Costs 8 bytes a row and one CRC call per key (~0.25 µs) when built.
        """
        if not self.has_row_checksums:
            return None
        cols = self.index()
        assert cols.crcs is not None  # checked by index()
        seeds, tags = np.empty(self.rows, np.uint32), np.empty(self.rows, np.uint32)
        seeds[cols.rows] = key_seeds(cols.keys)
        tags[cols.rows] = cols.crcs
        return seeds, tags

    # -- chunks --------------------------------------------------------------------------------

    def chunk(self, i: int) -> np.ndarray:
        """Rows of chunk ``i`` (a read-only memory map for local stores; formats 1-2: padded rows included).

        Raises:
            IntegrityError: the chunk file is missing or has the wrong size.
        """
        cached = self._maps.get(i)
        if cached is not None:
            return cached
        path = self.loc.local_path(*chunk_file(self.seg_id, i))
        if path is not None and self.plain:
            size = path.stat().st_size if path.exists() else -1
            if (problem := self.size_problem(i, size)) is not None:
                raise self.damage(problem, *chunk_file(self.seg_id, i)[2:])
            raw = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
            self._raw[i] = raw
            arr = raw[:-4].view(self.dtype).reshape(self.rows_in(i), self.dim)
        else:
            arr = self._zarr_chunk(i)
        self._maps[i] = arr
        return arr

    def size_problem(self, i: int, size: int) -> str | None:
        """What is wrong with chunk ``i``'s file being ``size`` bytes (-1: missing), or None."""
        rows = self.rows_in(i)
        expected = rows * self.dim * self.dtype.itemsize + 4
        if size < 0:
            return "is missing"
        if size != expected:
            return f"has {size} bytes, expected {expected} ({rows} x {self.dim} {self.dtype.name} + CRC)"
        return None

    def _zarr_chunk(self, i: int) -> np.ndarray:
        if self.rows_in(i) < self.chunk_rows:  # format 3's trimmed last chunk: zarr expects a full one
            return self._raw_chunk(i)
        try:
            if self._array is None:
                import zarr

                path = f"{SEGMENTS}/{self.seg_id}/vectors"
                self._array = zarr.open_array(store=self.loc.zarr_store(), path=path, mode="r")
            stop = min((i + 1) * self.chunk_rows, self.rows)
            out = np.zeros((self.chunk_rows, self.dim), dtype=self.dtype)
            out[: stop - i * self.chunk_rows] = self._array[i * self.chunk_rows : stop]
        except Exception as exc:  # zarr raises several types for damaged or missing chunks
            if (network := None if self.loc.is_local else remote_error(self.loc.url, exc)) is not None:
                raise network from exc  # not damage: the store could not be reached
            raise self.damage(f"cannot be read ({type(exc).__name__}: {exc})", *chunk_file(self.seg_id, i)[2:]) from exc
        return out

    def _raw_chunk(self, i: int) -> np.ndarray:
        """Chunk ``i`` from its file's bytes (size and CRC32C checked), as ``chunk_rows`` rows padded with zeros."""
        try:
            data = self.read_raw(i)
        except FileNotFoundError as exc:
            raise self.damage("is missing", *chunk_file(self.seg_id, i)[2:]) from exc
        if (problem := self.raw_problem(i, data)) is not None:
            raise self.damage(problem, *chunk_file(self.seg_id, i)[2:])
        out = np.zeros((self.chunk_rows, self.dim), dtype=self.dtype)
        out[: self.rows_in(i)] = data[:-4].view(self.dtype).reshape(-1, self.dim)
        return out

    def check_chunk(self, i: int) -> None:
        """Raise unless chunk ``i``'s data matches the CRC32C in COMMIT (what scans and format-1 gathers check)."""
        if i in self._raw or (self.plain and self.loc.is_local):
            self.chunk(i)
            problem = self._crc_problem(i, self._raw[i], trailer=False)
        else:
            problem = self.chunk_problem(i, trailer=False)
        if problem is not None:
            raise self.damage(problem, *chunk_file(self.seg_id, i)[2:])

    def chunk_problem(self, i: int, *, trailer: bool = True) -> str | None:
        """What is wrong with chunk ``i``'s file (size, CRC against COMMIT and, with ``trailer``, its own), or None."""
        try:
            data = self.read_raw(i)
        except FileNotFoundError:
            return "is missing"
        return self.raw_problem(i, data, trailer=trailer)

    def raw_problem(self, i: int, data: np.ndarray, *, trailer: bool = True) -> str | None:
        """What is wrong with ``data``, the bytes of chunk ``i``'s file (size, then CRC32C), or None."""
        if (problem := self.size_problem(i, len(data))) is not None:
            return problem
        return self._crc_problem(i, data, trailer=trailer)

    def read_raw(self, i: int, buf: np.ndarray | None = None) -> np.ndarray:
        """Chunk ``i``'s file (rows, padding and CRC trailer) as uint8, read once; into ``buf`` when its size fits.

        A sequential read, not a memory map: nothing stays mapped (or resident in this process) afterwards.

        Raises:
            FileNotFoundError: the chunk file is missing.
        """
        path = self.loc.local_path(*chunk_file(self.seg_id, i))
        if path is None:
            return np.frombuffer(self.loc.read_bytes(*chunk_file(self.seg_id, i)), dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            out = buf if buf is not None and len(buf) == size else np.empty(size, dtype=np.uint8)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            got = read_into(fd, out, 0)
        finally:
            os.close(fd)
        return out if got == size else out[:got]  # shrank while read: the size check reports it

    def read_chunks(self) -> Iterator[tuple[int, np.ndarray | None]]:
        """(chunk number, its file's bytes or None when missing) for every chunk, in order, each read once.

        The next chunk is read by a thread while the caller checks this one (``preadv`` releases the
        GIL), so the disk and the CPU work at once. Buffers are reused once the caller holds no view of
        them (three at most: arrays handed out stay valid), so memory stays at a few chunks.
        """
        pool: list[np.ndarray] = []
        with ThreadPoolExecutor(1, thread_name_prefix="ddx-scan") as ex:
            pending = ex.submit(self._read_or_none, 0, None)
            for c in range(self.n_chunks):
                data = pending.result()
                if c + 1 < self.n_chunks:
                    pending = ex.submit(self._read_or_none, c + 1, _free_buffer(pool))
                if data is not None:
                    pool = [*pool[-2:], data]
                yield c, data
                del data  # only the pool and the caller's views keep the buffer: its refcount says when it is free

    def _read_or_none(self, i: int, buf: np.ndarray | None) -> np.ndarray | None:
        try:
            return self.read_raw(i, buf)
        except FileNotFoundError:
            return None

    def open_chunk(self, i: int) -> int:
        """An open descriptor of chunk ``i``'s file, size checked, read-ahead off (random row reads).

        Raises:
            IntegrityError: the chunk file is missing or has the wrong size.
        """
        path = self.loc.local_path(*chunk_file(self.seg_id, i))
        assert path is not None, "pread gathers are for local stores"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise self.damage("is missing", *chunk_file(self.seg_id, i)[2:]) from exc
        if (problem := self.size_problem(i, os.fstat(fd).st_size)) is not None:
            os.close(fd)
            raise self.damage(problem, *chunk_file(self.seg_id, i)[2:])
        if hasattr(os, "posix_fadvise"):  # a random 7 KiB read otherwise pulls a read-ahead window of ~128 KiB
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    @property
    def preadable(self) -> bool:
        """Rows can be read straight from the chunk files at fixed offsets (local, plain layout, row checksums)."""
        return self.plain and self.loc.is_local and self.has_row_checksums

    @property
    def rangeable(self) -> bool:
        """Rows can be fetched by byte range from the remote chunk objects (remote, plain layout, row checksums)."""
        return self.plain and not self.loc.is_local and self.has_row_checksums

    def _crc_problem(self, i: int, data: np.ndarray, *, trailer: bool) -> str | None:
        return self.crc_problem(i, int(google_crc32c.value(data[:-4])), data, trailer=trailer)

    def crc_problem(self, i: int, computed: int, data: np.ndarray, *, trailer: bool = True) -> str | None:
        """What is wrong when chunk ``i``'s data has CRC32C ``computed`` (``data``: the file, for its trailer)."""
        recorded = int(self.commit["chunk_crc32c"][i])
        stored = int.from_bytes(bytes(data[-4:]), "little")
        if computed != recorded or (trailer and stored != recorded):
            return (
                f"chunk {i} checksum mismatch: CRC32C of its data {computed:08x}, "
                f"file trailer {stored:08x}, COMMIT {recorded:08x}"
            )
        return None

    def close(self) -> None:
        """Drop this reader's maps; each unmaps once no array still views it.

        Closing the mmap here would leave views handed out earlier (``iter_batches`` yields views)
        pointing at unmapped memory: reading them crashes the process.
        """
        self._maps.clear()
        self._raw.clear()


def _free_buffer(pool: list[np.ndarray]) -> np.ndarray | None:
    """A buffer of ``pool`` that nothing outside it references (no view handed out is alive), taken out; or None."""
    for i in range(len(pool)):
        if sys.getrefcount(pool[i]) == 2:  # the list's reference and this call's argument
            return pool.pop(i)
    return None


def read_into(fd: int, out: np.ndarray, offset: int) -> int:
    """Fill ``out`` (C-contiguous) from ``fd`` at ``offset``; returns the bytes read (fewer only at end of file)."""
    view = memoryview(out).cast("B")  # type: ignore[arg-type]
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _is_plain_layout(meta: dict[str, Any], chunk_rows: int) -> bool:
    """True when chunk files are raw little-endian rows + crc32c at the default keys (memory-mappable)."""
    try:
        return _plain(meta, chunk_rows)
    except (AttributeError, IndexError, TypeError):  # a format-1 file (no seal) with odd values: let zarr read it
        return False


def _plain(meta: dict[str, Any], chunk_rows: int) -> bool:
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


def commit_replaces(commit: dict[str, Any]) -> list[str]:
    """The segments a COMMIT says its segment replaces (a compaction's copy, :mod:`storage.compact`)."""
    value = commit.get("replaces")
    return [str(s) for s in value] if isinstance(value, list) else []


def read_commit(loc: Location, seg_id: str) -> dict[str, Any] | None:
    """A segment's COMMIT, parsed and checked (:func:`storage.metadata.commit_problems`); None when it has none
    (an uncommitted segment).

    Raises:
        IntegrityError: unparsable, or fails a check.
        FormatVersionError: committed by a newer ddx.
    """
    file = "/".join((SEGMENTS, seg_id, "COMMIT"))
    try:
        data = loc.read_bytes(SEGMENTS, seg_id, "COMMIT")
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: segments/zarr.json, listed beside segments
        return None
    doc, why = parse_json(data)
    if doc is None:
        raise Damage(file, str(why)).error(loc.url)
    version = doc.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION and seal_matches(doc):
        raise FormatVersionError(
            f"Segment {SEGMENTS}/{seg_id} of {loc.url!r} has format version {version}; this ddx reads versions "
            f"up to {FORMAT_VERSION}. Upgrade ddx (pip install -U ddx) to read it."
        )
    problems = commit_problems(doc, file)
    if problems:
        raise problems[0].error(loc.url)
    return doc
