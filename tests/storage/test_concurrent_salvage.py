"""Concurrent recovery of a crashed run: nothing lost, nothing salvaged twice, the store always usable.

Fault injection over real OS processes: N ∈ {2, 4, 8} processes run ddx's own precompute pipeline at
the same instant (torchrun ranks restarting after a crash) on a store holding one abandoned segment,
repeated over several trials. The teacher is a fake whose vector of a text is a function of its
content key (``tests/storage/rows.vectors_for``), so every stored row is checked bit for bit. Workers
are spawned once per module and take one trial at a time; each trial starts them at one wall-clock
instant. Before the claim, these runs lost the crashed run's rows (or left COMMIT without vectors/).

The rest covers what the race exposed: a segment that lost only its COMMIT is salvaged, not deleted,
by precompute and by gc; a salvager killed mid-way is finished by the next; concurrent removal is
idempotent.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from precompute.pipeline import PrecomputeConfig, precompute
from precompute.teacher import PendingVectors, TeacherConfig
from storage import TeacherSpec, TeacherStore, content_keys, gc_store, verify_store
from storage.claim import segment_claim
from storage.fs import Location
from storage.keys import role_code
from storage.segment import claim_and_salvage, segment_state
from tests.storage.rows import make_spec, vectors_for

DIM = 16
CHUNK = 16
PASSAGES = [f"passage {i} about {'zebra ' * (i % 5)}quartz" for i in range(200)]
QUERIES = [f"query {i} what is {'river ' * (i % 3)}city" for i in range(40)]
FLUSHED = 120  # rows of the crashed run covered by index parts: what recovery must keep
TRIALS = {2: 3, 4: 3, 8: 4}


class KeyEncoder:
    """A fast stand-in for the teacher: a text's vector encodes its content key (exact in float16)."""

    device = "cpu"

    def __init__(self, spec: TeacherSpec) -> None:
        self.spec = spec
        self.forward_calls = 0

    def token_lengths(self, texts: list[str], role: str) -> np.ndarray:
        return np.array([len(t.split()) + 2 for t in texts], dtype=np.int32)

    def launch(self, texts: list[str], role: str) -> PendingVectors:
        self.forward_calls += 1
        return PendingVectors(vectors_for(content_keys(role, texts), DIM, "float32"))


def all_texts() -> tuple[list[str], np.ndarray]:
    """Roles and content keys of every text of the corpus, passages first."""
    roles = ["passage"] * len(PASSAGES) + ["query"] * len(QUERIES)
    keys = np.concatenate([content_keys("passage", PASSAGES), content_keys("query", QUERIES)])
    return roles, keys


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, texts, prefix in (("corpus.jsonl", PASSAGES, "p"), ("queries.jsonl", QUERIES, "q")):
        lines = [json.dumps({"_id": f"{prefix}{i}", "title": "", "text": t}) for i, t in enumerate(texts)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def crashed_store(path: Path, *, flushed: int = FLUSHED, commit: bool = False) -> tuple[TeacherStore, str]:
    """A store holding one segment of the corpus's first rows: ``flushed`` indexed, 5 more never flushed.

    The writer aborts (what SIGKILL leaves: parts, no COMMIT, lock free); with ``commit`` it commits instead.
    """
    store = TeacherStore.create(path, make_spec(DIM))
    roles, keys = all_texts()
    codes = np.array([role_code(r) for r in roles], dtype=np.uint8)
    w = store.writer(chunk_rows=CHUNK, flush_seconds=3600)
    args = (keys, vectors_for(keys, DIM), codes, np.full(len(keys), 7, np.int32))
    w.append(*(a[:flushed] for a in args))
    if commit:
        w.commit()
        return store, w.seg_id
    w.flush()
    w.append(*(a[flushed : flushed + 5] for a in args))  # the partial chunk stays short of full
    w.abort()
    return store, w.seg_id


def assert_recovered(path: Path, seg_id: str, *, rows: int = FLUSHED, exact: bool = True) -> TeacherStore:
    """Every key stored with its own vector, the crashed segment committed with all its indexed rows."""
    store = TeacherStore.open(path)
    report = verify_store(store)
    assert report.ok, report.problems
    assert store.uncommitted_segments() == []
    _, keys = all_texts()
    assert store.contains(keys).all() and len(store) == len(keys)
    np.testing.assert_array_equal(store.get(keys), vectors_for(keys, DIM))  # bitwise
    if exact:  # ranks split the work: each key written exactly once over all segments
        assert store.rows == len(keys) and store.index.duplicates == 0
    salvaged = {s.seg_id: s.rows for s in store.segments if s.commit.get("salvaged")}
    assert salvaged == {seg_id: rows}
    return store


# -- workers: real processes running the real pipeline ------------------------------------------------------------


def run_precompute(task: dict[str, Any]) -> dict[str, Any]:
    """One ``precompute`` at ``task['go_at']`` (wall clock) as rank ``task['rank']`` of ``task['world']``."""
    try:
        time.sleep(max(0.0, task["go_at"] - time.time()))
        config = PrecomputeConfig(
            store=task["store"],
            data=(f"beir:{task['data']}",),
            teacher=TeacherConfig(model="tiny-teacher"),
            rank=task["rank"],
            world_size=task["world"],
            flush_rows=CHUNK,
            progress=False,
        )
        summary = precompute(config, encoder=KeyEncoder(make_spec(DIM)))  # type: ignore[arg-type]
        return {"pid": os.getpid(), "salvaged": summary.salvaged, "encoded": summary.encoded}
    except BaseException:
        return {"pid": os.getpid(), "error": traceback.format_exc()}


def worker_main(inbox: Any, outbox: Any) -> None:
    import zarr  # noqa: F401 - warm every import before the first trial, so starts are simultaneous

    outbox.put({"ready": os.getpid()})
    while (task := inbox.get()) is not None:
        outbox.put(run_precompute(task))


class Workers:
    """``n`` spawned processes, each with its own inbox: trial i gives task j to process j."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=worker_main, args=(q, self.outbox), daemon=True) for q in self.inboxes]
        for p in self.procs:
            p.start()
        ready = [self.outbox.get(timeout=120) for _ in self.procs]
        assert all("ready" in r for r in ready), ready

    def run(self, tasks: list[dict[str, Any]], timeout: float = 120) -> list[dict[str, Any]]:
        for inbox, task in zip(self.inboxes, tasks, strict=False):
            inbox.put(task)
        return [self.outbox.get(timeout=timeout) for _ in tasks]

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(max(TRIALS))
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "beir")


def race(workers: Workers, store: Path, corpus: Path, n: int) -> list[dict[str, Any]]:
    go_at = time.time() + 0.3
    tasks = [{"store": str(store), "data": str(corpus), "rank": r, "world": n, "go_at": go_at} for r in range(n)]
    results = workers.run(tasks)
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    return results


@pytest.mark.parametrize("n", sorted(TRIALS))
def test_concurrent_precomputes_recover_a_crashed_segment(
    n: int, workers: Workers, corpus: Path, tmp_path: Path
) -> None:
    """N ranks restart at once over one abandoned segment: 0 rows lost, 0 unusable stores, one report."""
    for trial in range(TRIALS[n]):
        path = tmp_path / f"trial{trial}"
        _, seg_id = crashed_store(path)
        results = race(workers, path, corpus, n)
        reports = [s for r in results for s in r["salvaged"]]
        assert reports == [{"segment": seg_id, "rows": FLUSHED}], f"trial {trial}: {reports}"
        assert sum(r["encoded"] for r in results) == len(all_texts()[1]) - FLUSHED  # nothing encoded twice
        assert_recovered(path, seg_id)


def test_concurrent_precomputes_over_a_lost_commit(workers: Workers, corpus: Path, tmp_path: Path) -> None:
    """A committed segment whose COMMIT file is gone: its rows are salvaged once and never re-encoded."""
    path = tmp_path / "store"
    store, seg_id = crashed_store(path, commit=True)
    store.loc.remove("segments", seg_id, "COMMIT")
    results = race(workers, path, corpus, 8)
    assert [s for r in results for s in r["salvaged"]] == [{"segment": seg_id, "rows": FLUSHED}]
    assert_recovered(path, seg_id)


# -- claims ------------------------------------------------------------------------------------------------------


def test_a_held_claim_makes_others_wait_then_see_the_result(tmp_path: Path) -> None:
    store, seg_id = crashed_store(tmp_path / "store")
    assert segment_state(store.loc, seg_id) == "abandoned"
    with segment_claim(store.loc, seg_id) as mine:  # an open file description of its own: like another process
        assert mine
        assert segment_state(store.loc, seg_id) == "salvaging"
        assert store.uncommitted_segments() == [(seg_id, "salvaging")]
        assert claim_and_salvage(store.loc, seg_id).outcome == "busy"
        assert gc_store(store) == [] and store.loc.exists("segments", seg_id, "parts")
        with segment_claim(store.loc, seg_id) as again:
            assert not again
    first = claim_and_salvage(store.loc, seg_id)
    assert (first.outcome, first.rows) == ("salvaged", FLUSHED)
    assert claim_and_salvage(store.loc, seg_id).outcome == "done"  # the next one sees the result
    store.refresh()
    _, keys = all_texts()
    np.testing.assert_array_equal(store.get(keys[:FLUSHED]), vectors_for(keys[:FLUSHED], DIM))


def test_claims_on_an_object_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory:// stands in for S3/GCS: the claim is an object made by a conditional create."""

    store = TeacherStore.create(f"memory://ddx-claim-{os.getpid()}", make_spec(DIM))
    _, keys = all_texts()
    w = store.writer(chunk_rows=CHUNK, flush_seconds=3600)
    w.append(keys[:20], vectors_for(keys[:20], DIM), np.zeros(20, np.uint8), np.ones(20, np.int32))
    w.flush()
    w.abort()  # its writer stops: its last heartbeat says so
    try:
        with segment_claim(store.loc, w.seg_id) as mine:
            assert mine and store.uncommitted_segments() == [(w.seg_id, "salvaging")]
            assert claim_and_salvage(store.loc, w.seg_id).outcome == "busy"
        assert (claim_and_salvage(store.loc, w.seg_id).rows, len(TeacherStore.open(store.url))) == (20, 20)
        assert not store.loc.exists("segments", w.seg_id, ".claim")  # released with the block
    finally:
        store.loc.remove()


def die_during_salvage(store: str, seg_id: str, file_name: str) -> None:
    """Salvage, SIGKILLed right after writing ``file_name`` (no cleanup, no atexit: as a crash)."""
    from storage.fs import Location as Loc

    write = Loc.write_atomic

    def write_then_die(self: Loc, data: bytes, *parts: str) -> None:
        write(self, data, *parts)
        if parts[-1] == file_name:
            os.kill(os.getpid(), signal.SIGKILL)

    Loc.write_atomic = write_then_die  # type: ignore[method-assign]
    claim_and_salvage(Loc(store), seg_id)


@pytest.mark.parametrize("file_name", ["index.parquet", "COMMIT"])
def test_a_salvager_killed_midway_is_finished_by_the_next(
    file_name: str, workers: Workers, corpus: Path, tmp_path: Path
) -> None:
    path = tmp_path / "store"
    store, seg_id = crashed_store(path)
    proc = multiprocessing.get_context("spawn").Process(target=die_during_salvage, args=(str(path), seg_id, file_name))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert store.loc.exists("segments", seg_id, file_name)
    expected = "committed" if file_name == "COMMIT" else "abandoned"  # the dead salvager's claim is free
    assert segment_state(store.loc, seg_id) == expected
    results = race(workers, path, corpus, 4)
    reports = [s for r in results for s in r["salvaged"]]
    assert reports == ([] if file_name == "COMMIT" else [{"segment": seg_id, "rows": FLUSHED}])
    assert_recovered(path, seg_id)


# -- a segment that lost its COMMIT, damage, gc --------------------------------------------------------------------


def lost_commit(path: Path) -> tuple[TeacherStore, str]:
    store, seg_id = crashed_store(path, commit=True)
    store.loc.remove("segments", seg_id, "COMMIT")
    return store, seg_id


def test_gc_salvages_a_lost_commit_instead_of_deleting_it(tmp_path: Path) -> None:
    store, seg_id = lost_commit(tmp_path / "store")
    assert store.uncommitted_segments() == [(seg_id, "abandoned")]
    rows = FLUSHED
    dry = gc_store(store, dry_run=True)  # nothing to remove: its index describes rows, so it would be salvaged
    assert [(d["id"], d["action"], d["rows"]) for d in dry] == [(seg_id, "salvaged", rows)]
    assert [(d["id"], d["action"], d["rows"]) for d in gc_store(store)] == [(seg_id, "salvaged", rows)]
    assert store.loc.exists("segments", seg_id, "COMMIT")
    _, keys = all_texts()
    np.testing.assert_array_equal(store.get(keys[:FLUSHED]), vectors_for(keys[:FLUSHED], DIM))
    assert verify_store(store).ok and store.segments[0].commit["salvaged"]


def test_precompute_salvages_a_lost_commit(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "store"
    _, seg_id = lost_commit(path)
    result = run_precompute({"store": str(path), "data": str(corpus), "rank": 0, "world": 1, "go_at": 0})
    assert result["salvaged"] == [{"segment": seg_id, "rows": FLUSHED}]
    assert result["encoded"] == len(all_texts()[1]) - FLUSHED
    assert_recovered(path, seg_id)


def flip_byte(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip chunk 0", "flip chunk 3", "delete chunk 7", "truncate a part"])
def test_rows_that_fail_verification_are_left_in_place(damage: str, tmp_path: Path) -> None:
    """Salvage commits only rows it has verified; it never deletes what an index describes, nor does gc."""
    store, seg_id = crashed_store(tmp_path / "store")
    seg = Path(store.url, "segments", seg_id)
    chunk = seg / "vectors" / "c" / damage[-1] / "0"
    if damage.startswith("flip"):
        flip_byte(chunk)
    elif damage.startswith("delete"):
        chunk.unlink()
    else:
        part = sorted((seg / "parts").iterdir())[0]
        part.write_bytes(part.read_bytes()[:20])
    files = sorted(p.relative_to(seg) for p in seg.rglob("*") if p.name != ".claim")
    result = claim_and_salvage(store.loc, seg_id)
    assert result.outcome == "damaged" and seg_id in result.detail and "ddx cache verify" in result.detail
    if "chunk" in damage:
        assert f"chunk {damage[-1]} of vectors/ is missing or fails its checksum" in result.detail
    assert [(d["id"], d["action"]) for d in gc_store(store)] == [(seg_id, "damaged")]
    assert [d["id"] for d in gc_store(store, dry_run=True)] == [seg_id]  # a dry run reads no chunks
    assert sorted(p.relative_to(seg) for p in seg.rglob("*") if p.name != ".claim") == files  # untouched
    assert store.uncommitted_segments() == [(seg_id, "abandoned")]


def test_a_lost_commit_with_a_damaged_chunk_is_left_in_place(tmp_path: Path) -> None:
    store, seg_id = lost_commit(tmp_path / "store")
    flip_byte(Path(store.url, "segments", seg_id, "vectors", "c", "3", "0"))
    result = claim_and_salvage(store.loc, seg_id)
    assert result.outcome == "damaged" and "chunk 3" in result.detail
    assert Path(store.url, "segments", seg_id, "index.parquet").is_file()
    assert len(list(Path(store.url, "segments", seg_id, "vectors", "c").iterdir())) == FLUSHED // CHUNK + 1


def test_precompute_warns_about_a_damaged_segment_and_goes_on(corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "store"
    store, seg_id = crashed_store(path)
    flip_byte(Path(store.url, "segments", seg_id, "vectors", "c", "0", "0"))
    with pytest.warns(UserWarning, match=rf"Uncommitted segment '{seg_id}' was left in place: .*chunk 0"):
        result = run_precompute({"store": str(path), "data": str(corpus), "rank": 0, "world": 1, "go_at": 0})
    assert result["salvaged"] == [] and result["encoded"] == len(all_texts()[1])
    assert (Path(store.url, "segments", seg_id, "parts")).is_dir()


def test_gc_removes_an_empty_abandoned_segment_and_leftovers(tmp_path: Path) -> None:
    store, seg_id = crashed_store(tmp_path / "store", flushed=0)  # rows buffered, never flushed: nothing indexed
    committed = crashed_store(tmp_path / "other", commit=True)[1]
    leftover = Path(store.url, "segments", ".old.0123abcd.removing")  # a removal a crash interrupted
    (leftover / "vectors").mkdir(parents=True)
    (leftover / "vectors" / "zarr.json").write_text("{}")
    parts_left = Path(tmp_path / "other", "segments", committed, ".parts.89abcdef.removing")
    parts_left.mkdir()
    (parts_left / "part-000000.parquet").write_bytes(b"x")
    expected = [seg_id, leftover.name]
    assert [d["id"] for d in gc_store(store, dry_run=True)] == expected
    assert [d["id"] for d in gc_store(store)] == expected
    assert os.listdir(Path(store.url, "segments")) == ["zarr.json"]  # the group's own metadata only
    other = TeacherStore.open(tmp_path / "other")
    assert [d["id"] for d in gc_store(other)] == [f"{committed}/{parts_left.name}"]
    assert not parts_left.exists() and len(other.segments) == 1 and verify_store(other).ok


# -- idempotent removal ------------------------------------------------------------------------------------------


def make_tree(root: Path, dirs: int = 8, files: int = 25) -> None:
    for d in range(dirs):
        (root / f"d{d}" / "sub").mkdir(parents=True)
        for f in range(files):
            (root / f"d{d}" / f"f{f}").write_bytes(b"x")
        (root / f"d{d}" / "sub" / "leaf").write_bytes(b"y")


@pytest.mark.parametrize("n", [2, 4, 8])
def test_concurrent_remove_is_idempotent(n: int, tmp_path: Path) -> None:
    """n threads remove one tree at once, 5 times: no error, nothing left, no hidden copy behind."""
    loc = Location(tmp_path)
    for trial in range(5):
        make_tree(tmp_path / "seg")
        barrier, errors = threading.Barrier(n), list[BaseException]()

        def remove(barrier: threading.Barrier = barrier, errors: list[BaseException] = errors) -> None:
            barrier.wait()
            try:
                loc.remove("seg")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=remove) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"trial {trial}: {errors[0]!r}"
        assert os.listdir(tmp_path) == []


def test_remove_tolerates_entries_vanishing_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process deletes files of the tree while this one walks it: the walk skips them."""
    import storage.fs as fs

    make_tree(tmp_path / "seg", dirs=2, files=3)
    scandir = os.scandir

    def scandir_then_vanish(path: Any) -> Any:
        entries = list(scandir(path))
        for e in entries:
            if e.is_file():
                os.unlink(e.path)  # listed, then gone before the unlink
        return iter(entries)

    monkeypatch.setattr(fs.os, "scandir", scandir_then_vanish)
    Location(tmp_path).remove("seg")
    Location(tmp_path).remove("seg")  # absent: no error
    assert os.listdir(tmp_path) == []


def test_remote_remove_is_idempotent() -> None:
    loc = Location("memory://ddx-remove-test")
    loc.write_atomic(b"1", "seg", "a")
    loc.write_atomic(b"2", "seg", "b", "c")
    loc.remove("seg")
    loc.remove("seg")
    assert not loc.exists("seg")


def test_exclusive_create(tmp_path: Path) -> None:
    for loc in (Location(tmp_path), Location("memory://ddx-exclusive-test")):
        assert loc.create_exclusive(b"first", "claim")
        assert not loc.create_exclusive(b"second", "claim")
        assert loc.read_bytes("claim") == b"first"
        loc.remove("claim")


def test_exclusive_create_refuses_empty_data(tmp_path: Path) -> None:
    """s3fs writes an empty file with an unconditional touch, so an empty claim could never be exclusive."""
    for loc in (Location(tmp_path), Location("memory://ddx-exclusive-empty")):
        with pytest.raises(ValueError, match="needs bytes to write"):
            loc.create_exclusive(b"", "claim")
        assert not loc.exists("claim")


def _first_creator_wins(loc: Location, *, warns: bool) -> None:
    """Two creates of one claim: the first wins, the second is told it lost, the first's bytes stay."""
    with pytest.warns(UserWarning, match="no exclusive create") if warns else contextlib.nullcontext():
        assert loc.create_exclusive(b"first", "claim")
    assert not loc.create_exclusive(b"second", "claim")
    assert loc.read_bytes("claim") == b"first"
    loc.remove("claim")


@pytest.mark.parametrize(
    "refusal",
    [NotImplementedError("File mode not supported"), OSError(errno.ENOSYS, "NotImplemented (S3 501)")],
    ids=["fsspec-no-xb", "server-501"],
)
def test_exclusive_create_without_backend_support_warns_and_confirms(
    refusal: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that cannot open "xb", or a server that refuses conditional writes (s3fs raises ENOSYS for S3's
    501), falls back to write-then-read-back, and says once that it is not safe."""
    import storage.fs as fs

    loc = Location(f"memory://ddx-no-exclusive-{type(refusal).__name__}")
    real_open = loc.fs.open

    def open_without_x(path: str, mode: str = "rb", **kw: object):  # type: ignore[no-untyped-def]
        if mode == "xb":
            raise refusal
        return real_open(path, mode, **kw)

    monkeypatch.setattr(loc.fs, "open", open_without_x)
    monkeypatch.setattr(fs, "_warned_no_exclusive", set())
    _first_creator_wins(loc, warns=True)


def test_exclusive_create_on_a_server_that_ignores_the_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that ignores If-None-Match ("xb" behaves as "wb"): a second creator still does not win."""
    loc = Location("memory://ddx-ignores-condition")
    real_open = loc.fs.open

    def open_ignoring_x(path: str, mode: str = "rb", **kw: object):  # type: ignore[no-untyped-def]
        return real_open(path, "wb" if mode == "xb" else mode, **kw)

    monkeypatch.setattr(loc.fs, "open", open_ignoring_x)
    _first_creator_wins(loc, warns=False)


def test_a_backend_not_known_to_create_conditionally_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec's base file accepts "xb" on any backend (maybe as check-then-write), so a protocol not known to make it
    a conditional create is not trusted with it: write-then-read-back, and a warning that it is not safe."""
    import storage.fs as fs

    loc = Location("memory://ddx-unknown-backend")
    monkeypatch.setattr(fs, "_CONDITIONAL_CREATE", frozenset({"s3"}))  # as if memory:// were some other backend
    monkeypatch.setattr(fs, "_warned_no_exclusive", set())
    _first_creator_wins(loc, warns=True)
