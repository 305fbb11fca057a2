"""Sources on object stores and web servers (``beir:s3://…``, ``jsonl:gs://…``, ``msmarco:https://…``), read from a
local mirror.

The readers work on local files (polars reads chunks of a TSV, gzip streams, ``Path.stat`` for origins), and ddx
reads a source two or more times (the scan, the encode, training's phases), so a remote file or folder is first
mirrored to ``$DDX_CACHE_DIR/sources/<hash of the URL>/data/<parent>/<name>`` and the reader is handed that path:

- **Only what changed is downloaded.** ``manifest.json`` beside the copy records each file's remote signature
  (size and ETag or checksum; size and modification time when the server gives no ETag) and the local file's size
  and mtime. A file is fetched again when its remote signature changed or its local copy is missing or altered; a
  file gone from the remote folder is removed from the copy, so the copy is the folder as it is now.
- **Never a half file.** Each file downloads into ``tmp/`` beside the copy, is checked against the remote size, and
  is renamed into place; the manifest is rewritten (atomically) after the files, so a crash at any point leaves
  files that a rerun either trusts because they are complete or fetches again.
- **One download per machine.** Processes that mirror the same URL at once (torchrun ranks) take turns on a lock
  file (``flock``): the first downloads, the others find the copy fresh.
- **Only the files the kind reads.** A folder mirrors just the files its source kind recognises (a BEIR folder's
  corpus, queries, qrels and hard negatives; an MS MARCO folder's recognised names), not everything under the
  prefix.

Storage options are the store's (``--storage-options``, i.e. ``$DDX_STORAGE_OPTIONS``), with per-source overrides
from the spec's ``?storage.KEY=VALUE`` parameters (dotted keys nest; values are JSON when they parse). Network and
credential failures, a missing backend package and a missing remote path are one-line :class:`BadSourceError`\\ s;
messages about lines of mirrored files name their URL (:func:`.errors.shown`). The cache is never pruned: remove
``$DDX_CACHE_DIR/sources`` to reclaim its disk.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.callbacks import Callback

from storage.fs import (
    STORAGE_OPTIONS_ENV,
    atomic_open,
    default_cache_dir,
    parse_storage_options,
    remote_error,
    set_option,
)

from .errors import BadSourceError, register_mirror

__all__ = ["PROGRESS_BYTES", "is_remote", "local_path", "mirror", "storage_overrides"]

LOCAL_PROTOCOLS = (None, "file", "local")
PROGRESS_BYTES = 64 << 20  # show a download bar (stderr, terminals only) from this many bytes to fetch
STORAGE_PARAM = "storage."  # spec parameters ?storage.KEY=VALUE: storage options of this source only
MANIFEST_VERSION = 1
TAG_FIELDS = ("ETag", "etag", "md5Hash", "Content-MD5", "checksum", "crc32c", "Digest")  # S3, GCS, HTTP, Azure
TIME_FIELDS = ("LastModified", "last_modified", "mtime", "updated", "Last-Modified", "created")
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}

Wanted = Callable[[Path, Path], bool]  # (local path of a file, local root of the folder) -> mirror it?


def _protocol(location: str) -> str | None:
    return fsspec.core.split_protocol(location)[0] if "://" in location else None


def is_remote(location: str) -> bool:
    """Whether ``location`` is a URL of a filesystem other than the local one (``s3://``, ``memory://``, chained
    ``simplecache::s3://``, ...); ``file://`` URLs and plain paths are local."""
    return _protocol(location) not in LOCAL_PROTOCOLS


def local_path(location: str) -> str:
    """``location`` without a ``file://`` (or ``local://``) prefix; any other location as it is."""
    return location.split("://", 1)[1] if _protocol(location) in ("file", "local") else location


def storage_overrides(params: Mapping[str, str]) -> dict[str, Any]:
    """Storage options from spec parameters ``storage.KEY=VALUE`` (dotted keys nest, values JSON when they parse).

    Example:
        >>> storage_overrides({"storage.anon": "true", "storage.client_kwargs.region_name": "eu-west-1"})
        {'anon': True, 'client_kwargs': {'region_name': 'eu-west-1'}}
    """
    out: dict[str, Any] = {}
    for name, raw in params.items():
        if not name.startswith(STORAGE_PARAM):
            continue
        try:
            set_option(out, name[len(STORAGE_PARAM) :], raw)
        except ValueError as exc:
            raise BadSourceError(f"?{name}: {exc} is set to a value, not options.") from None
    return out


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = _merged(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return out


def mirror(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    wanted: Wanted | None = None,
    kind: str = "",
    cache_dir: Path | None = None,
) -> Path:
    """A local copy of the remote file or folder ``url``, brought up to date (see the module docstring).

    Args:
        url: an fsspec URL (``s3://bucket/data/scifact``, ``gs://...``, ``https://.../pairs.jsonl``).
        storage_options: overrides over the process defaults (``$DDX_STORAGE_OPTIONS``); nested options merge.
        wanted: which files of a folder to mirror (all when None); a single file is always mirrored.
        kind: the source kind, for messages.
        cache_dir: where mirrors live (``default_cache_dir() / "sources"`` when None).

    Returns:
        The local path of the copy: a file or a folder with the remote's name. When nothing exists at ``url`` the
        path does not exist either (the source reports it, naming the URL: :func:`.errors.shown`).

    Raises:
        BadSourceError: no fsspec backend for the protocol, a network or credential failure, a file that changed or
            vanished while it downloaded, a full disk.
    """
    url = url.rstrip("/")
    options = _merged(parse_storage_options(os.environ.get(STORAGE_OPTIONS_ENV) or None), storage_options or {})
    fs, root = _open(url, options, kind)
    home = (cache_dir or default_cache_dir() / "sources") / _home_name(url, options)
    parts = [p for p in root.rstrip("/").split("/") if p not in ("", ".", "..")]
    tree = home / "data" / (parts[-2] if len(parts) > 1 else "_") / (parts[-1] if parts else "_")
    register_mirror(str(tree), url)
    try:
        home.mkdir(parents=True, exist_ok=True)
        with _locked(home / "lock"):
            listing = _remote_call(url, kind, lambda: _list(fs, root.rstrip("/"), tree, wanted))
            _sync(fs, url, home, tree, listing, kind)
    except OSError as e:  # the local disk (remote failures are BadSourceErrors by now)
        if e.errno == errno.ENOSPC:
            raise BadSourceError(
                f"Disk full while copying {url} to {home}; free space there or point DDX_CACHE_DIR at a larger disk."
            ) from e
        raise BadSourceError(f"Cannot keep a local copy of {url} in {home}: {e}. Check DDX_CACHE_DIR.") from e
    return tree


def _open(url: str, options: Mapping[str, Any], kind: str) -> tuple[Any, str]:
    opts = dict(options)
    if "::" not in url:
        opts.setdefault("use_listings_cache", False)  # the folder as it is now, not as a listing cache saw it
    protocol = str(_protocol(url))
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        package = BACKENDS.get(protocol.split("::")[-1], f"the fsspec backend for {protocol}://")
        raise BadSourceError(
            f"{kind or 'source'}: cannot read {url}: {package} is not installed (pip install {package})."
        ) from e
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise BadSourceError(f"{kind or 'source'}: unknown protocol {protocol!r} in {url}: {e}.") from e
        raise BadSourceError(f"{kind or 'source'}: cannot open {url}: {e}.") from e
    except TypeError as e:  # an option this filesystem does not take
        raise BadSourceError(f"{kind or 'source'}: {url}: {e}; check --storage-options / ?storage.KEY=.") from e
    return fs, root


def _home_name(url: str, options: Mapping[str, Any]) -> str:
    """The cache folder of ``url``: a hash of it and of the endpoint (one bucket name on two servers is two mirrors)."""
    client = options.get("client_kwargs")
    endpoint = options.get("endpoint_url") or (client.get("endpoint_url") if isinstance(client, Mapping) else None)
    return hashlib.sha256(json.dumps([url, endpoint or ""]).encode()).hexdigest()[:20]


def _remote_call(url: str, kind: str, call: Callable[[], Any]) -> Any:
    """``call()``, its network, credential and client failures as one-line BadSourceErrors naming ``url``."""
    try:
        return call()
    except BadSourceError:
        raise
    except Exception as e:
        err = remote_error(url, e)
        if err is not None:
            raise BadSourceError(f"{kind or 'source'}: {err}") from e
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise  # the local disk: reported by mirror()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadSourceError(
            f"{kind or 'source'}: cannot read {url} ({type(e).__name__}: {first}); check the URL, "
            "--storage-options (or ?storage.KEY=VALUE on the spec) and the credentials."
        ) from e


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created when missing) for the block; none where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Listing:
    """What is at the URL now: nothing (``kind`` ""), a file or a folder, and per file (path relative to the copy,
    "" for a single file) its remote path, size and signature."""

    def __init__(self, kind: str, files: dict[str, tuple[str, int | None, str]]) -> None:
        self.kind, self.files = kind, files


def _list(fs: Any, root: str, tree: Path, wanted: Wanted | None) -> _Listing:
    fs.invalidate_cache()
    try:
        info = fs.info(root)
    except FileNotFoundError as e:
        cause = e.__cause__ or e.__context__  # fsspec's HTTP filesystem says "not found" for "unreachable" too
        if cause is not None and remote_error(root, cause) is not None:
            raise cause from e
        return _Listing("", {})
    if info.get("type") != "directory":
        return _Listing("file", {"": (root, _size(info), _signature(info))})
    files: dict[str, tuple[str, int | None, str]] = {}
    for name, entry in sorted(fs.find(root, detail=True).items()):
        name = name.rstrip("/")
        rel = name[len(root) :].lstrip("/") if name.startswith(root + "/") else ""
        pieces = rel.split("/")
        if entry.get("type") == "directory" or not rel or any(p in ("", ".", "..") for p in pieces):
            continue
        if wanted is not None and not wanted(tree.joinpath(*pieces), tree):
            continue
        files[rel] = (name, _size(entry), _signature(entry))
    return _Listing("folder", files)


def _size(info: Mapping[str, Any]) -> int | None:
    size = info.get("size", info.get("Size"))
    return int(size) if isinstance(size, int | float) else None


def _signature(info: Mapping[str, Any]) -> str:
    """What changes when the remote file does: size and ETag/checksum, else size and modification time ("" when the
    server says neither, so the file is fetched each time)."""
    tag = next((info[f] for f in TAG_FIELDS if info.get(f)), None)
    if tag is None:
        stamp = next((info[f] for f in TIME_FIELDS if info.get(f) is not None), None)
        tag = stamp.timestamp() if isinstance(stamp, datetime) else stamp
    if tag is None:
        return ""
    return json.dumps([_size(info), str(tag)])


def _read_manifest(home: Path, url: str) -> dict[str, Any]:
    try:
        doc = json.loads((home / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION or doc.get("url") != url:
        return {}
    return doc


def _fresh(entry: Any, signature: str, path: Path) -> bool:
    """Whether the local copy ``path`` is the remote file of ``signature``, as the manifest ``entry`` recorded it."""
    if not signature or not isinstance(entry, dict) or entry.get("signature") != signature:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and st.st_size == entry.get("size") and st.st_mtime_ns == entry.get("mtime_ns")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sync(fs: Any, url: str, home: Path, tree: Path, listing: _Listing, kind: str) -> None:
    """Make ``tree`` the remote as ``listing`` saw it: fetch the changed files, remove the ones gone."""
    shutil.rmtree(home / "tmp", ignore_errors=True)  # a crashed download's leftovers (we hold the lock)
    manifest = _read_manifest(home, url)
    known: dict[str, Any] = manifest.get("files", {}) if manifest.get("kind") == listing.kind else {}
    if not known or not listing.kind:
        _remove(home / "manifest.json")
        if tree.exists() or tree.is_symlink():
            _remove(tree)
    if not listing.kind:
        return
    if listing.kind == "folder" and tree.is_dir():
        for path in [p for p in tree.rglob("*") if not p.is_dir()]:
            if path.relative_to(tree).as_posix() not in listing.files:
                path.unlink(missing_ok=True)
    if listing.kind == "folder":  # made even when it holds no file the kind reads: the source says what is missing
        tree.mkdir(parents=True, exist_ok=True)
    local = {rel: tree.joinpath(*rel.split("/")) if rel else tree for rel in listing.files}
    todo = [rel for rel, (_, _, sig) in listing.files.items() if not _fresh(known.get(rel), sig, local[rel])]
    entries = {rel: known[rel] for rel in listing.files if rel not in todo}
    if todo:
        total = sum(listing.files[rel][1] or 0 for rel in todo)
        tmp = home / "tmp" / uuid.uuid4().hex[:8]
        tmp.mkdir(parents=True)
        try:
            with _progress(url, total) as bar:
                for i, rel in enumerate(todo):
                    rpath, size, sig = listing.files[rel]
                    part = tmp / f"{i}.part"
                    _remote_call(url, kind, functools.partial(_fetch, fs, rpath, part, bar))
                    got = part.stat().st_size
                    if size is not None and got != size:
                        raise BadSourceError(
                            f"{kind or 'source'}: {url}: {rel or 'the file'} changed while it downloaded "
                            f"({got} of {size} bytes); run again."
                        )
                    local[rel].parent.mkdir(parents=True, exist_ok=True)
                    if local[rel].is_dir():
                        _remove(local[rel])
                    os.replace(part, local[rel])
                    st = local[rel].stat()
                    entries[rel] = {"signature": sig, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        finally:
            shutil.rmtree(home / "tmp", ignore_errors=True)  # ours alone: we hold the lock
    if manifest and not todo and entries == known:
        return  # nothing changed: the manifest stands
    doc = {"version": MANIFEST_VERSION, "url": url, "kind": listing.kind, "files": entries}
    with atomic_open(home / "manifest.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True))


def _fetch(fs: Any, rpath: str, lpath: Path, bar: Any) -> None:
    """Download one remote file to ``lpath`` (the unit the tests count)."""
    if bar is None:
        fs.get_file(rpath, str(lpath))
    else:
        fs.get_file(rpath, str(lpath), callback=_ProgressCallback(bar))


@contextmanager
def _progress(url: str, total: int) -> Iterator[Any]:
    """A tqdm bar on stderr for a download of ``total`` bytes (None under :data:`PROGRESS_BYTES`)."""
    if total < PROGRESS_BYTES:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"copying {url}", file=sys.stderr, disable=None
    ) as bar:
        yield bar


class _ProgressCallback(Callback):  # type: ignore[misc]
    """fsspec's per-file byte counts, added to one bar over every file."""

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self.bar, self.shown = bar, 0

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.value > self.shown:
            self.bar.update(self.value - self.shown)
            self.shown = self.value
