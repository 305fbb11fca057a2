"""Recovering before a run: commit what crashed runs left, so their rows are neither lost nor encoded again.

Both engines start here (:func:`salvage_abandoned`), before planning: every abandoned segment (a killed run, a
killed Ray actor's unit) is salvaged under its claim (:func:`storage.segment.claim_and_salvage`), so the plan
counts its rows as stored. A remote segment whose writer beat recently is watched until it is known alive (a run
overlapping this one: warned about) or dead (salvaged now, not encoded again and salvaged as duplicates later).
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings

from storage.heartbeat import beat_interval, stale_after
from storage.segment import claim_and_salvage, read_heartbeat, segment_state
from storage.store import TeacherStore

__all__ = ["may_overlap", "salvage_abandoned"]


def salvage_abandoned(
    store: TeacherStore, wait_s: float = 300.0, *, rank: int = 0, world: int = 1
) -> list[tuple[str, int]]:
    """Salvage abandoned segments; returns (segment, rows) for those this process committed.

    Each segment is salvaged under its claim, so of many processes starting at once (torchrun ranks
    after a crash) exactly one commits it and reports its rows. The others wait until it is done, so
    their scan counts its rows as stored instead of encoding them again. A salvager that dies releases
    its claim and the next try here finishes the job; after ``wait_s`` this run goes on regardless.

    A remote segment whose writer beat recently is watched first (:func:`_watch_active`): a writer killed
    moments ago is salvaged as soon as its silence reaches ``stale_after``, instead of its rows being
    encoded again by this run and salvaged as duplicates by the next; a live one is a run overlapping
    this one, named in a warning.
    """
    states = store.uncommitted_segments()
    pending = {s for s, state in states if state in ("abandoned", "salvaging")}
    active = [s for s, state in states if state == "active" and may_overlap(s, rank, world)]
    if active:
        pending |= _watch_active(store, active, loud=rank == 0)
    done: list[tuple[str, int]] = []
    deadline = time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        for seg_id in sorted(pending):
            result = claim_and_salvage(store.loc, seg_id)
            if result.outcome == "busy":
                continue  # another process is salvaging it right now
            pending.discard(seg_id)
            if result.outcome == "salvaged":
                done.append((seg_id, result.rows))
            elif result.outcome == "damaged":
                warnings.warn(result.detail, stacklevel=3)
        if pending:
            time.sleep(0.05)
    store.refresh()
    return done


_SEGMENT_SLICE = re.compile(r"-r(\d+)of(\d+)-[0-9a-f]+$")  # storage.segment_format.new_segment_id's tail


def may_overlap(seg_id: str, rank: int, world: int) -> bool:
    """Whether the segment's writer may encode keys of this rank's slice (True when its id does not say).

    Slices depend on the key alone (:func:`storage.keys.key_slice`: its first 8 bytes mod the world size), so
    slice r' of w' and slice r of w share keys exactly when r' = r modulo gcd(w', w): never for another rank of
    the same world size (this job's other ranks, or a killed run's, which those ranks watch themselves).
    """
    found = _SEGMENT_SLICE.search(seg_id)
    if found is None:
        return True
    r, w = int(found[1]), int(found[2])
    g = math.gcd(w, world) if w > 0 else 1
    return r % g == rank % g


def _watch_active(store: TeacherStore, seg_ids: list[str], *, loud: bool) -> set[str]:
    """Tell a dead writer from a live one among uncommitted segments that look 'active'; returns the dead.

    Local stores need no watching: 'active' means the writer's flock is held, which the kernel drops when the
    process dies, so each is a live run overlapping this one (warned about at once). On an object store,
    'active' means a heartbeat younger than ``stale_after``, which a writer killed a moment ago also has. Each
    heartbeat is read again every half beat interval until

    * it **advances**: the writer is alive, a run overlapping this one, so this run encodes its in-flight
      texts too. One warning names the segments (duplicates are harmless: lookups use the first row);
    * it **goes stale** (its silence reaches ``stale_after``, or its writer marked it closed): the writer is
      dead and the segment is returned, to be salvaged now, before the scan, so its rows are not encoded again;
    * the segment is committed or removed meanwhile: its rows are stored (or gone) and the scan sees which.

    The verdict "dead" is the store's own (:func:`storage.segment.segment_state`), not an earlier guess such as
    "two beat intervals of silence": a live writer gives up only after ``stale_after`` of failed beats
    (:meth:`storage.heartbeat.Beat.check`) and keeps flushing until then, so salvaging it sooner could commit a
    segment that it then rewrites; and the interval it beats at follows its own ``stale_after``, which need not
    be this process's. A live writer is recognised within one of its beats (5 s at most), a dead one after at
    most ``stale_after`` (the whole wait is bounded by that, plus a poll): a minute at the default, against
    encoding its rows twice. A heartbeat that neither advances nor goes stale by then (clocks that disagree by
    more than ``stale_after``) is left alone, with the warning.
    """
    live: list[str] = []
    dead: set[str] = set()
    if store.loc.is_local:
        live = sorted(seg_ids)
    else:
        stale = stale_after(store.loc)
        poll = min(1.0, beat_interval(stale) / 2)
        first = {s: read_heartbeat(store.loc, s) for s in seg_ids}
        watching = set(seg_ids)
        if loud:
            print(
                f"{store.url}: waiting up to {stale:g} s to tell whether the writer of {_names(watching)} is alive "
                f"(heartbeat advancing: a run overlapping this one) or dead (silent for stale_after = {stale:g} s: "
                "salvaged before the scan, so its rows are not encoded again)",
                file=sys.stderr,
            )
        deadline = time.monotonic() + stale + poll
        while watching and time.monotonic() < deadline:
            time.sleep(poll)
            for seg_id in sorted(watching):
                state = segment_state(store.loc, seg_id)
                if state == "active" and read_heartbeat(store.loc, seg_id) == first[seg_id]:
                    continue  # silent so far, not yet for stale_after
                watching.discard(seg_id)
                if state == "active":
                    live.append(seg_id)
                elif state in ("abandoned", "salvaging"):
                    dead.add(seg_id)
        live = sorted(live) + sorted(watching)
    if live and loud:
        print(
            f"warning: {store.url}: {_names(live)} {'is' if len(live) == 1 else 'are'} being written by another run "
            "(its writer is alive): texts it has in flight may be encoded twice, by it and by this run "
            "(duplicates are harmless: lookups use the first)",
            file=sys.stderr,
        )
    return dead


def _names(seg_ids: set[str] | list[str], most: int = 3) -> str:
    """'segment X', 'segments X, Y', or 'segments X, Y, Z and 4 more'."""
    names = sorted(seg_ids)
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"segment{'s' if len(names) > 1 else ''} {shown}"
