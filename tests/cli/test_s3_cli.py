"""The ``ddx`` executable on an S3 store (moto's server on 127.0.0.1): ``--storage-options``, ``--stale-after``
and ``cache gc --force``, as separate processes with no AWS variables in their environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from storage import TeacherStore
from tests.precompute.test_pipeline import write_beir
from tests.storage.rows import make_rows, make_spec
from tests.storage.s3 import S3
from tests.tiny_models import tiny_corpus

REPO = Path(__file__).resolve().parents[2]


def ddx(s3: S3, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # only --storage-options reach it
    env.update(HF_HUB_OFFLINE="1", AWS_EC2_METADATA_DISABLED="true")
    options = ("--storage-options", json.dumps(s3.storage_options))
    argv = [sys.executable, "-m", "cli.main", *args, *options]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_precompute_ls_verify_on_s3(s3: S3, tiny_bert: Path, tmp_path: Path) -> None:
    url = s3.url()
    folder = write_beir(tmp_path / "beir", tiny_corpus(24, seed=71), ["first query", "second query"])
    run = ["precompute-teacher", "--teacher", str(tiny_bert), "--store", url, "--data", f"beir:{folder}"]
    first = json.loads(ddx(s3, *run, "--no-progress", "--device", "cpu", "--json").stdout)
    assert (first["encoded"], first["store"]) == (26, url)
    again = json.loads(ddx(s3, *run, "--no-progress", "--device", "cpu", "--json").stdout)
    assert (again["encoded"], again["already_stored"]) == (0, 26)  # the rerun sees the first run's commit
    assert json.loads(ddx(s3, "cache", "ls", url, "--json").stdout)["rows"] == 26
    assert json.loads(ddx(s3, "cache", "verify", url, "--json").stdout)["ok"] is True
    missing = ddx(s3, "cache", "ls", url + "-nothing", check=False)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_gc_force_salvages_a_writer_known_dead(s3: S3) -> None:
    url = s3.url()
    store = TeacherStore.create(url, make_spec(8), storage_options=s3.storage_options)
    rows = make_rows(7, 8)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows.args())
    w.flush()
    assert w._beat is not None
    w._beat.stop()  # killed: its last beat is fresh, so it counts as running for --stale-after seconds
    assert json.loads(ddx(s3, "cache", "gc", url, "--json").stdout)["salvaged"] == []
    done = json.loads(ddx(s3, "cache", "gc", url, "--force", "--json").stdout)
    assert [(d["id"], d["rows"]) for d in done["salvaged"]] == [(w.seg_id, 7)]
    assert json.loads(ddx(s3, "cache", "verify", url, "--json").stdout)["ok"] is True


def test_stale_after_lets_gc_salvage_a_silent_writer(s3: S3) -> None:
    url = s3.url()
    store = TeacherStore.create(url, make_spec(8), storage_options=s3.storage_options)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(5, 8).args())
    w.flush()
    assert w._beat is not None
    w._beat.stop()
    time.sleep(1.0)  # silent for longer than --stale-after: presumed dead without --force
    done = json.loads(ddx(s3, "cache", "gc", url, "--stale-after", "0.5", "--json").stdout)
    assert [(d["id"], d["rows"]) for d in done["salvaged"]] == [(w.seg_id, 5)]
