"""The local disk cache of a remote store's chunk files (``TeacherStore.open(url, cache_dir=...)``), on moto S3.

Gathers through it equal gathers without it; once a chunk is on disk its rows make no S3 request; a damaged or
truncated cached file is deleted and fetched again, never returned; two processes filling the same chunks at
once both get the right rows; ``$DDX_REMOTE_CACHE_MAX_GB`` bounds it; ``--remote-cache-dir`` sets it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cli.options import store_access_options
from storage import IntegrityError, TeacherStore
from storage.remote_rows import REMOTE_CACHE_DIR_ENV, REMOTE_CACHE_MAX_GB_ENV, DiskChunks
from storage.segment_format import chunk_file
from tests.storage.rows import Rows, make_rows, make_spec, write_rows
from tests.storage.s3 import S3

DIM = 16
CHUNK_ROWS = 4
CHUNK_BYTES = CHUNK_ROWS * DIM * 2 + 4  # rows + CRC trailer
REPO = Path(__file__).resolve().parents[2]


def make_store(s3: S3) -> tuple[str, Rows]:
    """A store of two segments: 22 rows (6 chunks) and 9 rows (3 chunks)."""
    url = s3.url()
    store = TeacherStore.create(url, make_spec(DIM), storage_options=s3.storage_options)
    rows = make_rows(22, DIM)
    write_rows(store, rows, chunk_rows=CHUNK_ROWS)
    more = make_rows(9, DIM, prefix="more")
    write_rows(store, more, chunk_rows=CHUNK_ROWS)
    both = Rows(*(np.concatenate(c) for c in zip(rows.args(), more.args(), strict=True)))
    return url, both


def open_store(s3: S3, url: str, **kw: Any) -> TeacherStore:
    return TeacherStore.open(url, storage_options=s3.storage_options, **kw)


def disk(store: TeacherStore) -> DiskChunks:
    assert store.disk_chunks is not None
    return store.disk_chunks


def count_chunk_reads(store: TeacherStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths of chunk files the store's filesystem reads from now on (whole or by range)."""
    fs, seen = store.loc.fs, []

    def counting(name: str) -> Callable[..., Any]:
        real = getattr(fs, name)

        def call(path: Any, *args: Any, **kw: Any) -> Any:
            seen.extend(p for p in ([path] if isinstance(path, str) else path) if "/vectors/c/" in p)
            return real(path, *args, **kw)

        return call

    for name in ("cat_file", "cat_ranges", "cat", "open"):
        monkeypatch.setattr(fs, name, counting(name))
    return seen


def test_gathers_equal_and_the_second_makes_no_request(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, rows = make_store(s3)
    perm = np.random.default_rng(0).permutation(len(rows))
    plain = open_store(s3, url)
    want = plain.get(rows.keys[perm])
    np.testing.assert_array_equal(want, rows.vectors[perm])

    store = open_store(s3, url, cache_dir=tmp_path)
    gids = store.locate(rows.keys[perm])
    np.testing.assert_array_equal(store.get_rows(gids), want)
    np.testing.assert_array_equal(store.get_rows(gids[:5], dtype="float32"), want[:5].astype(np.float32))
    assert disk(store).downloads == 9  # every chunk once, whole
    seg = store.segments[0]
    cached = tmp_path / store.fingerprint / seg.seg_id / "c" / "0"
    assert cached.read_bytes() == store.loc.read_bytes(*chunk_file(seg.seg_id, 0))

    seen = count_chunk_reads(store, monkeypatch)
    np.testing.assert_array_equal(store.get_rows(gids[::-1]), want[::-1])
    assert seen == []  # same process: the open local files

    cold = open_store(s3, url, cache_dir=tmp_path / "cold")  # the counting sees chunk reads when there are some
    cold_gids = cold.locate(rows.keys[:2])
    seen = count_chunk_reads(cold, monkeypatch)
    cold.get_rows(cold_gids)
    assert seen

    again = open_store(s3, url, cache_dir=tmp_path)  # another process of the same machine: the files on disk
    gids = again.locate(rows.keys)
    seen = count_chunk_reads(again, monkeypatch)
    np.testing.assert_array_equal(again.get_rows(gids), rows.vectors)
    assert seen == [] and disk(again).downloads == 0


def test_the_environment_sets_the_cache_and_local_stores_ignore_it(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, rows = make_store(s3)
    monkeypatch.setenv(REMOTE_CACHE_DIR_ENV, str(tmp_path / "env"))
    store = open_store(s3, url)
    assert store.cache_dir == tmp_path / "env"
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    assert disk(store).downloads == 9
    assert open_store(s3, url, cache_dir=tmp_path / "arg").cache_dir == tmp_path / "arg"  # the argument wins
    local = TeacherStore.create(tmp_path / "local", make_spec(DIM))
    assert local.cache_dir is None


def test_a_damaged_cached_file_is_fetched_again(s3: S3, tmp_path: Path) -> None:
    url, rows = make_store(s3)
    store = open_store(s3, url, cache_dir=tmp_path)
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    seg = store.segments[0]
    flipped = tmp_path / store.fingerprint / seg.seg_id / "c" / "1"
    data = bytearray(flipped.read_bytes())
    data[CHUNK_BYTES // 2] ^= 0x40  # a row's byte
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / store.fingerprint / seg.seg_id / "c" / "2"
    truncated.write_bytes(truncated.read_bytes()[:-10])

    again = open_store(s3, url, cache_dir=tmp_path)
    perm = np.random.default_rng(1).permutation(len(rows))
    np.testing.assert_array_equal(again.get(rows.keys[perm]), rows.vectors[perm])
    assert (disk(again).discarded, disk(again).downloads) == (2, 2)
    assert flipped.read_bytes() == store.loc.read_bytes(*chunk_file(seg.seg_id, 1))
    assert truncated.stat().st_size == seg.rows_in(2) * DIM * 2 + 4  # chunk 2 of 3 is trimmed in the 9-row segment


def test_a_damaged_remote_chunk_is_refused_and_not_cached(s3: S3, tmp_path: Path) -> None:
    url, rows = make_store(s3)
    store = open_store(s3, url, cache_dir=tmp_path)
    seg = store.segments[0]
    path = store.loc.join(*chunk_file(seg.seg_id, 2))
    fs = s3.filesystem()
    data = bytearray(fs.cat_file(path))
    data[5] ^= 0x01
    fs.pipe_file(path, bytes(data))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.get(rows.keys)
    assert not (tmp_path / store.fingerprint / seg.seg_id / "c" / "2").exists()


def test_the_size_bound_evicts_least_recently_opened(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, rows = make_store(s3)
    monkeypatch.setenv(REMOTE_CACHE_MAX_GB_ENV, str(3 * CHUNK_BYTES / 1e9))
    store = open_store(s3, url, cache_dir=tmp_path)
    perm = np.random.default_rng(2).permutation(len(rows))
    np.testing.assert_array_equal(store.get(rows.keys[perm]), rows.vectors[perm])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 3 * CHUNK_BYTES and len(files) <= 4  # a short last chunk or two
    np.testing.assert_array_equal(open_store(s3, url, cache_dir=tmp_path).get(rows.keys), rows.vectors)


RACER = """
import json, sys, time
import numpy as np
from storage import TeacherStore
url, opts, cache, start, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
store = TeacherStore.open(url, storage_options=opts, cache_dir=cache)
keys = np.load(out + ".keys.npy")
gids = store.locate(keys)
store._row_gather()
time.sleep(max(0.0, start - time.time()))
np.save(out, store.get_rows(gids))
print(store.disk_chunks.downloads)
"""


def test_two_processes_filling_the_same_chunks_both_get_the_right_rows(s3: S3, tmp_path: Path) -> None:
    url, rows = make_store(s3)
    cache = tmp_path / "cache"
    start = time.time() + 4.0  # both past their imports and index reads, then gathering at once
    procs = []
    for i in range(2):
        out = tmp_path / f"out{i}.npy"
        np.save(str(out) + ".keys.npy", rows.keys)
        args = [url, json.dumps(s3.storage_options), str(cache), str(start), str(out)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", RACER, *args], env=env, stdout=subprocess.PIPE, text=True))
    downloads = []
    for p in procs:
        stdout, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        downloads.append(int(stdout.split()[-1]))
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"out{i}.npy"), rows.vectors)
    assert all(0 <= d <= 9 for d in downloads) and sum(downloads) >= 9, downloads
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    # no temporary file left: 7 full chunks, and the last chunks of the two segments (2 rows and 1 row: format 3
    # writes a segment's last chunk with its rows only)
    assert len(files) == 9 and sorted(p.stat().st_size for p in files) == sorted([CHUNK_BYTES] * 7 + [68, 36])


def test_remote_cache_dir_option_sets_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REMOTE_CACHE_DIR_ENV, "")  # restored (unset) afterwards: the option sets os.environ itself

    @click.command()
    @store_access_options
    def cmd() -> None:
        click.echo(os.environ.get(REMOTE_CACHE_DIR_ENV, ""))

    result = CliRunner().invoke(cmd, ["--remote-cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path)
