"""The real CLI recovering a crashed run: several ``python -m cli.main precompute-teacher`` at once, and ``cache gc``.

The crashed run's rows hold vectors that encode their key (``tests/storage/rows.vectors_for``), not the
teacher's: a row the recovery kept is told apart, bit for bit, from one it encoded again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from precompute.teacher import TeacherConfig, TeacherEncoder, load_teacher
from storage import TeacherStore, content_keys, role_code
from tests.precompute.test_pipeline import default_device_atol, write_beir
from tests.storage.rows import make_spec, vectors_for
from tests.tiny_models import tiny_corpus

REPO = Path(__file__).resolve().parents[2]
PASSAGES = tiny_corpus(60, seed=90)
FLUSHED = 40


def crashed_segment(store: TeacherStore, texts: list[str], *, flushed: int, commit: bool = False) -> str:
    """A segment of ``texts[:flushed]`` with key-encoded vectors: aborted after a flush (crashed) or committed."""
    keys = content_keys("passage", texts)
    args = (keys, vectors_for(keys, store.dim), np.full(len(keys), role_code("passage"), np.uint8), np.ones(len(keys)))
    w = store.writer(chunk_rows=8, flush_seconds=3600)
    w.append(*(a[:flushed] for a in args))
    if commit:
        w.commit()
        return w.seg_id
    w.flush()
    w.append(*(a[flushed : flushed + 3] for a in args))  # never flushed: the crash's (only) loss
    w.abort()
    return w.seg_id


@pytest.fixture(scope="module")
def bert(tiny_bert: Path) -> TeacherEncoder:
    return load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))


def test_concurrent_cli_precomputes_keep_a_crashed_run_once(
    bert: TeacherEncoder, tiny_bert: Path, tmp_path: Path
) -> None:
    """Three real ``ddx precompute-teacher`` processes at once: the crashed rows are kept, once, reported once."""
    path = tmp_path / "store"
    seg_id = crashed_segment(TeacherStore.create(path, bert.spec), PASSAGES, flushed=FLUSHED)
    folder = write_beir(tmp_path / "beir", PASSAGES)
    argv = [sys.executable, "-m", "cli.main", "precompute-teacher", "--teacher", str(tiny_bert), "--store", str(path)]
    argv += ["--data", f"beir:{folder}", "--no-progress", "--json", "--flush-rows", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
    reports = [s for out, _ in outputs for s in json.loads(out)["salvaged"]]
    assert reports == [{"segment": seg_id, "rows": FLUSHED}]

    store = TeacherStore.open(path)
    keys = content_keys("passage", PASSAGES)
    kept, rest = keys[:FLUSHED], keys[FLUSHED:]
    assert store.contains(keys).all() and store.uncommitted_segments() == []
    rows_per_key = np.concatenate([seg.index().keys for seg in store.segments])
    assert all((rows_per_key == k).sum() == 1 for k in kept)  # every process saw them stored: none re-encoded
    np.testing.assert_array_equal(store.get(kept), vectors_for(kept, bert.spec.dim))  # the crashed run's own bytes
    rest_texts = PASSAGES[FLUSHED:]
    np.testing.assert_allclose(
        store.get(rest).astype(np.float32), bert.encode(rest_texts, "passage"), atol=default_device_atol(), rtol=0
    )
    verify = CliRunner().invoke(cli, ["cache", "verify", str(path)])
    assert verify.exit_code == 0, verify.output


def test_cache_gc_salvages_a_segment_that_lost_its_commit(tmp_path: Path) -> None:
    """gc never deletes rows: a committed segment whose COMMIT is gone is committed again, intact."""
    store = TeacherStore.create(tmp_path / "store", make_spec(16))
    seg_id = crashed_segment(store, PASSAGES, flushed=FLUSHED, commit=True)
    (tmp_path / "store" / "segments" / seg_id / "COMMIT").unlink()
    empty = crashed_segment(store, tiny_corpus(5, seed=91), flushed=0)  # nothing indexed: may go

    dry = CliRunner().invoke(cli, ["cache", "gc", str(store.url), "--dry-run"])
    assert dry.exit_code == 0 and f"would remove {empty}" in dry.stdout
    assert f"would salvage {seg_id}: {FLUSHED} rows kept" in dry.stdout
    done = CliRunner().invoke(cli, ["cache", "gc", str(store.url), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert [r["id"] for r in report["removed"]] == [empty]
    assert [(r["id"], r["rows"]) for r in report["salvaged"]] == [(seg_id, FLUSHED)] and report["damaged"] == []
    after = TeacherStore.open(store.url)
    keys = content_keys("passage", PASSAGES[:FLUSHED])
    np.testing.assert_array_equal(after.get(keys), vectors_for(keys, 16))
    assert [s.seg_id for s in after.segments] == [seg_id] and after.segments[0].commit["salvaged"]
    verify = CliRunner().invoke(cli, ["cache", "verify", str(store.url)])
    assert verify.exit_code == 0 and "note:" not in verify.output, verify.output
