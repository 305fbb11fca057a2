"""``ddx cache compact``: many small segments merged into few, each key once; a SIGKILL at any point loses nothing
and never shows a key twice; local stores and S3 (moto's server, tests/storage/s3.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from storage import IntegrityError, TeacherStore, compact_store, gc_store, store_info, verify_store
from storage.compact import copy_id, remove_replaced
from storage.segment import SegmentReader, claim_and_salvage
from storage.segment_writer import SegmentWriter
from tests.storage.rows import Rows, make_rows, make_spec, write_rows
from tests.storage.s3 import S3

DIM = 16
REPO = Path(__file__).resolve().parents[2]


def small_segments(store: TeacherStore, sizes: list[int], *, overlap: int = 0, prefix: str = "text") -> Rows:
    """One segment per size (chunks of 4 rows); each after the first repeats ``overlap`` rows of the one before."""
    parts, start = [], 0
    for i, n in enumerate(sizes):
        begin = max(0, start - overlap) if i else 0
        rows = make_rows(n, DIM, start=begin, prefix=prefix)
        write_rows(store, rows, chunk_rows=4)
        parts.append(rows)
        start = begin + n
    keys = np.concatenate([p.keys for p in parts])
    first = np.unique(keys, return_index=True)[1]
    merged = Rows(*(np.concatenate(c)[np.sort(first)] for c in zip(*(p.args() for p in parts), strict=True)))
    return merged


def assert_each_key_once(store: TeacherStore, rows: Rows) -> None:
    """A fresh reader sees every key, and each exactly once (no row repeated across visible segments)."""
    fresh = TeacherStore.open(store.url, storage_options=store.loc.storage_options)
    assert fresh.rows == len(rows) and len(fresh) == len(rows) and fresh.index.duplicates == 0
    np.testing.assert_array_equal(fresh.get(rows.keys), rows.vectors)
    report = verify_store(fresh)
    assert report.ok, report.problems
    assert not any("repeat a key" in n for n in report.notes), report.notes


def test_compact_merges_small_segments_and_keeps_every_key_once(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    big = make_rows(40, DIM, prefix="big")
    with SegmentWriter.create(store.loc, seg_id="20000101T000000-big", dim=DIM, dtype=store.dtype, chunk_rows=8) as w:
        w.append(*big.args())  # at or above the target: left alone; first in id order, so it splits no run
    rows = small_segments(store, [5, 7, 3, 9, 6, 2], overlap=2)  # 10 rows repeated across segments
    all_rows = Rows(*(np.concatenate(c) for c in zip(big.args(), rows.args(), strict=True)))
    store.refresh()
    assert len(store.segments) == 7 and store.index.duplicates == 10
    plan = compact_store(store, target_rows=20, dry_run=True)
    groups = [m["rows"] for m in plan.merged]  # segments in id order (ids of one second sort at random)
    assert sum(groups) == 32 and max(groups) <= 20 and len(plan.merged) == 2 and plan.segments_after == 3
    assert len(TeacherStore.open(store.url).segments) == 7  # a dry run changes nothing
    report = compact_store(store, target_rows=20)
    assert (report.segments_before, report.segments_after) == (7, 3) and len(report.removed) == 6
    assert sorted(p.name for p in Path(store.url, "segments").iterdir() if p.is_dir()) == sorted(
        s.seg_id for s in store.segments
    )  # the sources are gone, nothing is left over
    # A key repeated within a group is copied once; one repeated across the two groups stays repeated (harmless:
    # lookups use the first): a compaction drops a row only where the segment it writes holds the key already.
    dropped = sum(m["duplicates_dropped"] for m in report.merged)
    assert dropped > 0 and store.index.duplicates == 10 - dropped
    assert len(store) == len(all_rows) and store.rows == len(all_rows) + store.index.duplicates
    np.testing.assert_array_equal(store.get(all_rows.keys), all_rows.vectors)
    assert verify_store(store).ok
    merged = [s for s in store.segments if s.replaces]
    assert [s.format_version for s in merged] == [3, 3] and sum(len(s.replaces) for s in merged) == 6
    again = compact_store(store, target_rows=20)
    assert again.merged == [] and again.segments_after == 3  # nothing left to merge


def test_compact_on_s3(s3: S3) -> None:
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    rows = small_segments(store, [6, 5, 4], overlap=1)
    report = compact_store(TeacherStore.open(url, storage_options=s3.storage_options))
    assert (report.segments_before, report.segments_after) == (3, 1) and report.merged[0]["rows"] == 13
    fs = s3.filesystem()
    assert len([p for p in fs.ls(f"{url}/segments") if not p.endswith("zarr.json")]) == 1  # sources removed
    assert_each_key_once(store, rows)


CHILD = """
import os, signal, sys
from storage import compact, fs, segment_writer
from storage.store import TeacherStore

url, point, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
compact.default_chunk_rows = lambda dim, dtype: 4  # the copy flushes chunks and index parts as it goes


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "copying":  # mid-copy: chunks and parts of the new segment are on disk, no COMMIT
    append, calls = segment_writer.SegmentWriter.append, []

    def patched(self, *args):
        append(self, *args)
        calls.append(1)
        if len(calls) == 4:
            die()

    segment_writer.SegmentWriter.append = patched
elif point == "committed":  # the copy is committed, no source removed yet
    commit = segment_writer.SegmentWriter.commit

    def patched(self):
        commit(self)
        die()

    segment_writer.SegmentWriter.commit = patched
elif point == "removing":  # one source removed, the others still there
    remove, calls = fs.Location.remove, []

    def patched(self, *parts):
        remove(self, *parts)
        if len(parts) == 2 and parts[0] == "segments":
            calls.append(1)
            if len(calls) == 1:
                die()

    fs.Location.remove = patched
elif point == "mid-removal":  # killed inside a source's removal: some of its files deleted, its COMMIT not yet
    if url.startswith("s3://"):  # a recursive delete, object by object
        remove = fs.Location.remove

        def patched(self, *parts):
            if len(parts) == 2 and parts[0] == "segments":
                self.fs.rm(self.join(*parts, "vectors", "zarr.json"))
                die()
            remove(self, *parts)

        fs.Location.remove = patched
    else:  # renamed to a hidden .<id>.<random>.removing, then deleted entry by entry
        import shutil

        tree = fs._remove_tree

        def patched_tree(path):
            if path.parent.name == "segments":
                shutil.rmtree(path / "vectors")
                die()
            tree(path)

        fs._remove_tree = patched_tree
compact.compact_store(TeacherStore.open(url), target_rows=target)
print("finished")
"""


@pytest.mark.parametrize("point", ["copying", "committed", "removing", "mid-removal"])
def test_a_killed_compaction_loses_nothing_and_shows_no_key_twice(
    point: str, new_store: Callable[..., TeacherStore]
) -> None:
    store = new_store(DIM)
    rows = small_segments(store, [6, 7, 5, 6])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, store.url, point, "100"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    seen = TeacherStore.open(store.url)
    assert_each_key_once(seen, rows)  # right after the kill: every key, once
    expected_replaced = {"copying": 0, "committed": 4, "removing": 3, "mid-removal": 3}[point]
    assert len(seen.replaced) == expected_replaced
    assert len(seen.uncommitted_segments()) == (1 if point == "copying" else 0)
    report = compact_store(TeacherStore.open(store.url), target_rows=100)  # the next run finishes the job
    done = TeacherStore.open(store.url)
    assert len(done.segments) == 1 and done.replaced == [] and done.uncommitted_segments() == []
    assert report.segments_after == 1
    assert_each_key_once(done, rows)
    if point == "mid-removal":  # the killed removal's hidden copy: gc's to sweep
        swept = gc_store(done)
        assert [d["id"] for d in swept if d["id"].endswith(".removing")], swept
    names = [p.name for p in Path(store.url, "segments").iterdir() if p.is_dir()]
    assert names == [done.segments[0].seg_id]  # no source, copy or hidden leftover remains


@pytest.mark.parametrize("point", ["copying", "committed", "mid-removal"])
def test_a_killed_compaction_on_s3(point: str, s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3 the killed process's claims (and the copy's heartbeat) count as alive until ``stale_after``: readers see
    each key once at once; a compaction run after that finishes the job."""
    monkeypatch.setenv("DDX_STALE_AFTER", "2")
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    rows = small_segments(store, [5, 6, 4])
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the AWS environment of the s3 fixture reaches the child
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, url, point, "100"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert_each_key_once(store, rows)
    time.sleep(2.5)  # the dead process's claims and heartbeat go stale
    compact_store(TeacherStore.open(url, storage_options=s3.storage_options), target_rows=100)
    done = TeacherStore.open(url, storage_options=s3.storage_options)
    assert len(done.segments) == 1 and done.replaced == [] and done.uncommitted_segments() == []
    assert_each_key_once(done, rows)


def test_gc_and_salvage_finish_an_interrupted_compaction(new_store: Callable[..., TeacherStore]) -> None:
    """Leftovers of a killed compaction, cleaned by the commands that clean up after crashes: ``gc`` removes the
    replaced sources; salvage removes an uncommitted copy instead of committing its rows a second time."""
    store = new_store(DIM)
    rows = small_segments(store, [5, 5])
    store.refresh()
    sources = [s.seg_id for s in store.segments]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", CHILD, store.url, "committed", "100"], env=env, timeout=120, check=False)
    store = TeacherStore.open(store.url)
    assert store.replaced == sorted(sources) and store_info(store)["replaced"] == sorted(sources)
    listed = CliRunner().invoke(cli, ["cache", "ls", store.url])
    assert listed.exit_code == 0 and listed.output.count("(replaced by a compaction, not read;") == 2
    assert {d["id"] for d in gc_store(store, dry_run=True)} == set(sources)
    assert {d["id"] for d in gc_store(store)} == set(sources) and TeacherStore.open(store.url).replaced == []
    assert_each_key_once(store, rows)

    more = small_segments(store, [4, 4], prefix="more")
    subprocess.run([sys.executable, "-c", CHILD, store.url, "copying", "100"], env=env, timeout=120, check=False)
    store = TeacherStore.open(store.url)
    ((copy, state),) = store.uncommitted_segments()
    assert state == "abandoned" and Path(store.url, "segments", copy, "parts").is_dir()  # rows flushed, no COMMIT
    assert claim_and_salvage(store.loc, copy).outcome == "removed"
    assert not Path(store.url, "segments", copy).exists()
    both = Rows(*(np.concatenate(c) for c in zip(rows.args(), more.args(), strict=True)))
    assert_each_key_once(store, both)


def test_a_reader_opening_while_sources_are_removed_lists_again(
    new_store: Callable[..., TeacherStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction's sources vanish between a reader's listing and its opening them: the reader lists again and
    finds the compacted segment (committed before any source is removed)."""
    store = new_store(DIM)
    rows = small_segments(store, [5, 5])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", CHILD, store.url, "committed", "100"], env=env, timeout=120, check=False)
    original, raced = SegmentReader.__init__, []

    def open_segment(self: SegmentReader, loc: object, seg_id: str, **kw: object) -> None:
        if not raced:  # the first segment opened: the compaction's removal runs now
            raced.append(seg_id)
            remove_replaced(TeacherStore.open(store.url))
        original(self, loc, seg_id, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(SegmentReader, "__init__", open_segment)
    reopened = TeacherStore.open(store.url)
    assert len(reopened.segments) == 1 and reopened.replaced == []
    np.testing.assert_array_equal(reopened.get(rows.keys), rows.vectors)
    monkeypatch.undo()
    damaged = Path(store.url, "segments", reopened.segments[0].seg_id, "COMMIT")
    damaged.write_text("{")
    with pytest.raises(IntegrityError, match="COMMIT is damaged"):  # damage is still damage, not a race
        TeacherStore.open(store.url)


def test_cache_compact_command(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = small_segments(store, [3, 4, 5])
    runner = CliRunner()
    dry = runner.invoke(cli, ["cache", "compact", store.url, "--dry-run"])
    assert dry.exit_code == 0 and "would merge 3 segments (12 rows)" in dry.output and "3 segment(s) -> 1" in dry.output
    out = runner.invoke(cli, ["cache", "compact", store.url, "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert (report["segments_before"], report["segments_after"], report["merged"][0]["rows"]) == (3, 1, 12)
    assert_each_key_once(store, rows)
    bad = runner.invoke(cli, ["cache", "compact", store.url, "--target-rows", "0"])
    assert bad.exit_code == 2 and "Invalid value for '--target-rows'" in bad.output
    missing = runner.invoke(cli, ["cache", "compact", str(Path(store.url).parent / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: No teacher store at")


def test_compaction_keeps_which_row_a_repeated_key_resolves_to(new_store: Callable[..., TeacherStore]) -> None:
    """Readers resolve a key stored twice to the first segment in id order. Small segments on both sides of one left
    alone are not merged into one copy, and a copy sorts where its first source did: the key stays on its row."""
    store = new_store(DIM)
    dup = make_rows(1, DIM, prefix="dup")
    layout = [("a", 1.0, 2), ("b", None, 2), ("c", 2.0, 40), ("d", None, 2), ("e", 3.0, 2)]  # c: too big to merge
    for name, value, n in layout:
        rows = make_rows(n, DIM, prefix=f"seg-{name}")
        keys, vectors = rows.keys, rows.vectors
        if value is not None:
            keys = np.concatenate([dup.keys, keys])
            vectors = np.concatenate([np.full((1, DIM), value, vectors.dtype), vectors])
        w = SegmentWriter.create(
            store.loc, seg_id=f"20260101T000000-host-1-r0of1-00000{name}", dim=DIM, dtype=store.dtype, chunk_rows=4
        )
        w.append(keys, vectors, np.zeros(len(keys), np.uint8), np.ones(len(keys), np.int32))
        w.commit()
    before = TeacherStore.open(store.url)
    assert before.get(dup.keys)[0, 0] == 1.0
    report = compact_store(before, target_rows=10)
    after = TeacherStore.open(store.url)
    assert sorted(len(m["sources"]) for m in report.merged) == [2, 2]  # a+b and d+e; c ends the run
    assert [s.rows for s in after.segments] == [5, 41, 5]  # in id order: the copy of a+b, c, the copy of d+e
    assert after.get(dup.keys)[0, 0] == 1.0
    assert verify_store(after).ok


def test_an_unfinished_copy_whose_inherited_source_is_gone_is_removed(new_store: Callable[..., TeacherStore]) -> None:
    """A copy records the segments an earlier compaction replaced (inherited) besides its own sources; gc may remove
    those meanwhile. Killed before its commit, the copy must still be removed by salvage (its rows are all in its
    committed sources), not committed next to them as a second copy of every row."""
    store = new_store(DIM)
    rows = small_segments(store, [5, 6])
    store.refresh()
    sources = [s.seg_id for s in store.segments]
    copy = SegmentWriter.create(
        store.loc,
        seg_id=copy_id(sources[0]),
        dim=DIM,
        dtype=store.dtype,
        chunk_rows=4,
        replaces=[*sources, "20000101T000000-gone-1-r0of1-abcdef"],  # inherited, since removed by gc
    )
    copy.append(*rows[:8].args())
    copy.flush()
    copy.abort()
    assert claim_and_salvage(store.loc, copy.seg_id).outcome == "removed"
    assert not Path(store.url, "segments", copy.seg_id).exists()
    assert_each_key_once(store, rows)
