"""``ddx train``: a config file under command-line flags, JSON on stdout, clean errors (CliRunner, real process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli
from tests.distill.conftest import N_PASSAGES, TRAIN_QUERIES, Corpus

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(path: Path, store: Path, corpus: Corpus, tiny_bert: Path, out: Path, **extra: object) -> Path:
    """A shared experiment file: a ``train:`` section (used by ``ddx train``) beside another command's section."""
    train = {
        "phase": 1,
        "store": str(store),
        "data": [corpus.spec],
        "out": str(out),
        "student": str(tiny_bert),
        "max-steps": 50,
        "batch_size": 8,
        "lr": 1e-3,
        "projection-lr": 1e-2,
        "warmup": 0,
        "device": "cpu",
        "num-workers": 0,
        "logging-steps": 1,
        "token-cache": str(path.parent / "tokens"),
        "progress": False,
        **extra,
    }
    path.write_text(yaml.safe_dump({"precompute-teacher": {"teacher": "x", "store": "y"}, "train": train}))
    return path


def test_config_file_with_flag_override_and_json(store: Path, corpus: Corpus, tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(tmp_path / "runs.yaml", store, corpus, tiny_bert, out)
    result = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--max-steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["steps"] == 3, "the --max-steps flag overrides the file's 50"
    assert payload["out"] == str(out) and payload["student_base"] == str(out / "student_base")
    assert payload["report"]["texts"] == N_PASSAGES + TRAIN_QUERIES
    run = json.loads((out / "ddx_run.json").read_text())["config"]
    assert run["max_steps"] == 3 and run["batch_size"] == 8 and run["lr"] == 1e-3 and run["data"] == [corpus.spec]


def test_human_summary(store: Path, corpus: Corpus, tiny_bert: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "runs.yaml", store, corpus, tiny_bert, tmp_path / "run", phase=1, max_steps=2)
    result = CliRunner().invoke(cli, ["train", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    first, *rest = result.stdout.splitlines()
    assert first.startswith(f"phase 1: 2 steps on {N_PASSAGES + TRAIN_QUERIES:,} examples, loss ")
    assert any(line.startswith("held out queries: 10") for line in (r.strip() for r in rest))
    assert f"student_base: {tmp_path / 'run' / 'student_base'}" in result.stdout


def test_library_error_is_one_clean_line(corpus: Corpus, tiny_bert: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--phase",
            "1",
            "--store",
            str(tmp_path / "nowhere"),
            "--data",
            corpus.spec,
            "--student",
            str(tiny_bert),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: No teacher store at") and "Traceback" not in result.output


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("phase = 1\nbogus_option = 3\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(cfg)])
    assert result.exit_code == 2 and "unknown option(s) ['bogus_option']" in result.output


def test_real_process_keeps_stdout_for_json(store: Path, corpus: Corpus, tiny_bert: Path, tmp_path: Path) -> None:
    """As a real ``ddx`` process with the progress bar on: the bar goes to stderr and stdout parses as JSON."""
    cfg = _config(tmp_path / "runs.yaml", store, corpus, tiny_bert, tmp_path / "run", progress=True)
    ddx = Path(sys.executable).with_name("ddx")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [str(ddx), "train", "--config", str(cfg), "--max-steps", "2", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 2
    assert "phase 1" in proc.stderr, "the progress bar is on stderr"
