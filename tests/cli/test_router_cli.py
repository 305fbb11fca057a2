"""``ddx router fit``, ``ddx evaluate --routed`` and ``ddx router export`` as real processes; bad input in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.distill.conftest import FAST, TRAIN_QUERIES, Corpus

ROOT = Path(__file__).resolve().parents[2]
DDX = str(Path(sys.executable).with_name("ddx"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, store: Path, corpus: Corpus, tiny_bert: Path) -> Path:
    from distill.train.config import TrainConfig
    from distill.train.run import train

    out = tmp_path_factory.mktemp("router-cli-run") / "run"
    train(
        TrainConfig(
            phase=1,
            store=str(store),
            data=(corpus.spec,),
            out=str(out),
            student=str(tiny_bert),
            token_cache=str(out.parent / "tokens"),
            max_steps=4,
            batch_size=8,
            **FAST,
        )
    )
    return out


def _ddx(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([DDX, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_fit_evaluate_export_as_real_processes(store, run, corpus, tiny_qwen2, tmp_path):
    router = tmp_path / "router"
    fit = _ddx(
        "router", "fit", "--store", str(store), "--model", str(run), "--data", corpus.spec, "--out", str(router),
        "--pool-size", "40", "--epochs", "5", "--device", "cpu", "--no-progress", "--json",
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert json.loads(fit.stdout)["queries"] == TRAIN_QUERIES and (router / "router.json").is_file()
    evaluate = _ddx(
        "evaluate", "--store", str(store), "--model", str(run), "--data", corpus.spec, "--routed", str(router),
        "--out", str(tmp_path / "eval"), "--k", "10,100", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "encoder@20%" in evaluate.stdout and "oracle@20%" in evaluate.stdout and "random@20%" in evaluate.stdout
    assert "reaches the teacher's nDCG@10 at teacher usage" in evaluate.stdout
    assert (tmp_path / "eval" / "routing-curve-test.png").is_file()
    export = _ddx(
        "router", "export", str(router), "--teacher", str(tiny_qwen2), "--teacher-usage", "0.2",
        "--out", str(tmp_path / "routed"),
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    assert "trust_remote_code=True" in export.stdout and (tmp_path / "routed" / "modules.json").is_file()


def test_fit_human_summary_and_bad_input_in_one_line(store, run, corpus, tiny_bert, tmp_path):
    router = tmp_path / "router"
    args = ["router", "fit", "--store", str(store), "--model", str(run), "--data", corpus.spec]
    result = CliRunner().invoke(cli, [*args, "--out", str(router), "--epochs", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"router fitted on {TRAIN_QUERIES} queries" in result.output and "encoder" in result.output
    bad = CliRunner().invoke(cli, ["router", "export", str(router), "--teacher", str(tiny_bert), "--out", "x"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert bad.output.startswith("Error: Teacher") and "does not match the store" in bad.output
    export = ["router", "export", str(router), "--teacher", "t", "--out", "x"]
    usage = CliRunner().invoke(cli, [*export, "--teacher-usage", "2"])
    assert usage.exit_code == 1 and "Teacher usage must be a fraction in [0, 1]" in usage.output
    missing = CliRunner().invoke(cli, ["evaluate", "--store", str(store), "--model", str(run), "--data", corpus.spec,
                                       "--routed", str(tmp_path / "nowhere")])  # fmt: skip
    assert missing.exit_code == 1 and "No fitted router at" in missing.output and "ddx router fit" in missing.output
