"""``verify``: check every file a reader trusts, and report damage file by file instead of raising.

It reads the store's files afresh and needs no :meth:`TeacherStore.open` to succeed, so a store whose
root or one segment is damaged still gets a full report:

* root ``zarr.json``: a Zarr v3 group with ddx attributes; sealed (format 2); TeacherSpec fields
  known and typed; fingerprint recomputed from the spec; dim equal to the spec's;
* ``segments/``: every entry is a segment (a stray file, an empty or foreign directory is damage);
* each committed segment: ``COMMIT`` (fields, seal, dim/dtype against the root); ``vectors/zarr.json``
  (sha256 in COMMIT, shape, dtype, chunking); ``index.parquet`` (sha256 in COMMIT, rows 0..n-1 once,
  no key twice, row checksums present); every chunk file (size, CRC32C of its data against COMMIT and
  its own trailer); format 2: every row's CRC32C(key ‖ row), in chunks whose data checksum holds;
* each abandoned segment: its index parts parse and match their content checksums.

Problems read ``<file below the store root>: <what>``; checksums are always 8 hex digits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage import crc
from storage.errors import FormatVersionError, IntegrityError, StoreNotFoundError
from storage.fs import Location
from storage.keys import KEY_BYTES, repeated
from storage.metadata import (
    FORMAT_VERSION,
    Damage,
    commit_problems,
    commit_store_problems,
    parse_json,
    root_problems,
    seal_matches,
    vectors_meta_problems,
)
from storage.segment import SEGMENTS, SegmentReader, segment_state
from storage.segment_format import IndexColumns, read_parts
from storage.spec import TeacherSpec
from storage.store import TeacherStore

__all__ = ["VerifyReport", "verify_store"]

LOST_COMMIT = (
    "is missing, but index.parquet is there (the segment lost its COMMIT, or a run crashed between the two): "
    "its rows are invisible until the next precompute or 'ddx cache gc' salvages them"
)
_PART = re.compile(r"^part-(\d{6})\.parquet$")


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

    def damage(self, items: list[Damage]) -> None:
        self.problems.extend(str(d) for d in items)


def verify_store(
    store: TeacherStore | str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> VerifyReport:
    """Check every file of the store at ``store`` (an open store or its path/URL; ``storage_options`` for a URL).

    Raises:
        StoreNotFoundError: nothing there is a ddx store (no zarr.json and no segments/).
        FormatVersionError: a newer ddx wrote it (intact, sealed, a format this ddx cannot check).

    Example:
        >>> report = verify_store("stores/gte7b")  # doctest: +SKIP
        >>> report.ok, report.problems[:1]          # doctest: +SKIP
        (False, ['segments/2024.../vectors/c/3/0: chunk 3 checksum mismatch: ...'])
    """
    loc = store.loc if isinstance(store, TeacherStore) else Location(store, storage_options)
    report = VerifyReport()
    dim, dtype = _verify_root(loc, report)
    keys: dict[str, np.ndarray] = {}
    replaces: dict[str, list[str]] = {}
    names = loc.listdir(SEGMENTS)
    segs = [n for n in names if not n.startswith(".") and n != "zarr.json"]  # the group's own metadata, not a segment
    commits = {n: data for n in segs if (data := _commit_bytes(loc, n)) is not None}
    skipped = _replaced_by_sound_commits(commits)  # never read again: removed (maybe half) by compaction
    for name in names:
        if name in skipped:
            continue
        if name in commits:
            seg_keys = _verify_segment(loc, name, commits[name], dim, dtype, report, replaces)
            if seg_keys is not None:
                keys[name] = seg_keys
        else:
            _verify_other(loc, name, report)
    replaced = {old: new for new, olds in replaces.items() for old in olds if old in keys or old in skipped}
    for old, new in sorted(replaced.items()):
        report.notes.append(
            f"segment {old} is replaced by compacted segment {new} (readers skip it); "
            "'ddx cache compact' or 'ddx cache gc' removes it"
        )
    visible = [k for name, k in keys.items() if name not in replaced]
    if visible and not report.problems:
        stacked = np.concatenate(visible)
        duplicates = repeated(stacked)
        if duplicates:
            report.notes.append(
                f"{duplicates} rows repeat a key stored in an earlier segment (harmless: lookups use the first)"
            )
    return report


def _commit_bytes(loc: Location, seg_id: str) -> bytes | None:
    """The segment's COMMIT as stored; None when it has none (segments/zarr.json is listed beside the segments)."""
    try:
        return loc.read_bytes(SEGMENTS, seg_id, "COMMIT")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _replaced_by_sound_commits(commits: dict[str, bytes]) -> set[str]:
    """Segments that an intact COMMIT of another segment replaces: readers skip them, and a compaction killed while
    removing one (an object store deletes file by file) may have left any part of it, so their files are not
    checked (the replacing segment is, in full)."""
    out: set[str] = set()
    for name, data in commits.items():
        doc, _ = parse_json(data)
        if doc is not None and not commit_problems(doc, name) and isinstance(doc.get("replaces"), list):
            out |= {str(s) for s in doc["replaces"] if str(s) != name}
    return out & set(commits)


def _verify_root(loc: Location, report: VerifyReport) -> tuple[int | None, str | None]:
    """Check the root zarr.json; returns the store's (dim, dtype) where they can be trusted."""
    if loc.isfile():
        raise StoreNotFoundError(f"{loc.url!r} is a file, not a teacher store directory. Pass the store's folder.")
    if not loc.exists("zarr.json"):
        if not loc.isdir(SEGMENTS):
            raise StoreNotFoundError(
                f"No teacher store at {loc.url!r} (zarr.json missing). "
                f"Run 'ddx precompute-teacher --store {loc.url} ...' first."
            )
        report.damage([Damage("zarr.json", "is missing (the store's root metadata: teacher spec, dim, dtype)")])
        return None, None
    doc, why = parse_json(loc.read_bytes("zarr.json"))
    if doc is None:
        report.damage([Damage("zarr.json", str(why))])
        return None, None
    attrs = doc.get("attributes", {}).get("ddx") if isinstance(doc.get("attributes"), dict) else None
    if not isinstance(attrs, dict):
        report.damage([Damage("zarr.json", "has no 'ddx' attributes (not a ddx store, or a changed byte)")])
        return None, None
    version = attrs.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION and seal_matches(attrs):
        raise FormatVersionError(
            f"Store {loc.url!r} has format version {version}; this ddx checks versions up to {FORMAT_VERSION}. "
            "Upgrade ddx (pip install -U ddx) to verify it."
        )
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        report.damage([Damage("zarr.json", f"format_version {version!r} is not one of 1..{FORMAT_VERSION}")])
    problems = root_problems(doc)
    report.damage(problems)
    spec_ok = not any(p.what.startswith(("teacher_spec", "its content")) for p in problems)
    dim = TeacherSpec.from_dict(attrs["teacher_spec"]).dim if spec_ok else None
    dtype = attrs.get("storage_dtype") if not any("storage_dtype" in p.what for p in problems) else None
    return dim, dtype


def _verify_segment(
    loc: Location,
    seg_id: str,
    commit: bytes,
    dim: int | None,
    dtype: str | None,
    report: VerifyReport,
    replaces: dict[str, list[str]],
) -> np.ndarray | None:
    """Check one committed segment (``commit``: its COMMIT's bytes); returns its keys (for the duplicate count) when
    its index is sound, and records the segments its COMMIT replaces (a compaction) in ``replaces``."""
    base = f"{SEGMENTS}/{seg_id}"
    report.segments += 1
    doc, why = parse_json(commit)
    if doc is None:
        report.damage([Damage(f"{base}/COMMIT", str(why))])
        return None
    problems = commit_problems(doc, f"{base}/COMMIT")
    if problems:
        report.damage(problems)
        return None
    report.damage(commit_store_problems(doc, f"{base}/COMMIT", dim=dim, dtype=dtype))
    if isinstance(doc.get("replaces"), list):
        replaces[seg_id] = [str(s) for s in doc["replaces"]]
    report.rows += doc["rows"]
    report.chunks += len(doc["chunk_crc32c"])
    try:
        meta = loc.read_bytes(SEGMENTS, seg_id, "vectors", "zarr.json")
    except FileNotFoundError:
        report.damage([Damage(f"{base}/vectors/zarr.json", "is missing")])
        return None
    meta_problems = vectors_meta_problems(meta, doc, f"{base}/vectors/zarr.json", dim=dim, dtype=dtype)
    report.damage(meta_problems)
    if meta_problems:
        return None
    seg = SegmentReader(loc, seg_id)  # compared with the store's dim/dtype above; its data is checked on its own
    try:
        return _verify_data(seg, report)
    finally:
        seg.close()


def _verify_data(seg: SegmentReader, report: VerifyReport) -> np.ndarray | None:
    """The index, then every chunk, then (format 2) every row: one CRC32C pass over each chunk's bytes.

    Each chunk file is read once, sequentially, into a reused buffer while a thread reads the next one
    (:meth:`SegmentReader.read_chunks`, as scans do), so RSS stays at a few chunks plus the segment's
    index. The CRC32C of each row's bytes is taken once; the chunk's CRC and every row's CRC32C(key ‖ row)
    are derived from those (:mod:`storage.crc`), instead of a second pass over the bytes.
    """
    try:
        cols = seg.index()
    except IntegrityError as exc:
        report.problems.append(str(exc.damage) if exc.damage is not None else str(exc))
        cols = None
    if cols is not None and repeated(cols.keys):
        report.damage([Damage(seg.file("index.parquet"), "holds a key twice")])
    rows = None
    if cols is not None and cols.crcs is not None:
        by_row = np.empty(seg.rows, dtype=np.int64)
        by_row[cols.rows] = np.arange(seg.rows)
        rows = cols.take(by_row)  # in row order, once per segment
    for c, data in seg.read_chunks():
        file = seg.file("vectors", "c", str(c), "0")
        if data is None:
            report.damage([Damage(file, "is missing")])
        elif (problem := seg.size_problem(c, len(data))) is not None:
            report.damage([Damage(file, problem)])
        else:
            report.damage(_chunk_problems(seg, c, rows, data, file))
        del data
    return None if cols is None else cols.keys


def _chunk_problems(seg: SegmentReader, c: int, rows: IndexColumns | None, data: np.ndarray, file: str) -> list[Damage]:
    """Chunk ``c``'s CRC (against COMMIT and its trailer), then its rows' CRC32C(key ‖ row) from the index."""
    row_bytes = seg.dim * seg.dtype.itemsize
    per_row = crc.piece_crcs(data[:-4].reshape(seg.rows_in(c), row_bytes))
    if (problem := seg.crc_problem(c, crc.concat_crc(per_row, row_bytes), data)) is not None:
        return [Damage(file, problem)]  # the rows are not checked against a chunk that is wrong as a whole
    if rows is None:
        return []
    assert rows.crcs is not None
    lo, hi = c * seg.chunk_rows, min((c + 1) * seg.chunk_rows, seg.rows)
    seeds = crc.piece_crcs(np.ascontiguousarray(rows.keys[lo:hi]).view(np.uint8).reshape(-1, KEY_BYTES))
    bad = np.flatnonzero((crc.shift(seeds, row_bytes) ^ per_row[: hi - lo]) != rows.crcs[lo:hi])
    if not len(bad):
        return []
    listed = ", ".join(str(lo + int(b)) for b in bad[:5]) + (", ..." if len(bad) > 5 else "")
    what = f"{len(bad)} row(s) do not match their CRC32C(key ‖ row) from index.parquet (rows {listed})"
    return [Damage(file, what)]


def _verify_other(loc: Location, name: str, report: VerifyReport) -> None:
    """An entry of segments/ without COMMIT: the group's own zarr.json, a segment being written or left, or junk."""
    path = f"{SEGMENTS}/{name}"
    if name == "zarr.json":
        doc, why = parse_json(loc.read_bytes(SEGMENTS, name))
        if doc is None or doc.get("node_type") != "group":
            report.damage([Damage(path, why or "is not a Zarr group's metadata")])
        return
    if name.startswith("."):
        report.notes.append(f"{path} is left over from an interrupted removal; 'ddx cache gc' deletes it")
        return
    if not loc.isdir(SEGMENTS, name):
        report.damage([Damage(path, "is a file that belongs to no segment (foreign); remove it")])
        return
    state = segment_state(loc, name)
    if state in ("committed", "gone"):  # committed or removed by another process while this looked
        return
    if state == "abandoned" and not loc.exists(SEGMENTS, name, "zarr.json"):
        what = "an empty directory" if not loc.listdir(SEGMENTS, name) else "a directory that is not a segment"
        report.damage([Damage(path, f"is {what} (foreign); 'ddx cache gc' removes it")])
        return
    if state == "abandoned" and loc.exists(SEGMENTS, name, "index.parquet"):
        report.damage([Damage(f"{path}/COMMIT", LOST_COMMIT)])
        return
    if state == "abandoned":
        report.damage(_part_problems(loc, name))
    what = {
        "active": "a writer is still running",
        "salvaging": "another process is salvaging it now",
    }.get(state, "left by a crashed run; the next precompute or 'ddx cache gc' salvages its rows")
    report.notes.append(f"segment {name} is uncommitted ({what})")


def _part_problems(loc: Location, seg_id: str) -> list[Damage]:
    """Index parts of an abandoned segment: numbered without gaps, each intact, covering the rows HEARTBEAT says."""
    base = f"{SEGMENTS}/{seg_id}/parts"
    numbers = {int(m.group(1)) for n in loc.listdir(SEGMENTS, seg_id, "parts") if (m := _PART.match(n))}
    gaps = sorted(set(range(max(numbers, default=-1) + 1)) - numbers)
    out = [Damage(f"{base}/part-{g:06d}.parquet", "is missing (later parts exist)") for g in gaps]
    try:
        parts = read_parts(loc, seg_id)
    except IntegrityError as exc:
        return [*out, exc.damage if isinstance(exc.damage, Damage) else Damage(base, str(exc))]
    rows = np.sort(np.concatenate([p.rows for p in parts])) if parts else np.empty(0, np.int64)
    covered = int(np.flatnonzero(np.append(rows != np.arange(len(rows)), True))[0])
    try:
        flushed = int(json.loads(loc.read_bytes(SEGMENTS, seg_id, "HEARTBEAT"))["rows"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return out  # no heartbeat to compare with (the writer never flushed)
    if covered < flushed and not gaps:
        out.append(Damage(base, f"cover rows 0..{covered - 1}, but HEARTBEAT records {flushed} flushed rows"))
    return out
