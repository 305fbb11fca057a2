"""TeacherStore: the durable, content-addressed home of one teacher's vectors.

A store is a directory (or fsspec URL) holding a Zarr v3 group. The root ``zarr.json`` carries the
format version, the TeacherSpec and its fingerprint; ``segments/`` holds one segment per writer
(layout in ``segment_format.py``). Readers see committed segments only, so a crashed or running
writer never shows half its rows, and check what they read: metadata when opening
(:mod:`storage.metadata`), every gathered row against its CRC32C, every scanned chunk; damage is an
``IntegrityError`` naming the file, never a wrong vector.

Example:
    >>> store = TeacherStore.create("stores/demo", spec)            # doctest: +SKIP
    >>> with store.writer() as w:                                   # doctest: +SKIP
    ...     w.append(keys, vectors, roles, n_tokens)
    >>> TeacherStore.open("stores/demo").get(keys).shape            # doctest: +SKIP
    (3, 768)
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from storage.chunk_files import ChunkFiles
from storage.errors import (
    DiskFullError,
    IntegrityError,
    MissingVectorsError,
    StoreExistsError,
    StoreNotFoundError,
)
from storage.fs import Location
from storage.index import KeyIndex, RowChecks, RowGather
from storage.keys import ROLES, as_key_array, key_hex
from storage.metadata import FORMAT_VERSION, STORAGE_DTYPES, Damage, read_root_attrs, sealed
from storage.remote_rows import REMOTE_CACHE_BYTES, DiskChunks, RangeReader, remote_cache_dir
from storage.segment import SEGMENTS, SegmentReader, SegmentWriter, claim_and_salvage, segment_state
from storage.segment_format import IndexColumns, check_rows, chunk_file, key_seeds, row_crcs
from storage.segment_reader import commit_replaces, read_commit
from storage.spec import TeacherSpec

__all__ = ["FORMAT_VERSION", "TeacherStore", "default_chunk_rows", "scan_segment"]

CHUNK_TARGET_BYTES = 32 << 20
# How gathers read local format-2 chunks: "pread" (one preadv a row, no read-ahead; default) or "mmap".
# bench/store_scale.py: cold (store larger than RAM) pread reads 1.0x the bytes it returns where maps read
# ~730x; DESIGN.md ("Gathers") has the warm and cold measurements behind the default.
GATHER_MODES = ("pread", "mmap")


def default_chunk_rows(dim: int, dtype: str) -> int:
    """Rows per chunk: the largest power of two whose chunk stays within 32 MiB (4,096 at 3584-d fp16)."""
    row_bytes = dim * np.dtype(dtype).itemsize
    rows = 1 << max(0, (CHUNK_TARGET_BYTES // row_bytes).bit_length() - 1)
    return max(256, min(rows, 1 << 16))


class TeacherStore:
    """Vectors of one teacher, keyed by content, across any number of segments.

    Use :meth:`create`, :meth:`open` or :meth:`open_or_create`; the constructor is internal.
    """

    def __init__(
        self,
        loc: Location,
        attrs: dict[str, Any],
        *,
        cache_bytes: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.loc = loc
        # remote stores: bytes of gathered rows kept (an LRU) by this process; rows are fetched by byte range
        self.cache_bytes = REMOTE_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        # remote stores: local disk cache of whole chunk files (storage.remote_rows.DiskChunks); None: none
        self.cache_dir = None if loc.is_local else remote_cache_dir(cache_dir)
        self.disk_chunks: DiskChunks | None = None  # set with the first gather when cache_dir is
        self.spec = TeacherSpec.from_dict(attrs["teacher_spec"])
        self.dtype: str = attrs["storage_dtype"]
        self.format_version: int = attrs["format_version"]
        self._segments: list[SegmentReader] = []
        self.replaced: list[str] = []
        self._rows = 0
        self._index: KeyIndex | None = None
        self._gather: RowGather | None = None
        self._chunk_refs: tuple[np.ndarray, list[tuple[SegmentReader, int]]] | None = None
        self.gather_mode = GATHER_MODES[0]  # set before the first gather (bench/store_scale.py compares both)
        self.refresh()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        spec: TeacherSpec,
        *,
        dtype: str = "float16",
        storage_options: Mapping[str, Any] | None = None,
        stale_after: float | None = None,
        cache_bytes: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> TeacherStore:
        """Create an empty store for ``spec``.

        On an object store the root metadata is created conditionally (``If-None-Match``), so of several
        processes creating one store at once exactly one succeeds; the others get ``StoreExistsError``.
        ``storage_options``, ``stale_after``, ``cache_bytes`` and ``cache_dir`` are as for :meth:`open`.

        Raises:
            StoreExistsError: something is already at ``url``.
            ValueError: ``dtype`` is not float16 or float32.
            RemoteStoreError: the object store cannot be reached, or refuses the credentials.
        """
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"Store dtype must be one of {STORAGE_DTYPES}, got {dtype!r}.")
        loc = Location(url, storage_options, stale_after=stale_after)
        if loc.isfile():
            raise StoreNotFoundError(f"{loc.url!r} is a file, not a store directory. Choose another --store path.")
        if loc.exists() and loc.listdir() and not _half_made_remote(loc):
            raise StoreExistsError(f"{loc.url!r} already exists and is not empty; open it, or pick a new --store path.")
        attrs: dict[str, Any] = sealed(
            {
                "format_version": FORMAT_VERSION,
                "teacher_spec": spec.to_dict(),
                "fingerprint": spec.fingerprint,
                "dim": spec.dim,
                "storage_dtype": dtype,
            }
        )
        try:
            if loc.is_local:
                _create_local(Path(loc.root), attrs)
            else:
                _create_remote(loc, attrs)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            message = f"Disk full while creating store {loc.url!r}: nothing was written. Free space and rerun."
            raise DiskFullError(message) from exc
        return cls(loc, attrs, cache_bytes=cache_bytes, cache_dir=cache_dir)

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        spec: TeacherSpec | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        stale_after: float | None = None,
        cache_bytes: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> TeacherStore:
        """Open an existing store; when ``spec`` is given it must match the stored one.

        Args:
            url: local path or fsspec URL (``s3://bucket/prefix``, ``gs://...``).
            spec: the teacher spec the store must have been made by.
            storage_options: fsspec options for a remote URL (``endpoint_url``, ``key``, ``secret``, ...).
            stale_after: seconds after which a remote writer's heartbeat (or a salvage claim) counts as left by
                a dead process (None: 60 s or ``$DDX_STALE_AFTER``; see :mod:`storage.heartbeat`).
            cache_bytes: remote stores: bytes of gathered rows this process keeps (LRU; default 128 MiB).
            cache_dir: remote stores: a local directory where each chunk file touched by a gather is kept whole
                (checked against COMMIT) and rows are then read from (None: ``$DDX_REMOTE_CACHE_DIR``, else none;
                bounded by ``$DDX_REMOTE_CACHE_MAX_GB``); see :class:`storage.remote_rows.DiskChunks`.

        Raises:
            StoreNotFoundError: no store at ``url`` (or it is a file).
            FormatVersionError: written by a newer ddx.
            IntegrityError: the root zarr.json, or a committed segment's COMMIT or vectors/zarr.json, is
                damaged (the message names the file and the repair).
            FingerprintMismatchError, DimensionMismatchError: ``spec`` differs from the store's.
            RemoteStoreError: the object store cannot be reached, or refuses the credentials.
        """
        loc = Location(url, storage_options, stale_after=stale_after)
        attrs = read_root_attrs(loc)
        store = cls(loc, attrs, cache_bytes=cache_bytes, cache_dir=cache_dir)
        if spec is not None:
            store.spec.check_matches(spec, loc.url)
        return store

    @classmethod
    def open_or_create(
        cls,
        url: str | os.PathLike[str],
        spec: TeacherSpec,
        *,
        dtype: str = "float16",
        storage_options: Mapping[str, Any] | None = None,
        stale_after: float | None = None,
        cache_bytes: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> TeacherStore:
        """Open the store at ``url`` checking ``spec``, or create it when nothing is there (options as :meth:`open`)."""
        opts: dict[str, Any] = {
            "storage_options": storage_options,
            "stale_after": stale_after,
            "cache_bytes": cache_bytes,
            "cache_dir": cache_dir,
        }
        loc = Location(url, storage_options)
        if loc.isdir() and loc.exists("zarr.json"):
            store = cls.open(url, spec, **opts)
            if store.dtype != dtype:
                import warnings

                warnings.warn(
                    f"Store {loc.url!r} keeps {store.dtype} vectors; --dtype {dtype} is ignored.", stacklevel=2
                )
            return store
        try:
            return cls.create(url, spec, dtype=dtype, **opts)
        except StoreExistsError:
            if loc.exists("zarr.json"):  # another process (a torchrun rank) created it first
                return cls.open(url, spec, **opts)
            raise

    # -- segments and index --------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the list of committed segments (another writer may have committed since).

        Reads the store as it is now, also on object stores (no listing cache: :class:`storage.fs.Location`).
        A segment that a committed compaction replaces (:mod:`storage.compact`) is left out even while it is
        still there, waiting for its removal: its rows are read from the compacted segment, once.
        """
        for seg in self._segments:
            seg.close()
        if self._gather is not None and self._gather.files is not None:
            self._gather.files.close()
        if self._gather is not None and self._gather.ranges is not None:
            self._gather.ranges.clear()
        self._segments, self.replaced = self._committed_readers()
        self._rows = sum(s.rows for s in self._segments)  # get_rows checks bounds against it every batch
        self._index = None
        self._gather = None
        self._chunk_refs = None

    def _committed_readers(self, tries: int = 5) -> tuple[list[SegmentReader], list[str]]:
        """A reader for every committed segment no other COMMIT replaces, and the ids of those replaced.

        Every COMMIT is read first and only the segments to read get a reader: a replaced segment waits for (or
        is in the middle of) its removal, which on an object store deletes its files one by one, so nothing of
        it but its COMMIT's existence is looked at. Hidden names (``.<id>.<random>.removing``: a local removal
        in progress, or killed midway) are never segments. Listed again when a segment vanishes while being
        opened: committed segments are removed only by a compaction, after the segment that replaces them is
        committed, so a listing taken again after a removal holds that segment.
        """

        def attempt() -> tuple[list[SegmentReader], list[str]]:
            ids = [s for s in self.loc.listdir(SEGMENTS) if not s.startswith(".") and s != "zarr.json"]  # the group's
            commits: dict[str, dict[str, Any]] = {}
            damaged: dict[str, IntegrityError] = {}
            for s in ids:
                try:
                    doc = read_commit(self.loc, s)  # one read, no existence check first
                except IntegrityError as exc:
                    damaged[s] = exc
                    continue
                if doc is not None:  # else uncommitted: a writer's, or abandoned
                    commits[s] = doc
            replaced = {r for doc in commits.values() for r in commit_replaces(doc)}
            for s, error in damaged.items():
                if s not in replaced:
                    raise error
            readers = [
                SegmentReader(self.loc, s, dim=self.spec.dim, dtype=self.dtype, commit=doc)
                for s, doc in commits.items()
                if s not in replaced
            ]
            waiting = replaced & (set(commits) | set(damaged))
            return readers, sorted(s for s in waiting if self.loc.isdir(SEGMENTS, s))  # not removed meanwhile

        for _ in range(tries - 1):
            try:
                return attempt()
            except IntegrityError:
                if all(self.loc.isdir(SEGMENTS, s) for s in self.loc.listdir(SEGMENTS) if not s.startswith(".")):
                    raise  # damage, not a removal
        return attempt()

    @property
    def segments(self) -> list[SegmentReader]:
        return list(self._segments)

    def uncommitted_segments(self) -> list[tuple[str, str]]:
        """(segment id, 'active' | 'salvaging' | 'abandoned') for every segment without COMMIT.

        Hidden names (a removal in progress) are skipped, and so is a segment that another process
        commits or removes while this looks.
        """
        states = [(s, segment_state(self.loc, s)) for s in self.loc.listdir(SEGMENTS) if not s.startswith(".")]
        return [(s, state) for s, state in states if state not in ("committed", "gone")]

    @property
    def index(self) -> KeyIndex:
        if self._index is None:
            parts, offset = [], 0
            for seg in self._segments:
                cols = seg.index()
                parts.append((cols.keys, cols.rows + offset, cols.roles, cols.n_tokens))
                offset += seg.rows
            self._index = KeyIndex.build(parts)
        return self._index

    @property
    def rows(self) -> int:
        """Rows over all committed segments (duplicates included)."""
        return self._rows

    def __len__(self) -> int:
        """Distinct keys stored."""
        return len(self.index)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    @property
    def url(self) -> str:
        return self.loc.url

    # -- reading -------------------------------------------------------------------------------

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which keys have a vector."""
        return self.index.contains(as_key_array(keys))

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Global row id per key (-1 when missing): pass these to :meth:`get_rows` repeatedly."""
        return self.index.locate(as_key_array(keys))

    def get(self, keys: np.ndarray, *, dtype: str | None = None) -> np.ndarray:
        """Vectors of ``keys`` in order, shape (n, dim).

        Raises:
            MissingVectorsError: some keys have no vector (the message counts them).
        """
        gids = self.locate(keys)
        missing = int((gids < 0).sum())
        if missing:
            first = key_hex(as_key_array(keys)[gids < 0][0])
            raise MissingVectorsError(
                f"{missing} of {len(gids)} keys have no vector in store {self.url!r} (first: {first}). "
                f"Run 'ddx precompute-teacher --store {self.url} --data ...' over the texts they come from."
            )
        return self.get_rows(gids, dtype=dtype)

    def get_rows(self, gids: np.ndarray, *, dtype: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Vectors at global rows ``gids`` (from :meth:`locate`): the training fast path.

        Every row is checked against the CRC32C(key ‖ row) recorded when it was written (format-1
        segments: each chunk once, against COMMIT), so damage never comes back as a wrong vector.

        Raises:
            MissingVectorsError: a row id is -1 (a key :meth:`locate` did not find) or past the last row.
            IntegrityError: a row, its chunk or its segment's index is damaged (names segment, chunk, row).
        """
        gids, rows = np.asarray(gids), self._rows
        if len(gids) and (gids.min() < 0 or gids.max() >= rows):
            bad = int(((gids < 0) | (gids >= rows)).sum())
            raise MissingVectorsError(
                f"{bad} of {len(gids)} row ids are outside 0..{rows - 1} in store {self.url!r} "
                "(-1 marks a key that locate() did not find). Check locate()'s result before get_rows()."
            )
        if out is None and dtype is not None and np.dtype(dtype) != np.dtype(self.dtype):
            out = np.empty((len(gids), self.dim), dtype=dtype)
        return self._row_gather().gather(gids, out=out)

    def _row_gather(self) -> RowGather:
        if self._gather is None:
            if self.gather_mode not in GATHER_MODES:
                raise ValueError(f"gather_mode must be one of {GATHER_MODES}, got {self.gather_mode!r}.")
            starts, refs = self._chunks()
            preadable = np.array([seg.preadable for seg, _ in refs], dtype=bool)
            use_pread = self.gather_mode == "pread" and bool(preadable.any())
            rangeable = np.array([seg.rangeable for seg, _ in refs], dtype=bool)
            ranges, chunk_files = None, None
            if use_pread:
                chunk_files = ChunkFiles(lambda i: refs[i][0].open_chunk(refs[i][1]))
            if rangeable.any():
                files = ["/".join(chunk_file(seg.seg_id, c)) for seg, c in refs]
                row_bytes = self.dim * np.dtype(self.dtype).itemsize
                ranges = RangeReader(self.loc, files, row_bytes, self.cache_bytes, short_read=self._short_range)
                if self.cache_dir is not None:  # rows of rangeable chunks from whole local copies, by pread
                    disk = DiskChunks(
                        self.cache_dir,
                        self.fingerprint,
                        self.loc,
                        files,
                        [f"{seg.seg_id}/c/{c}" for seg, c in refs],
                        lambda i, data: refs[i][0].raw_problem(refs[i][1], data),
                        lambda i, what: self._chunk_damage(i, what),
                    )
                    chunk_files, preadable, self.disk_chunks = ChunkFiles(disk.open), rangeable, disk
            self._gather = RowGather(
                starts,
                lambda i: _load_checked(*refs[i]),
                self.dim,
                np.dtype(self.dtype),
                self._row_checks(refs),
                files=chunk_files,
                preadable=preadable,
                ranges=ranges,
                rangeable=rangeable,
                short_read=lambda i, row: refs[i][0].damage(
                    f"ends before row {row} (it shrank while open)", *chunk_file(refs[i][0].seg_id, refs[i][1])[2:]
                ),
            )
        return self._gather

    def _short_range(self, i: int, row: int, missing: bool) -> IntegrityError:
        return self._chunk_damage(i, "is missing" if missing else f"ends before row {row}")

    def _chunk_damage(self, i: int, what: str) -> IntegrityError:
        seg, c = self._chunks()[1][i]
        return seg.damage(what, *chunk_file(seg.seg_id, c)[2:])

    def _chunks(self) -> tuple[np.ndarray, list[tuple[SegmentReader, int]]]:
        """Global start row of every chunk, and its (segment, chunk number)."""
        if self._chunk_refs is None:
            starts, refs, offset = [], [], 0
            for seg in self._segments:
                for c in range(seg.n_chunks):
                    starts.append(offset + c * seg.chunk_rows)
                    refs.append((seg, c))
                offset += seg.rows
            self._chunk_refs = (np.array(starts, dtype=np.int64), refs)
        return self._chunk_refs

    def _row_checks(self, refs: list[tuple[SegmentReader, int]]) -> RowChecks | None:
        """Expected CRC32C of every global row (8 bytes a row); None when no segment records any."""
        if not any(seg.has_row_checksums for seg in self._segments):
            return None
        seeds, tags, offset = np.zeros(self._rows, np.uint32), np.zeros(self._rows, np.uint32), 0
        for seg in self._segments:
            checks = seg.row_checks()
            if checks is not None:
                seeds[offset : offset + seg.rows], tags[offset : offset + seg.rows] = checks
            offset += seg.rows
        checked = np.array([seg.has_row_checksums for seg, _ in refs], dtype=bool)
        return RowChecks(seeds, tags, checked, self._row_damage)

    def _row_damage(self, gid: int, got: int, want: int) -> IntegrityError:
        starts, refs = self._chunks()
        i = int(np.searchsorted(starts, gid, side="right")) - 1
        seg, c = refs[i]
        return _row_error(self.url, seg, c * seg.chunk_rows + gid - int(starts[i]), got, want, gid)

    def iter_batches(
        self, batch_size: int = 65536, *, role: str | None = None, verify: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Sequential scan: (keys, vectors) batches over every committed row, each chunk checked first.

        Format-2 chunks are checked row by row (CRC32C(key ‖ row): the data and the key it is paired
        with), format-1 chunks against their CRC32C in COMMIT; ``verify=False`` skips both.

        Raises:
            IntegrityError: a chunk or its segment's index is damaged.
        """
        code = ROLES.index(role) if role is not None else None
        for seg in self._segments:
            for cols, vecs in scan_segment(seg, verify=verify):
                sel = slice(None) if code is None else cols.roles == code
                chunk_keys, vecs = cols.keys[sel], vecs[sel]  # select once, not once per batch
                for s in range(0, len(vecs), batch_size):
                    yield chunk_keys[s : s + batch_size], vecs[s : s + batch_size]
                del vecs  # lets the scan reuse this chunk's buffer once the caller drops its batches

    # -- writing -------------------------------------------------------------------------------

    def writer(
        self, *, rank: int = 0, world_size: int = 1, chunk_rows: int | None = None, flush_seconds: float = 60.0
    ) -> SegmentWriter:
        """A new segment for one writer (a run, or one rank of a run); commit it by closing it."""
        rows = chunk_rows or default_chunk_rows(self.dim, self.dtype)
        return SegmentWriter.create(
            self.loc,
            dim=self.dim,
            dtype=self.dtype,
            chunk_rows=rows,
            rank=rank,
            world_size=world_size,
            flush_seconds=flush_seconds,
        )

    def salvage(self, *, force: bool = False) -> list[tuple[str, int]]:
        """Commit the flushed rows of every abandoned segment; returns (segment, rows kept).

        ``force`` also salvages segments whose remote writer still looks alive (a writer known dead;
        see :func:`storage.segment.claim_and_salvage`).
        """
        done = []
        for seg_id, state in self.uncommitted_segments():
            if state == "abandoned" or (force and state == "active"):
                result = claim_and_salvage(self.loc, seg_id, force=force)
                if state == "abandoned" or result.outcome in ("salvaged", "removed"):  # not a live local writer
                    done.append((seg_id, result.rows))
        if done:
            self.refresh()
        return done

    def __repr__(self) -> str:
        return f"TeacherStore({self.url!r}, model={self.spec.model!r}, dim={self.dim}, segments={len(self._segments)})"


def _create_local(target: Path, attrs: dict[str, Any]) -> None:
    """Build the empty store beside ``target`` and rename it into place: readers never see half a store.

    ``os.rename`` of a directory is atomic and fails when the target is a non-empty directory, so of
    several processes creating one store at once (torchrun ranks), exactly one wins.
    """
    import zarr
    from zarr.storage import LocalStore

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.creating"
    try:
        zarr.open_group(store=LocalStore(str(tmp)), mode="w-", attributes={"ddx": attrs}).create_group(SEGMENTS)
        for made in (tmp / "zarr.json", tmp / SEGMENTS / "zarr.json", tmp / SEGMENTS, tmp):  # zarr does not fsync
            Location(made).fsync()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk (or an interrupt) leaves no half-made store
        raise
    try:
        os.rename(tmp, target)
        Location(target.parent).fsync()  # the store's name: a power cut must not take a created store back
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "zarr.json").exists() or exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise StoreExistsError(
                f"{str(target)!r} already exists and is not empty; open it, or pick a new --store path."
            ) from exc
        raise


def _half_made_remote(loc: Location) -> bool:
    """Only ``segments/zarr.json`` is there: a remote creator between its two writes, or killed there.

    That file holds the same bytes whoever writes it, so creating over it is safe; the root's conditional
    PUT in :func:`_create_remote` still decides who made the store.
    """
    return not loc.is_local and loc.listdir() == [SEGMENTS] and loc.listdir(SEGMENTS) == ["zarr.json"]


def _create_remote(loc: Location, attrs: dict[str, Any]) -> None:
    """Create the store's metadata on an object store; the root zarr.json last and conditionally.

    ``segments/zarr.json`` (the same bytes whoever writes it) comes first, so a reader never finds a root
    without its segments group; the root is then created with a conditional PUT (:meth:`Location.create_exclusive`),
    so of several processes creating one store at once exactly one wins and the others get StoreExistsError
    (zarr's own ``mode="w-"`` checks, then writes: two processes could both pass).
    """
    import zarr
    from zarr.storage import MemoryStore

    files: dict[str, Any] = {}  # the metadata zarr writes, as it would write it (key -> Buffer)
    zarr.open_group(store=MemoryStore(files), mode="w-", attributes={"ddx": attrs}).create_group(SEGMENTS)
    root, group = (files[k].to_bytes() for k in ("zarr.json", f"{SEGMENTS}/zarr.json"))
    loc.write_atomic(group, SEGMENTS, "zarr.json")
    if not loc.create_exclusive(root, "zarr.json"):
        raise StoreExistsError(f"{loc.url!r} was created by another process just now; open it.")


def _scan_chunks(seg: SegmentReader, *, verify: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(chunk number, its rows, incl. formats 1-2's padding) for every chunk, each file read once, nothing left mapped.

    Plain chunks, local or remote, come from :meth:`SegmentReader.read_chunks` (one read of the whole file
    each, the next one read while this one is checked, nothing kept: RSS stays flat whatever the store
    size); format-1 chunks are checked whole against COMMIT on those bytes. A non-plain format-1 array
    goes through :meth:`SegmentReader.chunk` (zarr).
    """
    if not seg.plain:
        for c in range(seg.n_chunks):
            if verify and not seg.has_row_checksums:
                seg.check_chunk(c)
            yield c, np.asarray(seg.chunk(c))
        return
    for c, data in seg.read_chunks():
        file = chunk_file(seg.seg_id, c)[2:]
        if data is None:
            raise seg.damage("is missing", *file)
        problem = seg.size_problem(c, len(data))
        if problem is None and verify and not seg.has_row_checksums:
            problem = seg.raw_problem(c, data, trailer=False)
        if problem is not None:
            raise seg.damage(problem, *file)
        rows = data[:-4].view(seg.dtype).reshape(seg.rows_in(c), seg.dim)
        del data
        yield c, rows
        del rows


def scan_segment(seg: SegmentReader, *, verify: bool = True) -> Iterator[tuple[IndexColumns, np.ndarray]]:
    """One committed segment in row order: (index entries, rows) a chunk at a time, each chunk checked first.

    Format-2+ rows are checked one by one (CRC32C(key ‖ row): the data and the key it is paired with),
    format-1 chunks against their CRC32C in COMMIT; ``verify=False`` skips both.

    Raises:
        IntegrityError: a chunk or the segment's index is damaged.
    """
    cols = seg.index()
    by_row = np.empty(len(cols.rows), dtype=np.int64)
    by_row[cols.rows] = np.arange(len(cols.rows))  # rows are 0..n-1 once each (index() checked)
    cols = cols.take(by_row)
    for c, vecs in _scan_chunks(seg, verify=verify):
        lo, hi = c * seg.chunk_rows, min((c + 1) * seg.chunk_rows, seg.rows)
        vecs = vecs[: hi - lo]
        part = cols.take(slice(lo, hi))
        if verify and part.crcs is not None:
            _check_scanned(seg, part, vecs)
        yield part, vecs
        del vecs


def _check_scanned(seg: SegmentReader, cols: IndexColumns, vecs: np.ndarray) -> None:
    assert cols.crcs is not None
    seeds = key_seeds(cols.keys)
    bad = check_rows(seeds, cols.crcs, vecs)
    if len(bad):
        i = int(bad[0])
        got = int(row_crcs(seeds[i : i + 1], vecs[i : i + 1])[0])
        raise _row_error(seg.loc.url, seg, int(cols.rows[i]), got, int(cols.crcs[i]), None)


def _load_checked(seg: SegmentReader, c: int) -> np.ndarray:
    """Chunk ``c`` for gathers; a format-1 chunk (no row checksums) is checked whole, once, on load."""
    arr = seg.chunk(c)
    if not seg.has_row_checksums:
        seg.check_chunk(c)
    return arr


def _row_error(url: str, seg: SegmentReader, row: int, got: int, want: int, gid: int | None) -> IntegrityError:
    c = row // seg.chunk_rows
    where = f"row {row} (chunk {c}{'' if gid is None else f', global row {gid}'})"
    what = (
        f"{where} does not match its CRC32C: read {got:08x}, written {want:08x} "
        "(the chunk's bytes or the row's index.parquet line changed)"
    )
    return Damage(seg.file(*chunk_file(seg.seg_id, c)[2:]), what).error(url)
