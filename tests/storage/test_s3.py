"""The store on a real S3 API (moto's server on 127.0.0.1, ``tests/storage/s3.py``), the way a cluster uses it.

Round trips with explicit storage options; another process's commit seen at once (no listing cache);
a SIGKILLed writer whose heartbeat thread stops is salvaged within the configured ``stale_after``;
``gc --force`` for a writer known dead; a stale claim broken by exactly one process; atomic store
creation; gathers as byte ranges behind a bounded cache, every row still checked; network and
credential failures as one-line errors. Concurrent salvagers on S3: ``test_s3_concurrent_salvage.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from storage import IntegrityError, StoreExistsError, TeacherStore, gc_store, verify_store
from storage.claim import CLAIM, segment_claim
from storage.errors import DdxError, RemoteStoreError
from storage.fs import Location
from storage.heartbeat import beat_interval
from storage.segment import claim_and_salvage, segment_state
from tests.storage.rows import make_rows, make_spec, write_rows
from tests.storage.s3 import S3

DIM = 16
REPO = Path(__file__).resolve().parents[2]
STALE = 3.0  # seconds: the killed-writer test waits about this long


def open_store(s3: S3, url: str, **kw: object) -> TeacherStore:
    return TeacherStore.open(url, storage_options=s3.storage_options, **kw)  # type: ignore[arg-type]


def test_round_trip_with_storage_options(s3_server: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS environment at all: everything (zarr's writes included) goes through the storage options."""
    for name in s3_server.env:
        monkeypatch.delenv(name, raising=False)
    url, opts = s3_server.url(), s3_server.storage_options
    store = TeacherStore.create(url, make_spec(DIM), storage_options=opts)
    rows = make_rows(37, DIM)
    write_rows(store, rows, batches=(5, 11))
    write_rows(store, make_rows(6, DIM, prefix="second"))
    store = TeacherStore.open(url, make_spec(DIM), storage_options=opts)
    assert len(store.segments) == 2 and len(store) == 43 and store.rows == 43
    perm = np.random.default_rng(0).permutation(37)
    np.testing.assert_array_equal(store.get(rows.keys[perm]), rows.vectors[perm])
    gids = store.locate(rows.keys)
    np.testing.assert_array_equal(store.get_rows(gids[::-1], dtype="float32"), rows.vectors[::-1].astype(np.float32))
    scanned = dict(zip(*(np.concatenate(x) for x in zip(*store.iter_batches(batch_size=8), strict=True)), strict=True))
    assert len(scanned) == 43
    np.testing.assert_array_equal(np.stack([scanned[k] for k in rows.keys]), rows.vectors)
    report = verify_store(store)
    assert report.ok and (report.segments, report.rows) == (2, 43), report.problems
    assert gc_store(store) == [] and len(TeacherStore.open(url, storage_options=opts)) == 43


def test_gc_salvages_and_removes_on_s3(s3: S3) -> None:
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    rows = make_rows(10, DIM)
    kept = store.writer(chunk_rows=4, flush_seconds=3600)
    kept.append(*rows[:6].args())
    kept.flush()
    kept.abort()  # a writer that stopped says so in its last heartbeat: abandoned at once
    empty = store.writer(chunk_rows=4, flush_seconds=3600)
    empty.append(*rows[6:9].args())  # buffered only: nothing indexed
    empty.abort()
    assert dict(store.uncommitted_segments()) == {kept.seg_id: "abandoned", empty.seg_id: "abandoned"}
    done = {d["id"]: (d["action"], d["rows"]) for d in gc_store(store)}
    assert done == {kept.seg_id: ("salvaged", 6), empty.seg_id: ("removed", 0)}
    assert not store.loc.exists("segments", empty.seg_id)
    np.testing.assert_array_equal(store.get(rows.keys[:6]), rows.vectors[:6])
    assert verify_store(store).ok and store.uncommitted_segments() == []


# -- fresh listings ----------------------------------------------------------------------------------------------


def test_another_filesystems_commit_is_seen_at_once(s3: S3) -> None:
    """Two independent s3fs clients (as two processes have): refresh, uncommitted_segments and segment_state
    of one see what the other wrote since. A client with fsspec's listing cache on does not (the bug)."""
    url = s3.url()
    TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    reader = open_store(s3, url)
    other_opts = {**s3.storage_options, "skip_instance_cache": True}
    other = TeacherStore.open(url, storage_options=other_opts)
    assert reader.loc.fs is not other.loc.fs
    cached = s3.filesystem()  # a plain s3fs client, listing cache on
    prefix = url.removeprefix("s3://")
    assert cached.ls(f"{prefix}/segments", detail=False) == [f"{prefix}/segments/zarr.json"]

    rows = make_rows(9, DIM)
    w = other.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows.args())
    w.flush()
    assert reader.uncommitted_segments() == [(w.seg_id, "active")]
    assert segment_state(reader.loc, w.seg_id) == "active"
    w.commit()
    assert segment_state(reader.loc, w.seg_id) == "committed" and reader.uncommitted_segments() == []
    assert reader.segments == []
    reader.refresh()
    assert [s.seg_id for s in reader.segments] == [w.seg_id]
    np.testing.assert_array_equal(reader.get(rows.keys), rows.vectors)
    assert len(cached.ls(f"{prefix}/segments", detail=False)) == 1  # the stale listing ddx used to trust


# -- heartbeats, killed writers, force -----------------------------------------------------------------------------

# Appends 11 of 13 rows into 4-row chunks, flushes 10 of them, then hangs (its heartbeat thread beating) until killed.
CHILD = """
import sys, time
from storage import TeacherStore
from tests.storage.rows import make_rows
store = TeacherStore.open(sys.argv[1], stale_after=float(sys.argv[2]))
rows = make_rows(13, 16, prefix="killed")
w = store.writer(chunk_rows=4, flush_seconds=3600)
w.append(*rows[:10].args())
w.flush()
w.append(*rows[10:11].args())  # never flushed (rows 11, 12 never even appended)
print(w.rows_flushed, w.seg_id, flush=True)
time.sleep(300)
"""


def test_a_killed_writer_is_salvaged_within_stale_after(s3: S3) -> None:
    """A live writer stays 'active' for longer than stale_after on its thread's beats alone; once SIGKILLed, the
    next run salvages its flushed rows within stale_after (+ one beat), then writes the rest: every key once."""
    url = s3.url()
    TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(STALE)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, proc.stderr.read()  # type: ignore[union-attr]
        flushed, seg_id = int(line.split()[0]), line.split()[1]
        store = open_store(s3, url, stale_after=STALE)
        time.sleep(STALE * 1.5)  # no flush since: only the heartbeat thread keeps it alive
        assert store.uncommitted_segments() == [(seg_id, "active")]
        assert gc_store(store) == [] and store.salvage() == []
        beat = json.loads(store.loc.read_bytes("segments", seg_id, "HEARTBEAT"))
        assert time.time() - beat["time"] < STALE and beat["rows"] == flushed == 10
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    killed = time.monotonic()
    while not (done := store.salvage()):
        assert time.monotonic() - killed < STALE + 10, store.uncommitted_segments()
        time.sleep(0.1)
    waited = time.monotonic() - killed
    assert done == [(seg_id, 10)]
    assert waited < STALE + beat_interval(STALE) + 3.0, waited  # stale, then one salvage (~0.5 s on moto)
    rows = make_rows(13, DIM, prefix="killed")
    missing = ~store.contains(rows.keys)
    assert missing.tolist() == [False] * 10 + [True] * 3
    write_rows(store, rows[missing])  # the rerun encodes only what the killed run had not flushed
    store = open_store(s3, url)
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    assert store.rows == 13 and store.index.duplicates == 0 and verify_store(store).ok


def test_gc_force_salvages_a_writer_known_dead(s3: S3) -> None:
    """A writer dead but beating a moment ago ('active' for up to stale_after): force salvages it now."""
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    rows = make_rows(7, DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows.args())
    w.flush()
    assert w._beat is not None
    w._beat.stop()  # as if killed: nothing marks it closed, its last beat is fresh
    assert store.uncommitted_segments() == [(w.seg_id, "active")]
    assert gc_store(store) == [] and gc_store(store, force=["some-other-id"]) == []
    assert claim_and_salvage(store.loc, w.seg_id).outcome == "active"
    dry = gc_store(store, dry_run=True, force=[w.seg_id])
    assert [(d["id"], d["action"], d["rows"]) for d in dry] == [(w.seg_id, "salvaged", 7)]
    assert [(d["id"], d["action"], d["rows"]) for d in gc_store(store, force=True)] == [(w.seg_id, "salvaged", 7)]
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    assert verify_store(store).ok


def test_a_failing_heartbeat_surfaces_at_the_next_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """One failed beat warns; beats failing for stale_after stop the writer (others may be salvaging it)."""
    store = TeacherStore.create(f"memory://ddx-beat-{os.getpid()}", make_spec(DIM), stale_after=1.2)
    try:
        rows = make_rows(12, DIM)
        w = store.writer(chunk_rows=4, flush_seconds=3600)
        assert w._beat is not None and w._beat.interval == pytest.approx(0.2)
        time.sleep(0.7)
        assert w._beat.beats >= 2  # beating on its own, no flush needed
        write = Location.write_atomic
        failing = threading.Event()

        def flaky(self: Location, data: bytes, *parts: str, sync: bool = True) -> None:
            if parts[-1] == "HEARTBEAT" and failing.is_set():
                raise ConnectionResetError("connection reset by peer")
            write(self, data, *parts, sync=sync)

        monkeypatch.setattr(Location, "write_atomic", flaky)
        failing.set()
        time.sleep(0.45)  # a beat or two fail
        failing.clear()
        time.sleep(0.5)  # and then get through again
        with pytest.warns(UserWarning, match="a heartbeat failed"):
            w.append(*rows[:4].args())  # a full chunk: flushed
        failing.set()
        time.sleep(1.6)  # no beat for longer than stale_after
        with pytest.raises(RemoteStoreError, match="no heartbeat was written for"):
            w.append(*rows[4:8].args())
        w.abort()
    finally:
        monkeypatch.undo()
        store.loc.remove()


# -- claims and creation under races -------------------------------------------------------------------------------


def race_threads(n: int, fn) -> list[object]:  # type: ignore[no-untyped-def]
    barrier, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_a_stale_claim_is_broken_by_exactly_one(s3: S3) -> None:
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options, stale_after=STALE)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(5, DIM).args())
    w.flush()
    w.abort()
    dead = {"time": time.time() - 3 * STALE, "host": "gone", "pid": 1, "token": "deadbeef"}
    store.loc.write_atomic(json.dumps(dead).encode(), "segments", w.seg_id, CLAIM)  # its salvager was killed
    assert segment_state(store.loc, w.seg_id) == "abandoned"  # a stale claim holds nothing
    held = threading.Event()
    release = threading.Event()

    def take() -> bool:
        with segment_claim(store.loc, w.seg_id) as mine:
            if mine:
                held.set()
                release.wait(10)
            return mine

    for trial in range(3):
        held.clear()
        release.clear()
        store.loc.write_atomic(json.dumps({**dead, "token": f"dead{trial}"}).encode(), "segments", w.seg_id, CLAIM)
        outs: list[list[bool]] = [[] for _ in range(6)]
        threads = [threading.Thread(target=lambda out=out: out.append(take())) for out in outs]
        for t in threads:
            t.start()
        assert held.wait(20)
        time.sleep(0.3)  # the others have all tried by now
        release.set()
        for t in threads:
            t.join(30)
        assert sorted(out[0] for out in outs) == [False] * 5 + [True], f"trial {trial}: {outs}"
        assert not store.loc.exists("segments", w.seg_id, CLAIM)
        assert [n for n in store.loc.listdir("segments", w.seg_id) if n.startswith(".claim")] == []  # no breaker left
    assert claim_and_salvage(store.loc, w.seg_id).rows == 5


def test_a_live_salvagers_claim_stays_fresh(s3: S3) -> None:
    """A claim is beaten while held: a salvage longer than stale_after is not broken into."""
    store = TeacherStore.create(s3.url(), make_spec(DIM), storage_options=s3.storage_options, stale_after=1.0)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(5, DIM).args())
    w.flush()
    w.abort()
    with segment_claim(store.loc, w.seg_id) as mine:
        assert mine
        time.sleep(1.6)
        assert segment_state(store.loc, w.seg_id) == "salvaging"
        assert claim_and_salvage(store.loc, w.seg_id).outcome == "busy"
    assert claim_and_salvage(store.loc, w.seg_id).rows == 5


def test_store_creation_is_atomic(s3: S3) -> None:
    """Racing creators of one S3 store: exactly one creates it, the others are told it exists; open_or_create
    from all of them gives every one the same store."""
    for trial in range(3):
        url = s3.url(f"create{trial}")
        results = race_threads(
            6, lambda url=url: TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
        )
        made = [r for r in results if isinstance(r, TeacherStore)]
        assert len(made) == 1, results
        assert all(isinstance(r, StoreExistsError) for r in results if r not in made), results
    url = s3.url("open-or-create")
    results = race_threads(
        6, lambda: TeacherStore.open_or_create(url, make_spec(DIM), storage_options=s3.storage_options)
    )
    assert all(isinstance(r, TeacherStore) for r in results), results
    assert verify_store(open_store(s3, url)).ok


def test_a_half_made_store_does_not_block_creation(s3: S3) -> None:
    """A creator that has written segments/zarr.json but not yet the root (mid-create, or killed there) is
    not 'a store that exists': open_or_create and create both finish it (the root's conditional PUT decides)."""
    url = s3.url("half-made")
    first = TeacherStore.create(s3.url("donor"), make_spec(DIM), storage_options=s3.storage_options)
    loc = Location(url, s3.storage_options)
    loc.write_atomic(first.loc.read_bytes("segments", "zarr.json"), "segments", "zarr.json")
    assert not loc.exists("zarr.json")
    store = TeacherStore.open_or_create(url, make_spec(DIM), storage_options=s3.storage_options)
    assert store.spec.fingerprint == make_spec(DIM).fingerprint
    assert verify_store(open_store(s3, url)).ok
    url2 = s3.url("half-made-create")
    Location(url2, s3.storage_options).write_atomic(
        first.loc.read_bytes("segments", "zarr.json"), "segments", "zarr.json"
    )
    assert TeacherStore.create(url2, make_spec(DIM), storage_options=s3.storage_options).rows == 0
    url3 = s3.url("not-a-store")  # anything else there still refuses
    Location(url3, s3.storage_options).write_atomic(b"x", "segments", "other")
    with pytest.raises(StoreExistsError):
        TeacherStore.create(url3, make_spec(DIM), storage_options=s3.storage_options)


# -- byte-range gathers --------------------------------------------------------------------------------------------


def test_gathers_are_byte_ranges_behind_a_bounded_cache(s3: S3) -> None:
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    rows = make_rows(64, DIM)
    write_rows(store, rows, chunk_rows=16)
    row_bytes = DIM * 2
    store = open_store(s3, url, cache_bytes=10 * row_bytes)
    gids = store.locate(rows.keys)
    by_row = np.argsort(gids)  # fixture row i sits at global row gids[i]
    batch = gids[by_row[[3, 4, 5, 6, 20, 40, 41, 63]]]
    np.testing.assert_array_equal(store.get_rows(batch), rows.vectors[by_row[[3, 4, 5, 6, 20, 40, 41, 63]]])
    ranges = store._row_gather().ranges
    assert ranges is not None
    assert (ranges.requests, ranges.bytes_fetched) == (4, 8 * row_bytes)  # rows 3-6, 20, 40-41, 63: adjacent merged
    store.get_rows(batch[:3])
    assert ranges.requests == 4 and ranges.hits == 3  # cached
    for _ in range(5):  # random batches: never more than 10 rows kept
        pick = np.random.default_rng(_).choice(64, 24)
        np.testing.assert_array_equal(store.get_rows(gids[pick]), rows.vectors[pick])
        assert ranges.cached_bytes <= 10 * row_bytes
    assert store.segments[0]._maps == {}  # no whole chunk was read


def test_a_damaged_remote_row_is_refused(s3: S3) -> None:
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    rows = make_rows(20, DIM)
    write_rows(store, rows, chunk_rows=8)
    seg = store.loc.listdir("segments")[0]
    chunk = bytearray(store.loc.read_bytes("segments", seg, "vectors", "c", "1", "0"))
    chunk[3 * DIM * 2 + 1] ^= 0xFF  # row 11 (chunk 1, row 3)
    store.loc.write_atomic(bytes(chunk), "segments", seg, "vectors", "c", "1", "0")
    store = open_store(s3, url)
    gids = store.locate(rows.keys)
    ok = gids != 11
    np.testing.assert_array_equal(store.get_rows(gids[ok]), rows.vectors[ok])
    with pytest.raises(IntegrityError, match=r"row 11 \(chunk 1.*does not match its CRC32C"):
        store.get_rows(gids[~ok])
    store.loc.remove("segments", seg, "vectors", "c", "2", "0")
    store = open_store(s3, url)  # row 17 was cached by the gather above
    with pytest.raises(IntegrityError, match=r"vectors/c/2/0 is damaged: is missing"):
        store.get_rows(np.array([17]))


# -- errors --------------------------------------------------------------------------------------------------------


def test_an_unreachable_endpoint_is_one_line(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = {**s3.storage_options, "endpoint_url": f"http://127.0.0.1:{port}"}
    opts["config_kwargs"] = {"connect_timeout": 1, "retries": {"max_attempts": 1}}
    url = s3.url()
    calls = (lambda: TeacherStore.open(url, storage_options=opts), lambda: verify_store(url, storage_options=opts))
    for call in calls:
        with pytest.raises(RemoteStoreError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{url}: cannot reach the endpoint (") and "\n" not in message, message
        assert "--storage-options endpoint_url" in message


def test_missing_credentials_are_one_line(s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    url = s3.url()
    opts = {"endpoint_url": s3.endpoint_url, "skip_instance_cache": True}
    with pytest.raises(
        RemoteStoreError, match=rf"^{url}: no valid credentials \(NoCredentialsError: .*--storage-options"
    ):
        TeacherStore.create(url, make_spec(DIM), storage_options=opts)


def test_force_obeys_a_local_writers_flock(tmp_path: Path) -> None:
    """A local writer's flock is held only by a live process: force does not salvage under it."""
    store = TeacherStore.create(tmp_path / "store", make_spec(DIM))
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(5, DIM).args())
    w.flush()
    assert store.salvage(force=True) == [] and gc_store(store, force=True) == []
    assert store.uncommitted_segments() == [(w.seg_id, "active")]
    w.abort()
    assert store.salvage(force=True) == [(w.seg_id, 5)]  # the flush wrote the partial chunk too


def test_a_small_claim_is_a_conditional_put(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim markers are a few dozen bytes: on this s3fs (≥ 2025.7.0) their "xb" is a PUT with If-None-Match,
    so a creator that passed the existence check in the same instant as another still loses (no pre-check here)."""
    import warnings

    loc = Location(s3.url("small-claim"), s3.storage_options)
    monkeypatch.setattr(loc.fs, "exists", lambda path, **kw: False)  # both racers saw nothing there
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trusted: no fallback, no warning
        assert loc.create_exclusive(b'{"token": "first"}', "claim")
        assert not loc.create_exclusive(b'{"token": "second"}', "claim")
    assert loc.read_bytes("claim") == b'{"token": "first"}'


@pytest.mark.parametrize("version", ["2024.12.0", "2025.5.1"])
def test_an_s3fs_whose_xb_was_a_plain_put_is_not_trusted(version: str, s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """s3fs 2024.12–2025.5 sent a small "xb" file as a plain PUT (s3fs#973): create_exclusive must not take it for
    a conditional create, but fall back to check-write-read-back and say so, naming the upgrade."""
    import s3fs

    import storage.fs as fs

    monkeypatch.setattr(s3fs, "__version__", version)
    monkeypatch.setattr(fs, "_warned_no_exclusive", set())
    loc = Location(s3.url(f"old-s3fs-{version}"), s3.storage_options)
    with pytest.warns(UserWarning, match=r"no exclusive create \(s3fs before 2025\.7\.0 \(s3fs#973\): pip install -U"):
        assert loc.create_exclusive(b"first", "claim")
    assert not loc.create_exclusive(b"second", "claim")
    assert loc.read_bytes("claim") == b"first"


PAUSED_WRITER = """
import sys, time
import numpy as np
from storage import TeacherStore
from storage.errors import DdxError
from tests.storage.rows import make_rows

rows = make_rows(8, int(sys.argv[2]))
w = TeacherStore.open(sys.argv[1]).writer(chunk_rows=4, flush_seconds=3600)
w.append(*rows[:6].args())
w.flush()
print(w.seg_id, flush=True)
sys.stdin.readline()  # the parent SIGSTOPs this process here, salvages the segment, then SIGCONTs it
time.sleep(1.0)  # the heartbeat thread runs first after the pause
try:
    w.append(*rows[6:].args())
    w.commit()
    print("COMMITTED", flush=True)
except DdxError as exc:
    w.abort()
    print("REFUSED", str(exc).splitlines()[0], flush=True)
"""


def test_a_paused_writer_does_not_write_into_its_salvaged_segment(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer process paused (SIGSTOP) past stale_after is presumed dead and its segment salvaged by another; once
    resumed, it must not rewrite the segment's last chunk or vectors/zarr.json under the salvager's COMMIT (that
    made every open of the store fail): it stops with one line, and the salvaged rows stay readable."""
    monkeypatch.setenv("DDX_STALE_AFTER", "1.5")
    url = s3.url("paused-writer")
    TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSED_WRITER, url, str(DIM)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        seg_id = child.stdout.readline().strip()
        child.send_signal(signal.SIGSTOP)
        time.sleep(2.5)  # past stale_after: its heartbeat is old
        store = TeacherStore.open(url, storage_options=s3.storage_options)
        assert store.salvage() == [(seg_id, 6)]
        child.stdin.write("go\n")
        child.stdin.flush()
        child.send_signal(signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert out.startswith("REFUSED") and "no heartbeat was written for" in out, (out, err[-2000:])
    after = TeacherStore.open(url, storage_options=s3.storage_options)
    rows = make_rows(8, DIM)
    assert after.rows == 6
    np.testing.assert_array_equal(after.get(rows.keys[:6]), rows.vectors[:6])
    assert verify_store(after).ok


def test_a_forced_salvage_stops_the_live_writer_at_its_next_flush() -> None:
    """``ddx cache gc --force`` on a writer that is in fact alive: the writer's next flush finds the COMMIT and
    stops (one line), instead of overwriting files the COMMIT vouches for."""
    store = TeacherStore.create(f"memory://ddx-forced-{os.getpid()}", make_spec(DIM))
    try:
        rows = make_rows(8, DIM)
        w = store.writer(chunk_rows=4, flush_seconds=3600)
        w.append(*rows[:6].args())
        w.flush()
        assert claim_and_salvage(Location(store.url), w.seg_id, force=True).rows == 6
        with pytest.raises(DdxError, match="was committed by another process while this writer had it open"):
            w.append(*rows[6:].args())
        w.abort()
        after = TeacherStore.open(store.url)
        np.testing.assert_array_equal(after.get(rows.keys[:6]), rows.vectors[:6])
        assert verify_store(after).ok
        assert not after.loc.exists("segments", w.seg_id, "HEARTBEAT")  # the aborting writer wrote nothing more
    finally:
        store.loc.remove()


def test_a_beat_after_a_pause_does_not_hide_the_lapse() -> None:
    """The heartbeat thread may run before the writer after a pause: its beat must not make the silence look
    fresh (the writer would then go on writing into a segment others salvaged meanwhile)."""
    from storage.heartbeat import Beat

    beats: list[float] = []
    beat = Beat(lambda: beats.append(time.monotonic()), interval=3600, stale=0.3, what="segment x")
    beat.beat_now()
    assert len(beats) == 1
    time.sleep(0.4)  # the whole process paused past stale
    beat.beat_now()  # the beat thread wakes first
    assert len(beats) == 1  # no beat after the lapse: the segment must look as dead as others found it
    with pytest.raises(RemoteStoreError, match="paused, or stalled"):
        beat.check()
