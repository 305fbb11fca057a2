"""Looking after a store: what is in it (info), is it intact (verify), and cleaning up (gc)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.keys import ROLES
from storage.segment import SEGMENTS, SegmentReader, read_index_bytes
from storage.store import TeacherStore

__all__ = ["VerifyReport", "gc_store", "store_info", "verify_store"]


def store_info(store: TeacherStore) -> dict[str, Any]:
    """Everything ``ddx cache ls/info`` shows: spec, totals per role, and one row per segment."""
    segments = []
    for seg in store.segments:
        roles = seg.index().roles
        segments.append(
            {
                "id": seg.seg_id,
                "rows": seg.rows,
                "chunks": seg.n_chunks,
                "chunk_rows": seg.chunk_rows,
                "roles": {r: int((roles == i).sum()) for i, r in enumerate(ROLES)},
                "bytes": store.loc.size(SEGMENTS, seg.seg_id),
                "committed_at": seg.commit.get("committed_at"),
                "salvaged": bool(seg.commit.get("salvaged")),
            }
        )
    index = store.index
    return {
        "store": store.url,
        "format_version": store.format_version,
        "fingerprint": store.fingerprint,
        "teacher_spec": store.spec.to_dict(),
        "dim": store.dim,
        "storage_dtype": store.dtype,
        "keys": len(index),
        "rows": store.rows,
        "duplicate_rows": index.duplicates,
        "roles": {r: int((index.roles == i).sum()) for i, r in enumerate(ROLES)},
        "bytes": sum(s["bytes"] for s in segments),
        "segments": segments,
        "uncommitted": [{"id": s, "state": state} for s, state in store.uncommitted_segments()],
    }


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: ``problems`` is empty when the store is intact."""

    segments: int = 0
    rows: int = 0
    chunks: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "segments": self.segments,
            "rows": self.rows,
            "chunks": self.chunks,
            "problems": self.problems,
            "notes": self.notes,
        }


def verify_store(store: TeacherStore) -> VerifyReport:
    """Check every committed segment: COMMIT, index checksum and rows, array shape, chunk checksums."""
    report = VerifyReport()
    for seg in store.segments:
        report.segments += 1
        report.rows += seg.rows
        report.chunks += seg.n_chunks
        report.problems.extend(f"segment {seg.seg_id}: {p}" for p in _verify_segment(store, seg))
    for seg_id, state in store.uncommitted_segments():
        what = (
            "a writer is still running"
            if state == "active"
            else "left by a crashed run; the next precompute salvages it, 'ddx cache gc' removes it"
        )
        report.notes.append(f"segment {seg_id} is uncommitted ({what})")
    if store.segments and not report.problems and store.index.duplicates:  # a damaged index may not load
        report.notes.append(
            f"{store.index.duplicates} rows repeat a key stored in an earlier segment (harmless: lookups use the first)"
        )
    return report


def _verify_segment(store: TeacherStore, seg: SegmentReader) -> list[str]:
    problems = []
    try:
        data = store.loc.read_bytes(SEGMENTS, seg.seg_id, "index.parquet")
    except FileNotFoundError:
        return ["index.parquet is missing"]
    if hashlib.sha256(data).hexdigest() != seg.commit.get("index_sha256"):
        problems.append("index.parquet does not match the checksum in COMMIT")
    try:
        cols = read_index_bytes(data)
    except Exception as exc:  # any parse failure is damage to report
        return [*problems, f"index.parquet is unreadable ({exc})"]
    if len(cols.rows) != seg.rows or not np.array_equal(np.sort(cols.rows), np.arange(seg.rows)):
        problems.append(f"index covers {len(cols.rows)} rows, not rows 0..{seg.rows - 1} exactly once")
    if len(np.unique(cols.keys)) != len(cols.keys):
        problems.append("index holds a key twice")
    meta = json.loads(store.loc.read_bytes(SEGMENTS, seg.seg_id, "vectors", "zarr.json"))
    if list(meta["shape"]) != [seg.rows, store.dim]:
        problems.append(f"vector array shape {meta['shape']} != ({seg.rows}, {store.dim})")
    if meta["data_type"] != store.dtype:
        problems.append(f"vector dtype {meta['data_type']} != store dtype {store.dtype}")
    problems.extend(p for c in range(seg.n_chunks) if (p := seg.verify_chunk(c)))
    return problems


def gc_store(store: TeacherStore, *, dry_run: bool = False) -> list[dict[str, Any]]:
    """Remove segments abandoned by crashed runs (never a committed or a running one).

    Returns what was (or, with ``dry_run``, would be) removed: segment id and bytes.
    """
    removed = []
    for seg_id, state in store.uncommitted_segments():
        if state != "abandoned":
            continue
        removed.append({"id": seg_id, "bytes": store.loc.size(SEGMENTS, seg_id)})
        if not dry_run:
            store.loc.remove(SEGMENTS, seg_id)
    return removed
