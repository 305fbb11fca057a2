"""Where a store lives: a local directory or any fsspec URL, with the few file operations the store needs.

:meth:`Location.write_atomic` is atomic: a local file goes through a temp file, fsync and ``os.replace``;
an object store (S3, GCS) makes each PUT atomic by itself. Two operations here are not: a local
:meth:`Location.create_exclusive` creates the file and then writes it (a reader can meet it empty or short),
and :func:`replace_dir` swaps a folder in by two renames (between them the folder is absent). Vector
chunks neither come nor go through here: zarr writes them, a row counts once the index part naming
it is written (``segment_writer.py``), and local chunk files are memory-mapped directly
(``SegmentReader`` in ``segment_reader.py``).

:func:`atomic_path` and :func:`atomic_open` are the temp-file-and-rename recipe for the local files ddx
writes whole (store metadata, run files, projection weights, token tables, TREC runs, checkpoint
manifests, the weights-id cache); files appended to (``train_log.jsonl``) or written by libraries
(zarr chunks, the Trainer's checkpoints) do not use it. :func:`default_cache_dir` is the one answer to
where ddx caches (token tables, unpacked models).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import DdxError, DiskFullError, RemoteStoreError

__all__ = [
    "Location",
    "atomic_open",
    "atomic_path",
    "default_cache_dir",
    "parse_storage_options",
    "remote_error",
    "replace_dir",
]

# fsspec protocols whose open(mode="xb") is a conditional create (s3fs: PUT with If-None-Match: *; memory: a
# check and a write under the GIL). fsspec's base file accepts "xb" on any backend and may check-then-write, so
# on others exclusive create is check-then-write-then-read-back, with a warning (_create_then_confirm).
_CONDITIONAL_CREATE = frozenset({"s3", "s3a", "memory"})
# s3fs accepted "xb" from 2024.12.0 but sent a file smaller than one part as a plain PUT, If-None-Match dropped,
# until 2025.7.0 (s3fs#973, fixed by #974); every claim ddx writes is that small. pyproject cannot raise the
# extra's floor without sending pip's resolver into a backtrack, so the version is checked where it matters.
_S3FS_CONDITIONAL_XB = (2025, 7, 0)
_warned_no_exclusive: set[str] = set()  # filesystem protocols already warned about, once a process


def _s3fs_version() -> tuple[int, ...]:
    """The installed s3fs's calendar version as (year, month, patch); (0,) when it cannot be read."""
    import s3fs  # only asked for s3:// locations, which fsspec opened with s3fs

    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(getattr(s3fs, "__version__", "")))
    return tuple(int(g or 0) for g in m.groups()) if m else (0,)


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


# Names (anywhere in an exception's class hierarchy or its chain of causes) that mean the endpoint could not be
# reached, or that the credentials were missing or refused: botocore/aiobotocore (S3), aiohttp, google-auth (GCS).
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "TransportError",
}
_NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "NoAuthTokenError",
    "DefaultCredentialsError",
    "RefreshError",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
}
_F = TypeVar("_F", bound=Callable[..., Any])


STORAGE_OPTIONS_ENV = "DDX_STORAGE_OPTIONS"  # JSON; the default storage options of every Location made without any


def parse_storage_options(value: str | Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec storage options from what a user typed: a JSON object, or ``key=value`` pairs (comma-separated or
    one per item); dotted keys nest (``client_kwargs.region_name=eu-west-1``), values are read as JSON when they
    parse (``true``, ``5``) and as text otherwise. A mapping (a config file's) is taken as it is.

    Raises:
        DdxError: not a JSON object and not ``key=value`` pairs (the message shows both forms).

    Example:
        >>> parse_storage_options("endpoint_url=http://127.0.0.1:9000,anon=false,client_kwargs.region_name=us-east-1")
        {'endpoint_url': 'http://127.0.0.1:9000', 'anon': False, 'client_kwargs': {'region_name': 'us-east-1'}}
        >>> parse_storage_options('{"key": "k", "secret": "s"}')
        {'key': 'k', 'secret': 's'}
    """

    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    items = [value] if isinstance(value, str) else list(value)
    out: dict[str, Any] = {}
    for item in items:
        text = item.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                doc = json.loads(text)
            except ValueError as exc:
                raise DdxError(f"--storage-options {text!r} is not valid JSON ({exc}).") from exc
            if not isinstance(doc, dict):
                raise DdxError(f"--storage-options {text!r} must be a JSON object.")
            out.update(doc)
            continue
        for pair in text.split(","):
            key, sep, raw = pair.partition("=")
            if not sep or not key.strip():
                raise DdxError(
                    f"--storage-options {pair!r} is not key=value; pass key=value pairs "
                    '(endpoint_url=http://host:9000,key=...) or a JSON object (\'{"endpoint_url": "..."}\').'
                )
            try:
                set_option(out, key.strip(), raw)
            except ValueError as exc:
                raise DdxError(f"--storage-options {key!r}: {exc} is set to a value, not options.") from None
    return out


def set_option(options: dict[str, Any], dotted: str, raw: str) -> None:
    """Set ``options[a][b]...`` for the key ``a.b...`` to ``raw`` read as JSON when it parses, else as text.

    Raises:
        ValueError: a parent of the key already holds a value (the message is that parent's name, quoted).
    """
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    *parents, leaf = dotted.split(".")
    node = options
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ValueError(repr(name))
    node[leaf] = value


def remote_error(url: str, exc: BaseException) -> RemoteStoreError | None:
    """A one-line :class:`RemoteStoreError` for a network or credential failure talking to ``url``; None otherwise.

    Missing files (``FileNotFoundError``) and ddx's own errors are not network failures: None.

    Example:
        >>> remote_error("s3://b/x", ConnectionRefusedError(111, "Connection refused"))  # doctest: +ELLIPSIS
        RemoteStoreError('s3://b/x: cannot reach the endpoint (ConnectionRefusedError: ...
    """
    if isinstance(exc, (DdxError, FileNotFoundError, FileExistsError)):
        return None
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        names = {c.__name__ for c in type(e).__mro__}
        detail = f"{type(e).__name__}: {_first_line(e)}"
        if names & _NO_CREDENTIALS:
            return RemoteStoreError(
                f"{url}: no valid credentials ({detail}); pass them with --storage-options (e.g. key=... secret=...) "
                "or the provider's environment variables / config file."
            )
        if names & _UNREACHABLE or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return RemoteStoreError(
                f"{url}: cannot reach the endpoint ({detail}); check --storage-options endpoint_url "
                "(or AWS_ENDPOINT_URL), the network, and the credentials."
            )
    denied = next((e for e in chain if isinstance(e, PermissionError)), None)
    if denied is not None:
        return RemoteStoreError(
            f"{url}: access denied ({type(denied).__name__}: {_first_line(denied)}); check the credentials "
            "(--storage-options) and the bucket's permissions."
        )
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def _remote_errors(method: _F) -> _F:
    """Turn a network or credential failure of a remote Location's operation into a one-line RemoteStoreError."""

    @functools.wraps(method)
    def wrapper(self: Location, *args: Any, **kwargs: Any) -> Any:
        if self.is_local:
            return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            error = remote_error(self.url, exc)
            if error is None:
                raise
            raise error from exc

    return wrapper  # type: ignore[return-value]


class Location:
    """A root directory (local path or fsspec URL) and atomic operations below it.

    Every listing and existence check reads the store as it is now: remote filesystems are opened with
    fsspec's listing cache off (``use_listings_cache=False``), since other processes commit, salvage and
    remove segments while this one runs (a cached listing hid their commits: issue 13). The filesystem is
    opened anew in a forked child (fsspec's async filesystems are not fork-safe), so DataLoader workers can
    read a remote store. Network and credential failures of remote operations are :class:`RemoteStoreError`.

    Args:
        url: local path or fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).
        storage_options: passed to fsspec (and zarr) for remote URLs: ``endpoint_url``, ``key``, ``secret``,
            ``client_kwargs``, ... (s3fs/gcsfs keyword arguments).
        stale_after: seconds after which a remote writer's heartbeat or a remote claim counts as left by a
            dead process (None: :data:`storage.heartbeat.STALE_AFTER_S`, or ``$DDX_STALE_AFTER``).

    Example:
        >>> loc = Location("/tmp/store")
        >>> loc.join("segments", "a")
        '/tmp/store/segments/a'
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        stale_after: float | None = None,
    ) -> None:
        self.url = os.fspath(url)
        if storage_options is None:  # the command line's --storage-options, for this process and its workers
            storage_options = parse_storage_options(os.environ.get(STORAGE_OPTIONS_ENV) or None)
        self.storage_options: dict[str, Any] = dict(storage_options)
        self.stale_after = stale_after
        self._fs: Any = None
        self._fs_pid = -1
        fs, root = self._open_fs()
        self.is_local = isinstance(fs, LocalFileSystem)
        self.root = str(Path(root).absolute()) if self.is_local else root.rstrip("/")

    def _fs_options(self) -> dict[str, Any]:
        opts = dict(self.storage_options)
        protocol = fsspec.core.split_protocol(self.url)[0]
        if protocol not in (None, "file", "local") and "::" not in self.url:
            opts.setdefault("use_listings_cache", False)  # another process's commit must show at once
        return opts

    def _open_fs(self) -> tuple[Any, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **self._fs_options())
        self._fs, self._fs_pid = fs, os.getpid()
        return fs, root

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (opened again after a fork)."""
        if self._fs_pid != os.getpid():
            self._open_fs()
        return self._fs

    def join(self, *parts: str) -> str:
        """Path of ``parts`` below the root, in the filesystem's own form."""
        return "/".join([self.root, *parts]) if parts else self.root

    def local_path(self, *parts: str) -> Path | None:
        """A local ``Path`` for memory-mapping, or None for remote stores."""
        return Path(self.join(*parts)) if self.is_local else None

    @_remote_errors
    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.join(*parts)))

    @_remote_errors
    def isdir(self, *parts: str) -> bool:
        return bool(self.fs.isdir(self.join(*parts)))

    @_remote_errors
    def isfile(self, *parts: str) -> bool:
        return bool(self.fs.isfile(self.join(*parts)))

    @_remote_errors
    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries directly below ``parts``; [] when it does not exist."""
        try:
            listing = self.fs.ls(self.join(*parts), detail=False)
        except FileNotFoundError:  # absent, or removed by another process while we looked
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing)

    @_remote_errors
    def read_bytes(self, *parts: str) -> bytes:
        return bytes(self.fs.cat_file(self.join(*parts)))

    @_remote_errors
    def write_atomic(self, data: bytes, *parts: str, sync: bool = True) -> None:
        """Write ``data`` so readers see the old file or the new one, never a torn one.

        ``sync=False`` skips the local fsync, for files a later step fsyncs anyway (a segment's chunk
        files, all fsynced before its COMMIT: :func:`storage.segment_format.sync_vectors`).

        Raises:
            DiskFullError: the disk filled up; nothing already stored is touched.
        """
        path = self.join(*parts)
        try:
            if self.is_local:
                _write_local_atomic(Path(path), data, sync=sync)
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

    @_remote_errors
    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.join(*parts), exist_ok=True)

    @_remote_errors
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

    @_remote_errors
    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create a file holding ``data`` only if nothing is there yet; False when it already exists.

        Locally ``O_CREAT | O_EXCL``; on the fsspec protocols in ``_CONDITIONAL_CREATE`` (s3fs from 2025.7.0,
        the memory filesystem) ``open(mode="xb")``, a conditional PUT. Any other backend (gcsfs, adlfs
        included), an fsspec too old to open "xb", an s3fs whose "xb" was a plain PUT for small files, or a
        server refusing conditional writes falls back to check-then-write-then-read-back, which two processes
        can both pass, with a warning. ``data`` must not be empty (s3fs writes an empty file unconditionally).
        """
        if not data:
            raise ValueError("create_exclusive needs bytes to write: an empty object is not created conditionally")
        path = self.join(*parts)
        if self.is_local:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.fs.exists(path):  # a server that ignores If-None-Match must not let a later creator win
            return False
        if self.protocol not in _CONDITIONAL_CREATE:  # fsspec accepts "xb" everywhere; atomic only on these
            return self._create_then_confirm(path, data)
        if self.protocol in ("s3", "s3a") and _s3fs_version() < _S3FS_CONDITIONAL_XB:
            return self._create_then_confirm(path, data, because="s3fs before 2025.7.0 (s3fs#973): pip install -U s3fs")
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except NotImplementedError:  # a file class that refuses "xb" (fsspec's base file before it knew the mode;
            return self._create_then_confirm(path, data)  # an s3fs that old took the version check's path above)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # the server refuses conditional writes (s3fs maps S3's 501 NotImplemented to ENOSYS: older MinIO, Ceph)
            return self._create_then_confirm(path, data)
        return self.fs.cat_file(path) == data  # of two racers on a server ignoring the condition, the loser learns it

    def _create_then_confirm(self, path: str, data: bytes, because: str = "") -> bool:
        """Check-then-write, then read back: of two racing writers the one overwritten learns it lost.

        Narrower than a conditional create, not closed (both can read their own bytes back if their
        writes do not interleave), so it says so once per process, with ``because`` when the fix is known.
        """
        protocol = self.protocol
        if protocol not in _warned_no_exclusive:
            _warned_no_exclusive.add(protocol)
            warnings.warn(
                f"{self.url!r}: this filesystem ({protocol}) has no exclusive create"
                + (f" ({because})" if because else "")
                + ", so two processes recovering one crashed segment at once may both act; restart crashed runs "
                "one at a time here.",
                stacklevel=3,
            )
        self.fs.pipe_file(path, data)  # the caller checked that nothing is there
        return self.fs.cat_file(path) == data

    @property
    def protocol(self) -> str:
        return str(self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0])

    @_remote_errors
    def size(self, *parts: str) -> int:
        """Total bytes of a file or of every file below a directory."""
        path = self.join(*parts)
        try:
            return int(self.fs.du(path, total=True)) if self.fs.isdir(path) else int(self.fs.size(path))
        except FileNotFoundError:  # absent, or removed by another process while we counted
            return 0

    @_remote_errors
    def read_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Bytes ``start:end`` of each (path below the root, start, end), fetched concurrently where the
        filesystem can (``cat_ranges``: one ranged GET each on S3/GCS).

        Raises:
            FileNotFoundError: a file is missing.
        """
        if not ranges:
            return []
        paths = [self.join(p) for p, _, _ in ranges]
        got = self.fs.cat_ranges(paths, [s for _, s, _ in ranges], [e for _, _, e in ranges], on_error="return")
        for item in got:
            if isinstance(item, BaseException):
                raise item
        return [bytes(b) for b in got]

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn network and credential failures inside the block into :class:`RemoteStoreError` (remote only).

        For work that reaches the store through another library (zarr's array writes and reads).
        """
        try:
            yield
        except Exception as exc:
            error = None if self.is_local else remote_error(self.url, exc)
            if error is None:
                raise
            raise error from exc

    def zarr_store(self):  # -> zarr.abc.store.Store
        """A zarr v3 store over the root (LocalStore for paths, FsspecStore for URLs, with the storage options)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.root)
        return FsspecStore.from_url(self.url, storage_options=self._fs_options())

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


def _write_local_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if sync:
        with atomic_open(path, "wb") as f:
            f.write(data)
        _fsync_dir(path.parent)  # the rename itself: without it a power cut can bring the old file (or none) back
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
