"""``ddx precompute-teacher``: summaries, --json, clean errors (CliRunner), and the real SciFact end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from precompute.sources import parse_source
from storage import verify_store
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.precompute.test_pipeline import (
    default_device_atol,
    direct,
    one_torch_thread,  # noqa: F401 - autouse fixture
    write_beir,
)
from tests.tiny_models import tiny_corpus

DDX = str(Path(sys.executable).with_name("ddx"))


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def precompute_args(model: Path, store: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "precompute-teacher",
        "--teacher",
        str(model),
        "--store",
        str(store),
        "--data",
        f"beir:{folder}",
        "--no-progress",
        *extra,
    ]


def test_summary_then_nothing_to_encode(tiny_bert: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", tiny_corpus(12, seed=60), ["a query", "another query"])
    args = precompute_args(tiny_bert, tmp_path / "s", folder)
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert f"beir:{folder}: 12 passages, 2 queries" in first.stdout
    assert "read 14 texts, 14 distinct; 0 already stored; encoded 14 in" in first.stdout
    assert "nothing to encode" not in first.stdout

    again = invoke(*args, "--json")
    summary = json.loads(again.stdout)  # stdout is pure JSON: progress and logs go to stderr
    assert (summary["encoded"], summary["already_stored"], summary["forward_calls"]) == (0, 14, 0)
    text = invoke(*args)
    assert "nothing to encode: every text is already in the store (the teacher did not run)" in text.stdout


def test_options_reach_the_library(tiny_bert: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", tiny_corpus(30, seed=61), ["q one", "q two"])
    result = invoke(
        *precompute_args(tiny_bert, tmp_path / "s", folder),
        "--json",
        "--roles",
        "passage",
        "--limit",
        "7",
        "--flush-rows",
        "4",
        "--storage-dtype",
        "float32",
        "--pooling",
        "cls",
        "--max-seq-length",
        "32",
        "--query-prompt",
        "query: ",
        "--rank",
        "0",
        "--world-size",
        "1",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["to_encode"], summary["encoded"], summary["sources"][0]["queries"]) == (7, 7, 0)
    store = TeacherStore.open(tmp_path / "s")
    assert store.dtype == "float32" and store.segments[0].chunk_rows == 4
    assert (store.spec.pooling, store.spec.max_seq_length, store.spec.query_prompt) == ("cls", 32, "query: ")
    assert store.index.roles.tolist() == [0] * 7  # passages only


def test_every_rank_reports_and_rank_zero_totals_the_job(tiny_bert: Path, tmp_path: Path) -> None:
    """Rank 1 prints its own JSON (it printed nothing); rank 0's text and JSON add up the job, not its slice."""
    folder = write_beir(tmp_path / "beir", tiny_corpus(20, seed=63))
    args = (*precompute_args(tiny_bert, tmp_path / "s", folder), "--world-size", "2", "--job-id", "j1")
    rank1 = invoke(*args, "--rank", "1", "--json")
    assert rank1.exit_code == 0, rank1.output
    one = json.loads(rank1.stdout)
    assert (one["rank"], one["job"], one["job_total"]) == (1, "j1", None) and 0 < one["encoded"] < 20
    rank0 = invoke(*args, "--rank", "0", "--json")
    zero = json.loads(rank0.stdout)
    job = zero["job_total"]
    assert (
        job["complete"] and job["ranks_reported"] == [0, 1] and job["encoded"] == 20 == one["encoded"] + zero["encoded"]
    )
    assert len(job["segments"]) == 2 and all("of2-" in s for s in job["segments"])
    text = invoke(*args, "--rank", "0").stdout  # a rerun: nothing to encode, the job's reports still add up
    assert "rank 0 of 2: read" in text and "job j1: 2 of 2 ranks reported" in text
    [segment] = [s for s in TeacherStore.open(tmp_path / "s").segments if "-r1of2-" in s.seg_id]
    assert 0 < segment.rows < 20
    assert verify_store(tmp_path / "s").ok  # the runs/ reports are not store damage


def test_a_rank_that_never_reports_makes_the_total_partial(tiny_bert: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", tiny_corpus(12, seed=64))
    args = (*precompute_args(tiny_bert, tmp_path / "s", folder), "--world-size", "3", "--job-id", "j2")
    result = invoke(*args, "--rank", "0", "--report-wait", "0.5")
    assert result.exit_code == 0, result.output
    assert "job j2: 1 of 3 ranks reported" in result.stdout and "PARTIAL: ranks [1, 2] did not report" in result.stdout


def test_cli_values_equal_a_direct_encode(tiny_bert: Path, tmp_path: Path) -> None:
    texts = tiny_corpus(16, seed=62)
    folder = write_beir(tmp_path / "beir", texts)
    assert invoke(*precompute_args(tiny_bert, tmp_path / "s", folder)).exit_code == 0
    got = TeacherStore.open(tmp_path / "s").get(content_keys("passage", texts)).astype(np.float32)
    np.testing.assert_allclose(got, direct(tiny_bert, texts, "passage"), atol=default_device_atol(), rtol=0)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", r"Error: No such file or folder '.*missing' \(beir: expects a BEIR folder"),
        ("no_corpus", r"Error: BEIR folder '.*no_corpus' has no corpus\.jsonl"),
        ("bad_kind", r"Error: Unknown source kind 'beirr' in 'beirr:.*'; kinds are beir, msmarco"),
    ],
)
def test_bad_sources_in_a_real_process(setup: str, message: str, tiny_bert: Path, tmp_path: Path) -> None:
    """The ``ddx`` executable: exit status 1 and one clean line (these fail before torch is even imported)."""
    folder = tmp_path / setup
    if setup == "no_corpus":
        folder.mkdir()
        (folder / "queries.jsonl").write_text('{"_id": "1", "text": "q"}\n')
    spec = f"beirr:{folder}" if setup == "bad_kind" else f"beir:{folder}"
    proc = subprocess.run(
        [DDX, "precompute-teacher", "--teacher", str(tiny_bert), "--store", str(tmp_path / "s"), "--data", spec],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert re.match(message, line), line
    assert not (tmp_path / "s").exists()  # nothing was created


def test_store_errors_are_one_line(tiny_bert: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", ["some passage"])
    assert invoke(*precompute_args(tiny_bert, tmp_path / "s", folder)).exit_code == 0
    other = CliRunner().invoke(cli, precompute_args(tiny_qwen2, tmp_path / "s", folder))
    assert other.exit_code == 1 and "Traceback" not in other.output
    assert other.stderr.startswith("Error: Store ") and "holds 32-d vectors" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    pooled = CliRunner().invoke(cli, [*precompute_args(tiny_bert, tmp_path / "s", folder), "--pooling", "max"])
    assert pooled.exit_code == 1 and "pooling: store has 'mean', requested 'max'" in pooled.stderr
    (tmp_path / "file").write_text("x")
    as_file = CliRunner().invoke(cli, precompute_args(tiny_bert, tmp_path / "file", folder))
    assert as_file.exit_code == 1 and "is a file, not a store directory" in as_file.stderr


def test_malformed_line_and_skip_bad(tiny_bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "beir"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text('{"_id": "1", "text": "ok"}\nnot json\n{"_id": "2", "text": "fine"}\n')
    bad = CliRunner().invoke(cli, precompute_args(tiny_bert, tmp_path / "s", folder))
    assert bad.exit_code == 1 and f"{folder}/corpus.jsonl:2: malformed JSON" in bad.stderr
    ok = invoke(*precompute_args(tiny_bert, tmp_path / "s", folder), "--skip-bad")
    assert ok.exit_code == 0 and "2 passages, 0 queries, 1 bad records skipped" in ok.stdout


def test_required_options_are_usage_errors() -> None:
    result = CliRunner().invoke(cli, ["precompute-teacher", "--store", "s", "--data", "beir:x"])
    assert result.exit_code == 2 and "Missing option '--teacher'" in result.stderr


# -- the real SciFact, end to end through the ddx executable -------------------------------------------------------


def test_scifact_end_to_end(tiny_bert: Path, shared_data: Path, tmp_path: Path) -> None:
    scifact, store = shared_data / "scifact", tmp_path / "store"
    proc = subprocess.run(
        [
            DDX,
            "precompute-teacher",
            "--teacher",
            str(tiny_bert),
            "--store",
            str(store),
            "--data",
            f"beir:{scifact}",
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)

    records = list(parse_source(f"beir:{scifact}").iter_texts())
    by_role = {role: [r for r in records if r.role == role] for role in ("passage", "query")}
    assert (len(by_role["passage"]), len(by_role["query"])) == (5183, 1109)
    s = TeacherStore.open(store)
    distinct = {}
    for role, recs in by_role.items():
        keys = content_keys(role, [r.text for r in recs])
        assert s.contains(keys).all()  # every id resolves to a stored vector
        assert np.isfinite(s.get(keys)).all()
        distinct[role] = len(np.unique(keys))
    # Every SciFact abstract is distinct (5,183 keys), but four claims appear twice under two ids each
    # (85/86 "Adult tissue-resident macrophages are seeded before birth.", 89/90, 870/871, 1291/1292):
    # 1,109 query ids, 1,105 distinct texts, hence 1,105 query keys. The store keeps one row per key.
    assert distinct == {"passage": DISTINCT_PASSAGES, "query": DISTINCT_QUERIES}
    assert (summary["texts_read"], summary["unique_texts"], summary["encoded"]) == (
        6292,
        DISTINCT_PASSAGES + DISTINCT_QUERIES,
        DISTINCT_PASSAGES + DISTINCT_QUERIES,
    )
    assert len(s) == s.rows == DISTINCT_PASSAGES + DISTINCT_QUERIES and s.index.duplicates == 0

    verify = subprocess.run([DDX, "cache", "verify", str(store)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.startswith("OK: 1 segments"), verify.stdout + verify.stderr


DISTINCT_PASSAGES = 5183
DISTINCT_QUERIES = 1105


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--job-id", "../../etc", r"--job-id '\.\./\.\./etc': use letters, digits"),
        ("--job-id", "a b", r"--job-id 'a b': use letters"),
        ("--report-wait", "-1", r"--report-wait must be >= 0 seconds"),
    ],
)
def test_bad_job_options_are_one_line(flag: str, value: str, message: str, tiny_bert: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", tiny_corpus(4, seed=65))
    result = invoke(*precompute_args(tiny_bert, tmp_path / "s", folder), "--world-size", "2", flag, value)
    assert result.exit_code == 1 and re.search(message, result.output), result.output
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_a_launchers_job_id_becomes_one_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from precompute.job_report import job_id

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "team/exp 1")
    assert job_id(None, "s", ("beir:x",), 2) == "torchrun-team_exp_1"
