"""Segments after their writer: reading committed ones, telling live from abandoned, salvaging the dead.

A reader reads the chunk files of a local store directly (plain layout, see :mod:`storage.segment_format`)
and reads through zarr otherwise. An uncommitted segment is *active* while its writer holds the lock
(local) or beats its heartbeat (remote: a timer thread every few seconds, presumed dead after
``stale_after``, see :mod:`storage.heartbeat`), else *abandoned*: :func:`claim_and_salvage` commits the rows
its index describes, under the segment's claim (:mod:`storage.claim`), so that of any number of
processes recovering it exactly one acts. The writer lives in :mod:`storage.segment_writer`; its names
are re-exported here, so ``storage.segment`` stays the one import path for segments.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import time
from typing import Any, Literal

import google_crc32c
import numpy as np

from storage.claim import claim_held, flock_held, segment_claim
from storage.fs import Location
from storage.heartbeat import stale_after
from storage.segment_format import (
    SEGMENTS,
    IndexColumns,
    chunk_file,
    n_chunks,
    new_segment_id,
    read_index_bytes,
    read_parts,
    write_chunk,
    write_commit,
)
from storage.segment_reader import SegmentReader
from storage.segment_writer import SegmentWriter

__all__ = [
    "SEGMENTS",
    "IndexColumns",
    "SalvageResult",
    "SegmentReader",
    "SegmentWriter",
    "claim_and_salvage",
    "indexed_rows",
    "new_segment_id",
    "read_heartbeat",
    "read_index_bytes",
    "salvage_segment",
    "segment_state",
]


def segment_state(loc: Location, seg_id: str, *, force: bool = False) -> str:
    """'committed', 'active' (a live writer holds it), 'salvaging' (a process holds its claim),
    'abandoned' (its writer died; free to claim) or 'gone' (no such segment, or removed meanwhile).

    Every answer is read fresh from the store (no listing cache: :class:`storage.fs.Location`). A remote
    writer is alive while its heartbeat is younger than ``stale_after`` (:func:`storage.heartbeat.stale_after`).
    ``force`` presumes a remote writer dead whatever its heartbeat says (a writer known dead: ``ddx cache gc
    --force``); a local writer's flock is still obeyed, since the kernel holds it only for a live process.
    """
    if loc.exists(SEGMENTS, seg_id, "COMMIT"):
        return "committed"
    if not loc.isdir(SEGMENTS, seg_id):
        return "gone"
    if _writer_alive(loc, seg_id, force=force):
        return "active"
    return "salvaging" if claim_held(loc, seg_id) else "abandoned"


def _writer_alive(loc: Location, seg_id: str, *, force: bool = False) -> bool:
    """The writer's flock is held (local), or its heartbeat is fresh and not marked closed (remote)."""
    lock = loc.local_path(SEGMENTS, seg_id, ".lock")
    if lock is not None:
        held = flock_held(lock)
        return (not force and _just_created(loc, seg_id)) if held is None else held
    if force:
        return False
    try:
        beat = json.loads(loc.read_bytes(SEGMENTS, seg_id, "HEARTBEAT"))
        if beat.get("closed"):
            return False  # its writer aborted and said so
        return bool(time.time() - float(beat["time"]) < stale_after(loc))
    except (FileNotFoundError, KeyError, ValueError, TypeError, AttributeError):
        return _just_created(loc, seg_id)


def read_heartbeat(loc: Location, seg_id: str) -> dict[str, Any] | None:
    """A remote writer's last HEARTBEAT (``time`` on the writer's clock, ``rows`` flushed, ``pid``, ``closed``
    once it aborted), read fresh; None when there is none (a local segment, a writer not yet beating, a
    segment removed meanwhile) or it cannot be parsed. Two reads that differ mean the writer beat in between.
    """
    try:
        beat = json.loads(loc.read_bytes(SEGMENTS, seg_id, "HEARTBEAT"))
    except (FileNotFoundError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def _just_created(loc: Location, seg_id: str) -> bool:
    """True when the id's UTC stamp is younger than the heartbeat timeout.

    A writer creates its segment's group before it takes the lock and writes the first heartbeat;
    without this grace period a concurrent ``gc`` would delete a segment that is just starting.
    """
    try:
        started = calendar.timegm(time.strptime(seg_id[:15], "%Y%m%dT%H%M%S"))
    except ValueError:
        return False
    return time.time() - started < max(stale_after(loc), 2.0)  # the stamp has 1 s resolution


@dataclasses.dataclass(frozen=True)
class SalvageResult:
    """What :func:`claim_and_salvage` did to one segment.

    ``outcome``: 'salvaged' (this call committed ``rows`` rows), 'removed' (it held nothing; this call
    deleted it), 'busy' (another process holds its claim: wait, then ask again), 'done' (another process
    committed or removed it first), 'active' (its writer is alive) or 'damaged' (its index describes
    rows that cannot be read back; left in place, ``detail`` says why).
    """

    segment: str
    outcome: Literal["salvaged", "removed", "busy", "done", "active", "damaged"]
    rows: int = 0
    detail: str = ""


def claim_and_salvage(loc: Location, seg_id: str, *, force: bool = False) -> SalvageResult:
    """Salvage an abandoned segment under its claim: exactly one of any number of racing processes acts.

    The rows its index describes (``index.parquet`` when the segment lost only its COMMIT, else its
    index parts) are committed once every chunk holding them passes its checksum. Rows past the last
    part (written but never indexed) are dropped: the at-most-one-flush loss a crash costs. Only a
    segment that provably holds nothing (no index rows) is removed; one whose rows cannot all be
    verified is left untouched ('damaged') for a person to look at, and precompute encodes its texts
    again. Every step is safe to repeat, so when a salvager dies mid-way the next one finishes.

    An uncommitted *compaction* segment (:mod:`storage.compact`: made to replace committed segments, which it
    copies) is removed instead while every segment it copies is still committed: its rows are all there, and
    committing the copy would show each of them twice.

    ``force`` treats the segment's remote writer as dead whatever its heartbeat says (for a writer known
    dead, when waiting out ``stale_after`` is not wanted: ``ddx cache gc --force``); the claim, the checks
    and the outcome are the same. Forcing a writer that is in fact alive loses the rows it writes after: it stops at
    its next flush, finding the COMMIT, instead of rewriting files the COMMIT vouches for.

    Example:
        >>> claim_and_salvage(store.loc, seg_id)  # doctest: +SKIP
        SalvageResult(segment='2024...', outcome='salvaged', rows=120, detail='')
    """
    with segment_claim(loc, seg_id) as mine:
        state = segment_state(loc, seg_id, force=force)  # re-checked under the claim: another process may have finished
        if state in ("committed", "gone"):
            return SalvageResult(seg_id, "done")
        if state == "active":
            return SalvageResult(seg_id, "active")
        if not mine:
            return SalvageResult(seg_id, "busy")
        return _salvage_claimed(loc, seg_id)


def salvage_segment(loc: Location, seg_id: str, *, force: bool = False) -> int:
    """Rows this call committed of an abandoned segment (0: it held nothing, or another process acted).

    The older interface of :func:`claim_and_salvage`, which says what happened.
    """
    return claim_and_salvage(loc, seg_id, force=force).rows


def _salvage_claimed(loc: Location, seg_id: str) -> SalvageResult:
    """Commit exactly the rows the segment's index describes once each is verified, or touch nothing."""
    if _copies_committed_segments(loc, seg_id):
        loc.remove(SEGMENTS, seg_id)  # an unfinished compaction: every row it holds is still in its sources
        return SalvageResult(seg_id, "removed")
    try:
        index = _recorded_index(loc, seg_id)
    except Exception as exc:  # pyarrow raises several types for damaged parquet: all mean "unreadable"
        return _damaged(seg_id, f"its index cannot be read ({type(exc).__name__}: {exc})")
    n = len(index.rows)
    if n == 0:
        loc.remove(SEGMENTS, seg_id)  # provably holds nothing: no index rows anywhere
        return SalvageResult(seg_id, "removed")
    order = np.argsort(index.rows, kind="stable")
    if _first_gap(index.rows[order]) != n:  # parts follow their chunk writes: a crash never leaves a gap
        return _damaged(seg_id, f"its index does not describe rows 0..{n - 1} exactly once")
    try:
        array = _zarr_array(loc, seg_id)
    except Exception as exc:  # zarr raises several types for a missing or damaged array
        return _damaged(seg_id, f"its index describes {n} rows but vectors/ cannot be read ({exc})")
    if array.shape[0] < n:
        return _damaged(seg_id, f"its index describes {n} rows but vectors/ holds {array.shape[0]}")
    chunk_rows = int(array.chunks[0])
    row_bytes = int(array.shape[1]) * np.dtype(array.dtype).itemsize
    crcs = _checked_chunk_crcs(loc, seg_id, n, chunk_rows, row_bytes)
    if len(crcs) < n_chunks(n, chunk_rows):
        return _damaged(seg_id, f"chunk {len(crcs)} of vectors/ is missing or fails its checksum")
    if index.crcs is not None and n % chunk_rows:  # committed in the current format: the last chunk holds its rows
        crcs[-1] = _trim_last_chunk(loc, seg_id, n, chunk_rows, array)
    write_commit(loc, seg_id, index.take(order), crcs, chunk_rows, array, salvaged=True)
    return SalvageResult(seg_id, "salvaged", rows=n)


def _copies_committed_segments(loc: Location, seg_id: str) -> bool:
    """True for a compaction segment (group attribute ``replaces``) whose every source still there is committed.

    ``replaces`` also names segments an earlier compaction replaced (inherited: their rows are in one of this copy's
    committed sources), which gc may have removed since; a source of this copy is removed only after its COMMIT, so
    while the copy is uncommitted, a source that is gone was an inherited one.
    """
    try:
        attrs = json.loads(loc.read_bytes(SEGMENTS, seg_id, "zarr.json")).get("attributes", {}).get("ddx_segment", {})
    except (FileNotFoundError, ValueError, AttributeError):
        return False
    sources = attrs.get("replaces") if isinstance(attrs, dict) else None
    if not isinstance(sources, list) or not sources:
        return False
    if not all(isinstance(s, str) for s in sources):
        return False
    present = [s for s in sources if loc.isdir(SEGMENTS, s)]
    return bool(present) and all(loc.exists(SEGMENTS, s, "COMMIT") for s in present)


def _trim_last_chunk(loc: Location, seg_id: str, rows: int, chunk_rows: int, array: Any) -> int:
    """Rewrite the last chunk holding exactly its described rows (it may hold padding, or rows no part describes).

    Returns the CRC32C of its data. Idempotent: a salvager killed after this finds the chunk already trimmed.
    """
    last = n_chunks(rows, chunk_rows) - 1
    keep = rows - last * chunk_rows
    dim, dtype = int(array.shape[1]), np.dtype(array.dtype).newbyteorder("<")
    data = loc.read_bytes(*chunk_file(seg_id, last))
    if len(data) == keep * dim * dtype.itemsize + 4:
        return int(google_crc32c.value(data[:-4]))
    block = np.frombuffer(data, dtype=np.uint8)[:-4].view(dtype).reshape(-1, dim)[:keep]
    return write_chunk(loc, seg_id, last, block)


def indexed_rows(loc: Location, seg_id: str) -> int | None:
    """Rows an uncommitted segment's index describes (0: it provably holds nothing); None when unreadable."""
    try:
        return len(_recorded_index(loc, seg_id).rows)
    except Exception:  # pyarrow raises several types for damaged parquet: all mean "unreadable"
        return None


def _recorded_index(loc: Location, seg_id: str) -> IndexColumns:
    """index.parquet when present (a commit got that far), else the concatenated index parts."""
    try:
        return read_index_bytes(loc.read_bytes(SEGMENTS, seg_id, "index.parquet"))
    except FileNotFoundError:
        return IndexColumns.concat(read_parts(loc, seg_id))


def _first_gap(sorted_rows: np.ndarray) -> int:
    gaps = np.flatnonzero(sorted_rows != np.arange(len(sorted_rows)))
    return int(gaps[0]) if len(gaps) else len(sorted_rows)


def _checked_chunk_crcs(loc: Location, seg_id: str, rows: int, chunk_rows: int, row_bytes: int) -> list[int]:
    """CRC32C of each chunk holding rows 0..rows-1, up to the first bad one: its data matches its trailer, and it
    holds the rows described (a chunk before the last exactly ``chunk_rows``, the last at least its own)."""
    crcs = []
    chunks = n_chunks(rows, chunk_rows)
    for i in range(chunks):
        try:
            data = loc.read_bytes(*chunk_file(seg_id, i))
        except FileNotFoundError:
            break
        need = min(chunk_rows, rows - i * chunk_rows) * row_bytes
        if len(data) - 4 < need or (i < chunks - 1 and len(data) - 4 != need):
            break
        crc = int(google_crc32c.value(data[:-4]))
        if crc != int.from_bytes(data[-4:], "little"):
            break
        crcs.append(crc)
    return crcs


def _damaged(seg_id: str, why: str) -> SalvageResult:
    return SalvageResult(
        seg_id,
        "damaged",
        detail=f"Uncommitted segment {seg_id!r} was left in place: {why}. Run 'ddx cache verify' on the store.",
    )


def _zarr_array(loc: Location, seg_id: str) -> Any:
    """The segment's vector array (a ``zarr.Array``), opened for resizing."""
    import zarr

    return zarr.open_array(store=loc.zarr_store(), path=f"{SEGMENTS}/{seg_id}/vectors", mode="r+")
