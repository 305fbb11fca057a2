"""Looking after a store: what is in it (info), is it intact (verify), and cleaning up (gc).

``verify_store`` lives in :mod:`storage.verify` (it checks every file) and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from storage.compact import remove_replaced
from storage.keys import ROLES
from storage.segment import SEGMENTS, SegmentReader, claim_and_salvage, indexed_rows, segment_state
from storage.segment_format import role_counts
from storage.store import TeacherStore
from storage.verify import VerifyReport, verify_store

__all__ = ["VerifyReport", "gc_store", "store_info", "verify_store"]


def store_info(store: TeacherStore, *, duplicates: bool = False) -> dict[str, Any]:
    """Everything ``ddx cache ls/info`` shows: spec, totals per role, and one row per segment.

    Reads the COMMIT manifests only (O(segments): no key index is loaded), except for segments an
    older ddx committed without per-role counts, whose index is read for them. ``keys`` (distinct
    keys) and ``duplicate_rows`` need every key: they are None unless ``duplicates`` asks for them.
    """
    segments = [_segment_info(store, seg) for seg in store.segments]
    index = store.index if duplicates else None
    return {
        "store": store.url,
        "format_version": store.format_version,
        "fingerprint": store.fingerprint,
        "teacher_spec": store.spec.to_dict(),
        "dim": store.dim,
        "storage_dtype": store.dtype,
        "keys": None if index is None else len(index),
        "rows": store.rows,
        "duplicate_rows": None if index is None else index.duplicates,
        "roles": _role_totals(segments)
        if index is None
        else {r: int((index.roles == i).sum()) for i, r in enumerate(ROLES)},
        "bytes": sum(s["bytes"] for s in segments),
        "segments": segments,
        "uncommitted": [{"id": s, "state": state} for s, state in store.uncommitted_segments()],
        "replaced": list(store.replaced),  # a compaction was killed before removing them: readers skip them
    }


def _role_totals(segments: list[dict[str, Any]]) -> dict[str, int]:
    return {r: sum(s["roles"][r] for s in segments) for r in ROLES}


def _segment_info(store: TeacherStore, seg: SegmentReader) -> dict[str, Any]:
    roles = seg.commit.get("roles")
    if not isinstance(roles, dict) or not all(type(roles.get(r)) is int for r in ROLES):  # older COMMIT
        roles = role_counts(seg.index().roles)
    return {
        "id": seg.seg_id,
        "rows": seg.rows,
        "chunks": seg.n_chunks,
        "chunk_rows": seg.chunk_rows,
        "roles": {r: int(roles[r]) for r in ROLES},
        "bytes": store.loc.size(SEGMENTS, seg.seg_id),
        "committed_at": seg.commit.get("committed_at"),
        "salvaged": bool(seg.commit.get("salvaged")),
    }


def gc_store(
    store: TeacherStore, *, dry_run: bool = False, force: bool | Collection[str] = False
) -> list[dict[str, Any]]:
    """Clean up after crashed runs without ever deleting a row that could be kept.

    An abandoned segment whose index describes rows is salvaged (committed, as the next precompute
    would), one that provably holds nothing is removed, each under the segment's claim
    (:func:`storage.segment.claim_and_salvage`); committed and running segments are left alone, and so is
    a damaged one (reported, for a person to look at). Leftovers of an interrupted removal (hidden
    ``*.removing`` copies, see :meth:`Location.remove`) are deleted too, and so are segments a committed
    compaction replaces but did not get to remove (readers already skip them: :mod:`storage.compact`).

    ``force`` (``ddx cache gc --force``): segments whose writer is known dead but still counts as alive
    (a remote writer's heartbeat is younger than ``stale_after``) are treated as abandoned: ``True`` for
    every uncommitted segment, or a collection of segment ids. A local writer's flock is still obeyed (the
    kernel holds it only for a live process). Forcing a writer that is in fact alive loses what it writes after
    (it stops at its next flush, finding the COMMIT).

    Returns one entry per segment acted on (with ``dry_run``: that would be): ``id``, ``bytes`` and
    ``action`` — 'removed'; 'salvaged' with the ``rows`` kept; or 'damaged' with ``detail`` (left in place).
    """
    done: list[dict[str, Any]] = []
    for seg_id, state in store.uncommitted_segments():
        forced = force is True or (not isinstance(force, bool) and seg_id in force)
        if forced and state == "active":
            state = segment_state(store.loc, seg_id, force=True)  # 'active' still when a local flock is held
        if state != "abandoned":
            continue
        entry: dict[str, Any] = {"id": seg_id, "bytes": store.loc.size(SEGMENTS, seg_id)}
        if dry_run:
            rows = indexed_rows(store.loc, seg_id)
            action = {None: "damaged", 0: "removed"}.get(rows, "salvaged")
            done.append({**entry, "action": action, "rows": rows or 0})
            continue
        result = claim_and_salvage(store.loc, seg_id, force=forced)
        if result.outcome in ("removed", "salvaged", "damaged"):
            done.append({**entry, "action": result.outcome, "rows": result.rows, "detail": result.detail})
    sizes = {seg_id: store.loc.size(SEGMENTS, seg_id) for seg_id in store.replaced}  # a compaction killed before
    for seg_id in list(sizes) if dry_run else remove_replaced(store):  # removing the segments it replaced
        done.append({"id": seg_id, "bytes": sizes.get(seg_id, 0), "action": "removed", "rows": 0})
    for parts in _interrupted_removals(store):
        done.append({"id": "/".join(parts[1:]), "bytes": store.loc.size(*parts), "action": "removed"})
        if not dry_run:
            store.loc.remove(*parts)
    if not dry_run:
        store.refresh()  # salvaged segments are committed now
    return done


def _interrupted_removals(store: TeacherStore) -> list[tuple[str, ...]]:
    """Hidden copies a crash left mid-way through a removal: whole segments, or a committed segment's parts/."""
    found: list[tuple[str, ...]] = []
    for name in store.loc.listdir(SEGMENTS):
        if _is_removing(name):
            found.append((SEGMENTS, name))
        elif not name.startswith(".") and store.loc.isdir(SEGMENTS, name):
            found += [(SEGMENTS, name, n) for n in store.loc.listdir(SEGMENTS, name) if _is_removing(n)]
    return found


def _is_removing(name: str) -> bool:
    return name.startswith(".") and name.endswith(".removing")
