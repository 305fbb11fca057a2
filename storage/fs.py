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
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import DiskFullError

__all__ = ["Location", "atomic_open", "atomic_path", "default_cache_dir", "replace_dir"]

_warned_no_exclusive: set[str] = set()  # filesystem protocols already warned about, once a process


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


def replace_dir(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a temporary sibling folder, then swap it in for ``target``: readers never see half a folder.

    The swap is two renames (the old folder aside, the new one in); both temporary siblings are removed
    whatever happens. Returns ``target`` as a Path.

    Example:
        >>> replace_dir(run / "student_base", lambda tmp: model.save(str(tmp)))  # doctest: +SKIP
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


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
        try:
            listing = self.fs.ls(self.join(*parts), detail=False)
        except FileNotFoundError:  # absent, or removed by another process while we looked
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing)

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

    def fsync(self, *parts: str) -> None:
        """Flush a local file or directory (its entries) to stable storage; object stores need nothing.

        Raises:
            FileNotFoundError: it does not exist.
        """
        if not self.is_local:
            return  # an object store's put is durable once it returns
        fd = os.open(self.join(*parts), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.join(*parts), exist_ok=True)

    def remove(self, *parts: str) -> None:
        """Remove a file or a whole directory tree; no error if absent or if another process removes it too.

        A local directory is first renamed to a hidden sibling (``.<name>.<random>.removing``), so others
        see it whole or not at all, never half deleted; the hidden copy is then deleted, skipping entries
        that vanish meanwhile. A crash mid-way leaves only the hidden copy (``ddx cache gc`` sweeps it).
        """
        path = self.join(*parts)
        if self.is_local:
            _remove_local(Path(path))
            return
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            if self.fs.exists(path):  # another process removed part of the tree meanwhile: remove the rest
                self.fs.rm(path, recursive=True)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create a file holding ``data`` only if nothing is there yet; False when it already exists.

        Locally ``O_CREAT | O_EXCL``; on fsspec filesystems ``open(mode="xb")``, a conditional PUT where
        the backend implements it (s3fs, gcsfs, the memory filesystem). A backend without exclusive
        create falls back to check-then-write, which two processes can both pass.
        """
        path = self.join(*parts)
        if self.is_local:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except NotImplementedError:  # this backend cannot create exclusively (fsspec's word for it)
            return self._create_then_confirm(path, data)
        return True

    def _create_then_confirm(self, path: str, data: bytes) -> bool:
        """Check-then-write, then read back: of two racing writers the one overwritten learns it lost.

        Narrower than a conditional create, not closed (both can read their own bytes back if their
        writes do not interleave), so it says so once per process.
        """
        protocol = str(self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0])
        if protocol not in _warned_no_exclusive:
            _warned_no_exclusive.add(protocol)
            warnings.warn(
                f"{self.url!r}: this filesystem ({protocol}) has no exclusive create, so two processes "
                "recovering one crashed segment at once may both act; restart crashed runs one at a time here.",
                stacklevel=3,
            )
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return self.fs.cat_file(path) == data

    def size(self, *parts: str) -> int:
        """Total bytes of a file or of every file below a directory."""
        path = self.join(*parts)
        try:
            return int(self.fs.du(path, total=True)) if self.fs.isdir(path) else int(self.fs.size(path))
        except FileNotFoundError:  # absent, or removed by another process while we counted
            return 0

    def zarr_store(self):  # -> zarr.abc.store.Store
        """A zarr v3 store over the root (LocalStore for paths, FsspecStore for URLs)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.root)
        return FsspecStore.from_url(self.url)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"


def _remove_local(path: Path) -> None:
    """Remove a local file or tree; entries another process removes meanwhile are skipped, not errors."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    hidden = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.removing")
    try:
        os.rename(path, hidden)  # atomic: the name is gone at once, whatever the deletion below meets
    except FileNotFoundError:
        return
    _remove_tree(hidden)


def _remove_tree(path: Path) -> None:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(Path(entry.path))
        else:
            Path(entry.path).unlink(missing_ok=True)
    with suppress(FileNotFoundError):
        os.rmdir(path)


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(data)
