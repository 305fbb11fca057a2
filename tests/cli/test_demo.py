"""``ddx demo``: the four stages end to end (tiny models on a tiny corpus), the reuse run, the built-in corpus."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_demo_runs_every_stage_then_reuses_the_store(tmp_path, tiny_qwen2, tiny_bert):
    corpus = make_corpus(tmp_path / "corpus").folder
    args = _demo_args(tmp_path / "work", corpus, tiny_qwen2, tiny_bert)
    first = CliRunner().invoke(cli, [*args, "--json"])
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert result["teacher_encoded"] == 140  # 100 passages + 40 queries, all new
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["teacher", "student", "hybrid", "projected", "student (untrained)"]
    assert all(0.0 <= r["nDCG@10"] <= 1.0 for r in result["rows"])
    for key in ("student_base", "projection_layer", "hybrid_model", "store", "results"):
        assert Path(result["paths"][key]).exists(), key
    assert set(result["seconds"]) == {"precompute", "phase1", "phase2", "evaluate"}

    second = CliRunner().invoke(cli, args)  # the human-readable table, second time round
    assert second.exit_code == 0, second.output
    assert "the teacher encoded nothing this run: every teacher vector came from the store" in second.stdout
    assert "teacher encoded 0 texts; 140 already in the store" in second.stderr
    for word in ("hybrid", "projected", "student_base:", "projection_layer:", "hybrid_model:", "store:"):
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
