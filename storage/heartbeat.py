"""Liveness on object stores: a timer thread that beats, and the timeout after which silence means death.

A local writer holds an ``flock`` on its segment and a local salvager one on its claim: the kernel drops
them when the process dies, so a crash is seen at once. An object store has no locks, so a remote writer
(and a remote claim's holder) rewrites a small object with the time every :data:`HEARTBEAT_S` seconds,
from a daemon thread (:class:`Beat`), and others presume it dead once that time is ``stale_after``
seconds old (:func:`stale_after`).

*The choice of 60 s* (:data:`STALE_AFTER_S`): it was 15 minutes, and a beat was written only on a
flush, so a writer encoding a long batch had to be given a long silence. With a beat every 5 s from a
thread of its own, a live writer misses 12 beats in a row before it is presumed dead: one lost request,
a slow PUT or a garbage-collection pause costs nothing, and a killed writer's rows are salvaged about a
minute after the kill instead of 15. Clocks: a beat carries the writer's wall-clock time and is judged
by the reader's, so hosts must agree to well within ``stale_after`` (NTP does); raise it
(``TeacherStore.open(url, stale_after=...)``, ``$DDX_STALE_AFTER``) where they may not. A writer whose own
beats have been failing for ``stale_after`` stops at its next flush (:meth:`Beat.check`): others may
already be salvaging its segment.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable

from storage.errors import RemoteStoreError
from storage.fs import Location

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "Beat", "beat_interval", "stale_after"]

HEARTBEAT_S = 5.0  # a remote writer (or claim holder) rewrites its heartbeat this often
STALE_AFTER_S = 60.0  # ... and is presumed dead when its last beat is this old


def stale_after(loc: Location) -> float:
    """Seconds of silence after which a remote writer or claim holder of ``loc`` is presumed dead.

    ``loc.stale_after`` when set (``TeacherStore.open(url, stale_after=...)``), else ``$DDX_STALE_AFTER``,
    else :data:`STALE_AFTER_S`.
    """
    if loc.stale_after is not None:
        return float(loc.stale_after)
    env = os.environ.get("DDX_STALE_AFTER", "").strip()
    return float(env) if env else STALE_AFTER_S


def beat_interval(stale: float) -> float:
    """How often to beat so that several beats fit in ``stale`` seconds (at most :data:`HEARTBEAT_S`)."""
    return max(0.05, min(HEARTBEAT_S, stale / 6))


class Beat:
    """A daemon thread calling ``beat`` every ``interval`` seconds until :meth:`stop`.

    A failing beat does not stop the thread (the next one may get through) and does not pass silently:
    :meth:`check`, called by the owner at its next flush, warns about it, or raises once the beats have
    been failing for ``stale`` seconds (others presume the owner dead by then).

    Args:
        beat: writes one heartbeat (raises on failure).
        interval: seconds between beats.
        stale: seconds of failed beats after which :meth:`check` raises.
        what: names the owner in messages ("segment X of s3://...").
    """

    def __init__(self, beat: Callable[[], None], *, interval: float, stale: float, what: str) -> None:
        self._beat, self.interval, self.stale, self.what = beat, interval, stale, what
        self._stop = threading.Event()
        self.last_ok = time.monotonic()
        self.error: BaseException | None = None  # the first failure since the last check
        self.lapsed: float | None = None  # a silence of >= stale seconds, seen before a beat (sticky)
        self.beats = 0
        self._thread = threading.Thread(target=self._run, name="ddx-heartbeat", daemon=True)

    def start(self) -> Beat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat_now()

    def beat_now(self) -> None:
        """One beat; a failure is recorded for :meth:`check`, not raised.

        After a silence of ``stale`` seconds (the process was paused: SIGSTOP, a suspended VM, a stalled disk;
        or every beat failed) others may have presumed the owner dead and acted, so no beat follows: the lapse
        is kept for :meth:`check`, whichever of the owner and this thread runs first after the pause.
        """
        silent = time.monotonic() - self.last_ok
        if self.lapsed is not None or silent >= self.stale:
            self.lapsed = max(self.lapsed or 0.0, silent)
            return
        try:
            self._beat()
        except Exception as exc:
            if self.error is None:
                self.error = exc
        else:
            self.last_ok = time.monotonic()
            self.beats += 1

    def ok(self) -> None:
        """Record a heartbeat written by the owner itself (on a flush)."""
        self.last_ok = time.monotonic()

    def check(self) -> None:
        """Raise when no beat got through for ``stale`` seconds; warn (once per failure) when one failed.

        Raises:
            RemoteStoreError: the heartbeat lapsed; other processes may presume the owner dead and act.
        """
        error, self.error = self.error, None
        silent = max(time.monotonic() - self.last_ok, self.lapsed or 0.0)
        if silent >= self.stale:
            self.lapsed = silent
            why = f"last error: {error!r}" if error is not None else "the process was paused, or stalled"
            raise RemoteStoreError(
                f"{self.what}: no heartbeat was written for {silent:.0f} s ({why}; others presume a writer dead "
                f"after {self.stale:.0f} s and may salvage its segment). Rows flushed so far are kept for salvage; "
                "nothing more is written to it: rerun the same command to resume."
            )
        if error is not None:
            warnings.warn(
                f"{self.what}: a heartbeat failed ({error!r}); retrying every {self.interval:g} s.", stacklevel=3
            )

    def stop(self) -> None:
        """Stop beating; waits (up to a minute) for a beat in flight, so none is written after this returns."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(60.0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
