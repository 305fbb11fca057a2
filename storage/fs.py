"""Where a store lives: a local directory or any fsspec URL, with the few file operations the store needs.

Every write is atomic: local files go through a temp file, fsync and ``os.replace``; object stores
(S3, GCS) make each PUT atomic by themselves. Reads of vectors do not come through here: local
chunk files are memory-mapped directly (see ``SegmentReader`` in ``segment.py``).

:func:`atomic_path` and :func:`atomic_open` are the one temp-file-and-rename recipe for every local
file ddx writes (store metadata, run files, projection weights, token tables, TREC runs), and
:func:`default_cache_dir` the one answer to where ddx caches (token tables, unpacked models).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import DiskFullError

__all__ = ["Location", "atomic_open", "atomic_path", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$DDX_CACHE_DIR`` or ``~/.cache/ddx``: token tables, weight ids and unpacked models live below it."""
    return Path(os.environ.get("DDX_CACHE_DIR", Path.home() / ".cache" / "ddx"))


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside ``path`` to write; renamed over ``path`` when the block ends, removed when it raises.

    Readers see the old file or the new one, never a torn one. Whatever writes the temp file must have
    closed it by the end of the block (:func:`atomic_open` also flushes and fsyncs it).

    Example:
        >>> with atomic_path(folder / "part.arrow") as tmp:  # doctest: +SKIP
        ...     write_arrow(tmp)
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: Literal["w", "wb"] = "wb", *, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; flushed, fsynced and renamed over ``path`` when the block ends.

    When the block raises, the temp file is removed and ``path`` keeps its old content (or stays absent).

    Example:
        >>> with atomic_open(run / "ddx_run.json", "w", encoding="utf-8") as f:  # doctest: +SKIP
        ...     f.write(text)
    """
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


class Location:
    """A root directory (local path or fsspec URL) and atomic operations below it.

    Example:
        >>> loc = Location("/tmp/store")
        >>> loc.join("segments", "a")
        '/tmp/store/segments/a'
    """

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = os.fspath(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(root).absolute()) if self.is_local else root.rstrip("/")

    def join(self, *parts: str) -> str:
        """Path of ``parts`` below the root, in the filesystem's own form."""
        return "/".join([self.root, *parts]) if parts else self.root

    def local_path(self, *parts: str) -> Path | None:
        """A local ``Path`` for memory-mapping, or None for remote stores."""
        return Path(self.join(*parts)) if self.is_local else None

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.join(*parts)))

    def isdir(self, *parts: str) -> bool:
        return bool(self.fs.isdir(self.join(*parts)))

    def isfile(self, *parts: str) -> bool:
        return bool(self.fs.isfile(self.join(*parts)))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries directly below ``parts``; [] when it does not exist."""
        path = self.join(*parts)
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def read_bytes(self, *parts: str) -> bytes:
        return bytes(self.fs.cat_file(self.join(*parts)))

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Write ``data`` so readers see the old file or the new one, never a torn one.

        Raises:
            DiskFullError: the disk filled up; nothing already stored is touched.
        """
        path = self.join(*parts)
        try:
            if self.is_local:
                _write_local_atomic(Path(path), data)
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"Disk full while writing {path!r}.") from exc
            raise

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.join(*parts), exist_ok=True)

    def remove(self, *parts: str) -> None:
        """Remove a file or a whole directory tree (no error if absent)."""
        path = self.join(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def size(self, *parts: str) -> int:
        """Total bytes of a file or of every file below a directory."""
        path = self.join(*parts)
        if not self.fs.exists(path):
            return 0
        return int(self.fs.du(path, total=True)) if self.fs.isdir(path) else int(self.fs.size(path))

    def zarr_store(self):  # -> zarr.abc.store.Store
        """A zarr v3 store over the root (LocalStore for paths, FsspecStore for URLs)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.root)
        return FsspecStore.from_url(self.url)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(data)
