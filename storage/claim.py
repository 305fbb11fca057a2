"""Exclusive claims on abandoned segments: of any number of processes recovering one, exactly one acts.

A segment whose writer died is salvaged (its indexed rows committed) or, when it holds nothing,
removed. Either must happen once: eight precomputes racing over one crashed segment used to salvage
it twice and then delete it, rows and all. Whoever salvages or removes a segment first takes its
claim; the others find it held and wait, then see the result. The holder re-checks the segment after
taking the claim (COMMIT present? still there?): another process may have finished meanwhile.

*Local stores*: an ``flock`` on ``segments/<id>/.claim``. The kernel drops it when its process dies,
so a salvager killed mid-way never blocks the next one, which finishes the job (each salvage step is
safe to repeat). The claim is a file of its own, not the writer's ``.lock``: a probe can then tell a
live writer from a salvage in progress. *Object stores*: a ``.claim`` object made by a conditional
create (:meth:`Location.create_exclusive`), presumed dead after ``STALE_CLAIM_S``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.fs import Location
from storage.segment_format import SEGMENTS

__all__ = ["CLAIM", "STALE_CLAIM_S", "claim_held", "flock_held", "segment_claim"]

CLAIM = ".claim"
STALE_CLAIM_S = 15 * 60  # a remote claim this old is presumed left by a dead process


@contextmanager
def segment_claim(loc: Location, seg_id: str) -> Iterator[bool]:
    """Hold the segment's claim for the block; yields False when another process holds it or the segment is gone.

    Example:
        >>> with segment_claim(loc, seg_id) as mine:  # doctest: +SKIP
        ...     if mine and not loc.exists("segments", seg_id, "COMMIT"):
        ...         salvage(...)
    """
    path = loc.local_path(SEGMENTS, seg_id, CLAIM)
    if path is not None:
        fd = _take_local(path)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)
        return
    taken = _take_remote(loc, seg_id)
    try:
        yield taken
    finally:
        if taken:
            loc.remove(SEGMENTS, seg_id, CLAIM)


def claim_held(loc: Location, seg_id: str) -> bool:
    """True while some process holds the segment's claim (a probe: it takes nothing)."""
    path = loc.local_path(SEGMENTS, seg_id, CLAIM)
    if path is not None:
        return bool(flock_held(path))
    return _remote_claim_age(loc, seg_id) < STALE_CLAIM_S


def flock_held(path: Path) -> bool | None:
    """Whether a process holds an exclusive ``flock`` on ``path``; None when the file does not exist.

    The probe takes a *shared* lock for an instant, so probes never block each other, only holders.
    """
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _take_local(path: Path) -> int | None:
    """An fd holding the exclusive flock on ``path``, or None (held elsewhere, or the segment is gone)."""
    import fcntl

    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:  # else the segment was removed while we waited
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _take_remote(loc: Location, seg_id: str) -> bool:
    if not loc.isdir(SEGMENTS, seg_id):  # a claim object would bring a removed segment's prefix back
        return False
    payload = json.dumps({"time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}).encode()
    if loc.create_exclusive(payload, SEGMENTS, seg_id, CLAIM):
        return True
    if _remote_claim_age(loc, seg_id) < STALE_CLAIM_S:
        return False
    # Its holder died. Two processes breaking one stale claim at once can both win here; object-store
    # recovery (issue 13) replaces this with a generation-conditional overwrite.
    loc.remove(SEGMENTS, seg_id, CLAIM)
    return loc.create_exclusive(payload, SEGMENTS, seg_id, CLAIM)


def _remote_claim_age(loc: Location, seg_id: str) -> float:
    """Seconds since the claim object was written; infinity when there is none (or it is unreadable)."""
    try:
        return time.time() - float(json.loads(loc.read_bytes(SEGMENTS, seg_id, CLAIM))["time"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return float("inf")
