"""``ddx cache compact``: merge many small committed segments into fewer large ones, crash-safe.

Opening a store reads every segment's COMMIT and ``vectors/zarr.json``, and a lookup table is built from every
segment's index, so the cost of opening grows with the number of segments: a Ray precompute writes one segment
per unit of work (:mod:`precompute.ray_engine`), thousands for a large corpus (two small reads each: seconds on
S3). Compaction copies the rows of a group of small segments into one new segment and then removes them.

Order of a compaction, each step safe to kill:

1. **claim** every source segment (:func:`storage.claim.segment_claim`: of two compactions, or a compaction and a
   ``gc``, only one acts on a segment); re-check under the claims that each is still committed and not replaced;
2. **copy** into a new segment created with the attribute ``replaces`` (its sources). Every source row is checked
   as it is read (:func:`storage.store.scan_segment`) and a key is copied once (the first, in segment id order, as
   readers resolve it). Killed here, the new segment is uncommitted and its sources untouched; salvage (the next
   compaction, ``gc`` or precompute) *removes* an uncommitted segment that copies committed ones, never commits it;
3. **commit** it: COMMIT records ``replaces``, and readers skip every segment a committed COMMIT replaces
   (:meth:`storage.store.TeacherStore.refresh`). This one write is the switch: before it readers see the sources,
   after it the copy, never both, so no key is seen twice even while the sources are still there;
4. **remove** the sources (each under its claim). Killed here, the leftovers are invisible to readers and the next
   compaction (or ``gc``) removes them first.

A reader that opened the store before a compaction keeps the old list of segments; once the sources are removed its
gathers fail with a one-line error naming a missing file (reopen the store). Run compaction between jobs, not under a
running training.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.claim import segment_claim
from storage.keys import KeySet
from storage.segment import SEGMENTS, SegmentReader, SegmentWriter, claim_and_salvage
from storage.store import TeacherStore, default_chunk_rows, scan_segment

__all__ = ["COMPACT_TARGET_BYTES", "CompactReport", "compact_store", "default_target_rows", "remove_replaced"]

# Segments are merged up to ~2 GiB of vectors (~292 k rows at 3584-d fp16): a segment costs the same to open
# whatever its size, and a compaction killed mid-way copies at most this much again.
COMPACT_TARGET_BYTES = 2 << 30


@dataclass
class CompactReport:
    """What :func:`compact_store` did (with ``dry_run``: would do); ``to_dict`` is ``--json``'s output."""

    segments_before: int = 0
    segments_after: int = 0
    merged: list[dict[str, Any]] = field(default_factory=list)  # new segment, sources, rows, duplicate rows dropped
    removed: list[str] = field(default_factory=list)  # replaced segments removed (this run's and earlier runs')
    skipped: list[str] = field(default_factory=list)  # sources another process held: left for the next run
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "segments_before": self.segments_before,
            "segments_after": self.segments_after,
            "merged": self.merged,
            "removed": self.removed,
            "skipped": self.skipped,
        }


def default_target_rows(dim: int, dtype: str) -> int:
    """Rows of a compacted segment: :data:`COMPACT_TARGET_BYTES` of vectors, in whole default chunks."""
    chunk = default_chunk_rows(dim, dtype)
    rows = COMPACT_TARGET_BYTES // (dim * np.dtype(dtype).itemsize)
    return max(chunk, rows // chunk * chunk)


def compact_store(store: TeacherStore, *, target_rows: int | None = None, dry_run: bool = False) -> CompactReport:
    """Merge the store's committed segments smaller than ``target_rows`` into segments of up to that many rows.

    Leftovers of an interrupted compaction are cleaned up first (replaced segments removed, an uncommitted copy
    removed). Segments are grouped in id order; a group of one is left as it is. See the module docstring for
    why a kill at any point loses nothing and shows no key twice.

    Args:
        store: an open store (refreshed on return).
        target_rows: most rows of a merged segment (default: :func:`default_target_rows`, ~2 GiB of vectors).
        dry_run: only report the groups that would be merged.

    Returns:
        What was merged and removed.

    Raises:
        ValueError: ``target_rows`` is not positive.
        IntegrityError: a source row fails its checksum (nothing is committed; the copy is removed).

    Example:
        >>> report = compact_store(TeacherStore.open("stores/gte7b"))  # doctest: +SKIP
        >>> report.segments_before, report.segments_after               # doctest: +SKIP
        (512, 3)
    """
    target = default_target_rows(store.dim, store.dtype) if target_rows is None else int(target_rows)
    if target <= 0:
        raise ValueError(f"target_rows must be positive, got {target_rows}.")
    report = CompactReport(dry_run=dry_run)
    store.refresh()
    if not dry_run:
        report.removed += remove_replaced(store)
        _remove_unfinished_copies(store)
    report.segments_before = len(store.segments)
    for group in _groups(store.segments, target):
        ids = [seg.seg_id for seg in group]
        if dry_run:
            report.merged.append({"segment": None, "sources": ids, "rows": sum(s.rows for s in group)})
            continue
        done = _merge(store, ids)
        if done is None:
            report.skipped += ids
        else:
            report.merged.append(done)
            report.removed += ids
    if not dry_run:
        store.refresh()
    merged_away = sum(len(m["sources"]) - 1 for m in report.merged)
    report.segments_after = len(store.segments) if not dry_run else report.segments_before - merged_away
    return report


def remove_replaced(store: TeacherStore) -> list[str]:
    """Remove the segments a committed compaction replaces that are still there (a compaction killed before
    removing them); each under its claim. Readers already skip them. Returns the ids removed."""
    store.refresh()
    removed = []
    for seg_id in store.replaced:
        with segment_claim(store.loc, seg_id) as mine:
            if mine:
                store.loc.remove(SEGMENTS, seg_id)
                removed.append(seg_id)
    if removed:
        store.refresh()
    return removed


def _remove_unfinished_copies(store: TeacherStore) -> None:
    """Abandoned uncommitted compaction segments: their salvage removes them (their sources hold every row)."""
    for seg_id, state in store.uncommitted_segments():
        if state == "abandoned" and _replaces_attr(store, seg_id):
            claim_and_salvage(store.loc, seg_id)


def _replaces_attr(store: TeacherStore, seg_id: str) -> list[str]:
    try:
        doc = json.loads(store.loc.read_bytes(SEGMENTS, seg_id, "zarr.json"))
        value = doc["attributes"]["ddx_segment"].get("replaces")
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [str(s) for s in value] if isinstance(value, list) else []


def copy_id(first: str) -> str:
    """The id of a copy of adjacent segments starting at ``first``: it sorts right after ``first`` and before every
    segment after it (a later id differs from ``first`` within ``first``'s length, unless it is ``first`` plus a
    suffix: a copy of it), so readers resolve each key to the same row as before the compaction. The suffix keeps
    ``precompute.recovery``'s rank pattern from matching: a copy is no rank's."""
    return f"{first}-c{uuid.uuid4().hex[:6]}"


def _groups(segments: list[SegmentReader], target: int) -> list[list[SegmentReader]]:
    """Runs of adjacent (in id order) segments smaller than ``target`` rows, packed into groups of at most
    ``target`` rows; groups of one are dropped (nothing to merge). A segment left alone ends the run: a copy of
    the segments on both sides of it would move the later ones' rows ahead of it, and a key stored in both would
    then resolve to another row (readers take the first segment in id order)."""
    groups: list[list[SegmentReader]] = [[]]
    for seg in sorted(segments, key=lambda s: s.seg_id):
        if seg.rows >= target:
            groups.append([])
            continue
        if sum(s.rows for s in groups[-1]) + seg.rows > target:
            groups.append([])
        groups[-1].append(seg)
    return [g for g in groups if len(g) > 1]


def _merge(store: TeacherStore, ids: list[str]) -> dict[str, Any] | None:
    """Copy the segments ``ids`` into one new segment, commit it, remove them; None when one is held elsewhere."""
    with contextlib.ExitStack() as claims:
        if not all(claims.enter_context(segment_claim(store.loc, seg_id)) for seg_id in ids):
            return None
        store.refresh()  # under the claims: each source is still committed and not replaced by another compaction
        current = {seg.seg_id: seg for seg in store.segments}
        if not all(seg_id in current for seg_id in ids):
            return None
        sources = [current[seg_id] for seg_id in ids]
        inherited = [r for seg in sources for r in seg.replaces if store.loc.isdir(SEGMENTS, r)]
        new_id, rows, dropped = _copy(store, sources, replaces=ids + inherited)
        for seg_id in ids + inherited:
            store.loc.remove(SEGMENTS, seg_id)
    return {"segment": new_id, "sources": ids, "rows": rows, "duplicates_dropped": dropped}


def _copy(store: TeacherStore, sources: list[SegmentReader], *, replaces: list[str]) -> tuple[str, int, int]:
    """Write every source row (each key once) into a new segment and commit it; (its id, rows, rows dropped)."""
    writer = SegmentWriter.create(
        store.loc,
        seg_id=copy_id(sources[0].seg_id),
        dim=store.dim,
        dtype=store.dtype,
        chunk_rows=default_chunk_rows(store.dim, store.dtype),
        flush_seconds=3600.0,  # a copy killed mid-way is removed, never salvaged: no partial flushes needed
        replaces=replaces,
    )
    seen, dropped = KeySet(), 0
    try:
        for seg in sources:
            for cols, vecs in scan_segment(seg):
                first = seen.add_new(cols.keys)  # a key in two sources: the first, as readers resolve it
                dropped += int((~first).sum())
                writer.append(cols.keys[first], vecs[first], cols.roles[first], cols.n_tokens[first])
        rows = writer.commit()
    except BaseException:
        writer.abort()
        with contextlib.suppress(OSError):
            store.loc.remove(SEGMENTS, writer.seg_id)  # the sources are untouched: nothing of this copy is needed
        raise
    return writer.seg_id, rows, dropped
