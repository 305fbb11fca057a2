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
create (:meth:`Location.create_exclusive`: ``If-None-Match: *`` on S3), rewritten with the time by a
timer thread while held (:class:`storage.heartbeat.Beat`) and presumed left by a dead process once
``stale_after`` old (:func:`storage.heartbeat.stale_after`). A stale claim is broken by exactly one
process: the one that conditionally creates ``.claim.break-<token of the stale claim>``; it removes the
stale claim (if it still is the one it judged stale) and creates its own, conditionally again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from storage.fs import Location
from storage.heartbeat import Beat, beat_interval, stale_after
from storage.segment_format import SEGMENTS

__all__ = ["CLAIM", "claim_held", "flock_held", "segment_claim"]

CLAIM = ".claim"


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
    held = _take_remote(loc, seg_id)
    try:
        yield held is not None
    finally:
        if held is not None:
            held.release()


def claim_held(loc: Location, seg_id: str) -> bool:
    """True while some process holds the segment's claim (a probe: it takes nothing)."""
    path = loc.local_path(SEGMENTS, seg_id, CLAIM)
    if path is not None:
        return bool(flock_held(path))
    return _age(_read_claim(loc, seg_id)) < stale_after(loc)


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


class _RemoteClaim:
    """A claim object this process created: beaten by a timer thread while held, removed on release."""

    def __init__(self, loc: Location, seg_id: str, token: str, breaker: str | None) -> None:
        self.loc, self.seg_id, self.token, self.breaker = loc, seg_id, token, breaker
        stale = stale_after(loc)
        what = f"Claim on segment {seg_id!r} of store {loc.url!r}"
        self.beat = Beat(self._refresh, interval=beat_interval(stale), stale=stale, what=what).start()

    def _refresh(self) -> None:
        """Rewrite the claim with the time, while it is still ours (another may have broken it as stale)."""
        if (_read_claim(self.loc, self.seg_id) or {}).get("token") == self.token:
            self.loc.write_atomic(_payload(self.token), SEGMENTS, self.seg_id, CLAIM)

    def release(self) -> None:
        self.beat.stop()
        with contextlib.suppress(FileNotFoundError):
            if (_read_claim(self.loc, self.seg_id) or {}).get("token") == self.token:
                self.loc.remove(SEGMENTS, self.seg_id, CLAIM)
        if self.breaker is not None:
            self.loc.remove(SEGMENTS, self.seg_id, self.breaker)


def _payload(token: str) -> bytes:
    return json.dumps({"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "token": token}).encode()


def _take_remote(loc: Location, seg_id: str) -> _RemoteClaim | None:
    """The claim, created conditionally (or broken when its holder is presumed dead); None when held elsewhere."""
    if not loc.isdir(SEGMENTS, seg_id):  # a claim object would bring a removed segment's prefix back
        return None
    token = uuid.uuid4().hex
    if loc.create_exclusive(_payload(token), SEGMENTS, seg_id, CLAIM):
        return _RemoteClaim(loc, seg_id, token, None)
    stale = _read_claim(loc, seg_id)
    if stale is None:  # released (or unreadable) since: one more try, as the first
        return (
            _RemoteClaim(loc, seg_id, token, None)
            if loc.create_exclusive(_payload(token), SEGMENTS, seg_id, CLAIM)
            else None
        )
    if _age(stale) < stale_after(loc):
        return None
    # Its holder is presumed dead. Of all processes that judged this claim stale, exactly one creates its breaker.
    stale_token = str(stale.get("token") or stale.get("time"))
    breaker = f"{CLAIM}.break-{''.join(c for c in stale_token if c.isalnum() or c in '._-')[:64]}"
    if not loc.create_exclusive(_payload(token), SEGMENTS, seg_id, breaker):
        return None
    current = _read_claim(loc, seg_id)
    if current is not None and current.get("token") == stale.get("token") and current.get("time") == stale.get("time"):
        loc.remove(SEGMENTS, seg_id, CLAIM)
    if loc.create_exclusive(_payload(token), SEGMENTS, seg_id, CLAIM):
        return _RemoteClaim(loc, seg_id, token, breaker)
    loc.remove(SEGMENTS, seg_id, breaker)
    return None


def _read_claim(loc: Location, seg_id: str) -> dict[str, Any] | None:
    """The claim object's content; None when there is none (or it is unreadable)."""
    try:
        doc = json.loads(loc.read_bytes(SEGMENTS, seg_id, CLAIM))
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _age(claim: dict[str, Any] | None) -> float:
    """Seconds since the claim was last written; infinity when there is none (or its time is unreadable)."""
    try:
        return time.time() - float(claim["time"])  # type: ignore[index]
    except (KeyError, ValueError, TypeError):
        return float("inf")
