"""``ddx train --projection none --teacher-dims D`` then ``ddx evaluate``, as real processes; bad input as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.distill.conftest import STUDENT_DIM, TEACHER_DIM, Corpus

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_args(store: Path, corpus: Corpus, tiny_bert: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--phase",
        "1",
        "--store",
        str(store),
        "--data",
        corpus.spec,
        "--student",
        str(tiny_bert),
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
        "--token-cache",
        str(out.parent / "tokens"),
        *extra,
    ]


def _ddx(*args: str) -> subprocess.CompletedProcess[str]:
    ddx = Path(sys.executable).with_name("ddx")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(ddx), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_train_then_evaluate_as_real_processes(store: Path, corpus: Corpus, tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "mrl"
    proc = _ddx(*_train_args(store, corpus, tiny_bert, out, "--projection", "none", "--teacher-dims", "32", "--json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["report"]["teacher_dims"] == STUDENT_DIM
    assert "projection warm start skipped: --projection none has no projection to fit" in proc.stderr
    run = json.loads((out / "ddx_run.json").read_text())
    assert (run["projection"], run["teacher_dims"]) == ("none", STUDENT_DIM)
    proc = _ddx(
        "evaluate",
        *("--store", str(store), "--model", str(out), "--data", corpus.spec, "--split", "test"),
        *("--device", "cpu", "--k", "10", "--no-progress", "--json"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert [r["mode"] for r in result["rows"]] == ["teacher", "student", "hybrid"]
    assert any(f"first {STUDENT_DIM} dims" in note for note in result["notes"])


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--teacher-dims", "0"], 2, "Invalid value for '--teacher-dims': 0 is not in the range x>=1."),
        (["--teacher-dims", "8"], 1, "Error: --teacher-dims 8 applies to --projection none"),
        (
            ["--projection", "none", "--teacher-dims", "64"],
            1,
            f"Error: --teacher-dims 64 is more than the teacher's {TEACHER_DIM} dims",
        ),
        (
            ["--projection", "none", "--teacher-dims", "16"],
            1,
            f"Error: --teacher-dims 16 does not match the student's {STUDENT_DIM}-d embeddings",
        ),
    ],
)
def test_bad_input_is_one_line(
    extra: list[str], code: int, message: str, store: Path, corpus: Corpus, tiny_bert: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(cli, _train_args(store, corpus, tiny_bert, tmp_path / "o", *extra))
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    if code == 1:  # the error is one line (loading the student may print progress to stderr before it)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1], result.output
        assert errors[0].rstrip().endswith((".", "--teacher-dims.")), result.output
