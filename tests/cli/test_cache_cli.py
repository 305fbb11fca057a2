"""``ddx cache ls|info|verify|gc`` on stores made by a real precompute run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from precompute.teacher import TeacherConfig, TeacherEncoder, load_teacher
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.precompute.test_pipeline import (
    one_torch_thread,  # noqa: F401 - autouse fixture
    run,
    write_beir,
)
from tests.tiny_models import tiny_corpus

PASSAGES, QUERIES, MORE = tiny_corpus(30, seed=70), tiny_corpus(6, seed=71), tiny_corpus(10, seed=72)


@pytest.fixture(scope="module")
def bert(tiny_bert: Path) -> TeacherEncoder:
    return load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))


@pytest.fixture
def store(bert: TeacherEncoder, tmp_path: Path) -> Path:
    """Two committed segments (30 passages + 6 queries, then 10 more passages), chunks of 8 rows."""
    path = tmp_path / "store"
    run(path, write_beir(tmp_path / "a", PASSAGES, QUERIES), bert, flush_rows=8)
    run(path, write_beir(tmp_path / "b", MORE), bert, flush_rows=8)
    return path


def cache(*args: str) -> object:
    return CliRunner().invoke(cli, ["cache", *args])


def distinct(texts: list[str]) -> int:
    return len(set(texts))


def test_ls_and_info_json(store: Path, bert: TeacherEncoder) -> None:
    n_pass, n_query = distinct(PASSAGES + MORE), distinct(QUERIES)
    ls = cache("ls", str(store), "--json")
    assert ls.exit_code == 0, ls.output
    data = json.loads(ls.stdout)
    assert data["rows"] == n_pass + n_query and data["keys"] is None and data["duplicate_rows"] is None  # COMMITs only
    counted = json.loads(cache("ls", str(store), "--json", "--duplicates").stdout)
    assert counted["keys"] == counted["rows"] == n_pass + n_query and counted["duplicate_rows"] == 0
    assert data["roles"] == {"passage": n_pass, "query": n_query}
    segments = data["segments"]
    assert len(segments) == 2 and sorted(s["rows"] for s in segments) == sorted(
        [distinct(PASSAGES) + n_query, n_pass - distinct(PASSAGES)]
    )
    first = next(s for s in segments if s["roles"]["query"])
    assert first["chunk_rows"] == 8 and first["chunks"] == -(-first["rows"] // 8) and first["bytes"] > 0
    assert data["uncommitted"] == []

    info = json.loads(cache("info", str(store), "--json").stdout)
    assert info["fingerprint"] == bert.spec.fingerprint and info["teacher_spec"] == bert.spec.to_dict()
    assert (info["dim"], info["storage_dtype"], info["format_version"]) == (32, "float16", 3)
    assert info["rows"] == n_pass + n_query and info["roles"] == data["roles"]


def test_ls_and_info_text(store: Path) -> None:
    ls = cache("ls", str(store))
    assert ls.exit_code == 0
    lines = ls.stdout.splitlines()
    assert "32-d, mean pooling, float16" in lines[0]
    assert sum("-r0of1-" in line for line in lines) == 2
    assert lines[-1].startswith(f"total: {distinct(PASSAGES + MORE)} passages, {distinct(QUERIES)} queries")
    info = cache("info", str(store))
    assert info.exit_code == 0 and "pooling:        'mean'" in info.stdout and "in 2 segments" in info.stdout


def test_verify_ok_then_a_flipped_byte(store: Path) -> None:
    ok = cache("verify", str(store))
    assert ok.exit_code == 0 and ok.stdout.startswith("OK: 2 segments")
    seg = TeacherStore.open(store).segments[0]
    chunk = store / "segments" / seg.seg_id / "vectors" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))

    bad = cache("verify", str(store))
    assert bad.exit_code == 1
    assert f"DAMAGED: segments/{seg.seg_id}/vectors/c/1/0: chunk 1 checksum mismatch" in bad.stderr
    assert bad.stdout.startswith("1 problem(s): 2 segments")
    report = json.loads(cache("verify", str(store), "--json").stdout)
    assert report["ok"] is False and len(report["problems"]) == 1
    assert seg.seg_id in report["problems"][0] and "chunk 1" in report["problems"][0]


def test_gc_keeps_flushed_rows_and_removes_only_empty_segments(store: Path) -> None:
    s = TeacherStore.open(store)
    keys = content_keys("passage", ["left behind one", "left behind two"])
    writer = s.writer(chunk_rows=8)
    writer.append(keys, np.ones((2, 32), np.float32), np.zeros(2, np.uint8), np.full(2, 3, np.int32))
    writer.flush()
    running = cache("gc", str(store), "--json")
    assert json.loads(running.stdout)["removed"] == []  # a live writer holds its segment: never removed
    writer.abort()  # what a crash leaves: flushed rows, no COMMIT, lock released
    empty = s.writer(chunk_rows=8, flush_seconds=3600)
    empty.append(keys[:1], np.ones((1, 32), np.float32), np.zeros(1, np.uint8), np.full(1, 3, np.int32))
    empty.abort()  # nothing flushed, nothing indexed: provably empty

    listed = cache("ls", str(store))
    assert f"{writer.seg_id}" in listed.stdout and "(uncommitted: abandoned)" in listed.stdout
    dry = cache("gc", str(store), "--dry-run")
    assert dry.exit_code == 0 and f"would remove {empty.seg_id}" in dry.stdout
    assert f"would salvage {writer.seg_id}: 2 rows kept" in dry.stdout
    assert (store / "segments" / empty.seg_id).is_dir()
    done = cache("gc", str(store), "--json")
    removed = json.loads(done.stdout)["removed"]
    assert [r["id"] for r in removed] == [empty.seg_id] and removed[0]["bytes"] > 0
    assert [(r["id"], r["rows"]) for r in json.loads(done.stdout)["salvaged"]] == [(writer.seg_id, 2)]
    assert not (store / "segments" / empty.seg_id).exists()
    after = TeacherStore.open(store)
    assert len(after.segments) == 3 and after.contains(keys).all()  # gc salvaged the flushed rows, never deletes them
    assert cache("verify", str(store)).exit_code == 0


def test_missing_store_is_one_clean_line(tmp_path: Path) -> None:
    for sub in ("ls", "info", "verify", "gc"):
        result = cache(sub, str(tmp_path / "nope"))
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr == (
            f"Error: No teacher store at '{tmp_path / 'nope'}' (zarr.json missing). Run 'ddx "
            f"precompute-teacher --store {tmp_path / 'nope'} ...' first.\n"
        )


def test_verify_in_a_real_process(store: Path) -> None:
    ddx = str(Path(sys.executable).with_name("ddx"))
    proc = subprocess.run([ddx, "cache", "verify", str(store), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
