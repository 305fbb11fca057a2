"""evaluate_retrieval and ``ddx evaluate``: every mode, metrics equal to an independent computation, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distill.evaluate.evaluate import EvalConfig, evaluate_retrieval
from precompute.sources.errors import BadSourceError
from storage.errors import FingerprintMismatchError, MissingVectorsError
from tests.distill.conftest import N_PASSAGES, TRAIN_QUERIES, copy_store

pytrec_eval = pytest.importorskip("pytrec_eval")

MEASURES = {"recall_10", "recall_100", "ndcg_cut_10", "map"}


def _config(run: str, store: Path, spec: str, tmp_path: Path, **overrides: object) -> EvalConfig:
    values = dict(
        model=run,
        store=str(store),
        data=(spec,),
        split="test",
        out=str(tmp_path / "eval"),
        device="cpu",
        k_values=(10, 100),
        progress=False,
    )
    values.update(overrides)
    return EvalConfig(**values)


def _pytrec(qrels: dict, run: dict) -> dict[str, float]:
    per_query = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    return {m: float(np.mean([v[m] for v in per_query.values()])) for m in MEASURES}


def test_every_mode_runs_and_teacher_metrics_match_pytrec_eval(phase2_run, teacher_store, corpus, tmp_path):
    from storage.keys import content_keys
    from storage.store import TeacherStore

    result = evaluate_retrieval(_config(phase2_run.out, teacher_store, corpus.spec, tmp_path))
    rows = {r["mode"]: r for r in result.rows}
    assert set(rows) == {"teacher", "student", "hybrid", "projected"}
    assert all(r["queries"] == 10 and r["passages"] == N_PASSAGES for r in rows.values())  # q30–q39 are test
    assert rows["teacher"]["mean_cos_to_teacher"] == 1.0 and rows["teacher"]["retained_nDCG@10"] == 100.0
    assert -1.0 <= rows["hybrid"]["mean_cos_to_teacher"] <= 1.0
    assert rows["hybrid"]["retained_nDCG@10"] == pytest.approx(
        100 * rows["hybrid"]["nDCG@10"] / rows["teacher"]["nDCG@10"], abs=0.01
    )
    # Independent run: teacher vectors straight from the store, cosine scores by numpy, every passage ranked.
    store = TeacherStore.open(teacher_store)
    test_q = sorted({q for q, _ in corpus.qrels["test"]})
    q_vec = store.get(content_keys("query", [corpus.queries[q] for q in test_q]), dtype="float32")
    pids = list(corpus.passages)
    p_vec = store.get(content_keys("passage", [corpus.passages[p] for p in pids]), dtype="float32")
    q_vec /= np.linalg.norm(q_vec, axis=1, keepdims=True)
    p_vec /= np.linalg.norm(p_vec, axis=1, keepdims=True)
    scores = q_vec @ p_vec.T
    run = {q: {p: float(s) for p, s in zip(pids, row, strict=True)} for q, row in zip(test_q, scores, strict=True)}
    qrels = {q: {d: 1 for qq, d in corpus.qrels["test"] if qq == q} for q in test_q}
    expected = _pytrec(qrels, run)
    teacher = rows["teacher"]
    assert teacher["nDCG@10"] == pytest.approx(expected["ndcg_cut_10"], abs=1e-6)
    assert teacher["Recall@10"] == pytest.approx(expected["recall_10"], abs=1e-6)
    assert teacher["MAP"] == pytest.approx(expected["map"], abs=1e-6)
    saved = json.loads(Path(result.files[0]).read_text())
    assert saved["rows"] == json.loads(json.dumps(result.rows))
    assert Path(result.files[1]).read_text().splitlines()[0].startswith("data,split,mode,")


def test_teacher_and_hybrid_modes_never_encode_the_corpus_with_the_student(
    phase2_run, teacher_store, corpus, tmp_path, monkeypatch
):
    """Both search stored teacher passages: at 8.8 M passages a student pass over the corpus is hours for nothing."""
    from distill.evaluate.inputs import Encoders

    encoded: list[tuple[str, int]] = []
    original = Encoders.student_vectors

    def recording(self, texts, role):  # the real encoder, with what it was asked to encode written down
        encoded.append((role, len(texts)))
        return original(self, texts, role)

    monkeypatch.setattr(Encoders, "student_vectors", recording)
    modes = ("teacher", "hybrid")
    both = evaluate_retrieval(_config(phase2_run.out, teacher_store, corpus.spec, tmp_path, modes=modes))
    assert [role for role, n in encoded if n] == ["query"]
    encoded.clear()
    every = evaluate_retrieval(_config(phase2_run.out, teacher_store, corpus.spec, tmp_path / "all"))
    assert ("passage", N_PASSAGES) in encoded  # the student and projected modes still encode it, once
    assert sum(n for role, n in encoded if role == "passage") == N_PASSAGES
    by_mode = {r["mode"]: r for r in every.rows}
    for row in both.rows:  # same numbers as when every mode runs
        assert row["nDCG@10"] == pytest.approx(by_mode[row["mode"]]["nDCG@10"], abs=1e-9)
        assert row["mean_cos_to_teacher"] == pytest.approx(by_mode[row["mode"]]["mean_cos_to_teacher"], abs=1e-6)


def test_saved_trec_runs_reproduce_the_reported_metrics(phase2_run, teacher_store, corpus, tmp_path):
    result = evaluate_retrieval(
        _config(
            phase2_run.out,
            teacher_store,
            corpus.spec,
            tmp_path,
            save_run=str(tmp_path / "runs"),
            modes=("student", "hybrid"),
        )
    )
    qrels = {q: {d: 1 for qq, d in corpus.qrels["test"] if qq == q} for q, _ in corpus.qrels["test"]}
    for row in result.rows:
        with open(tmp_path / "runs" / f"{corpus.folder.name}-test-{row['mode']}.trec") as f:
            run = pytrec_eval.parse_run(f)
        assert len(run) == 10 and all(len(docs) == N_PASSAGES for docs in run.values())
        expected = _pytrec(qrels, run)
        assert row["nDCG@10"] == pytest.approx(expected["ndcg_cut_10"], abs=1e-6)
        assert row["MAP"] == pytest.approx(expected["map"], abs=1e-6)


def test_plain_sentence_transformer_gets_student_mode_only(tiny_bert, teacher_store, corpus, tmp_path):
    result = evaluate_retrieval(_config(str(tiny_bert), teacher_store, corpus.spec, tmp_path, out=None))
    assert [r["mode"] for r in result.rows] == ["teacher", "student"]
    assert result.files == []


def test_unknown_judged_documents_warn_or_fail_under_strict(phase2_run, teacher_store, corpus, tmp_path):
    folder = tmp_path / "beir"
    shutil.copytree(corpus.folder, folder)
    with open(folder / "qrels" / "test.tsv", "a", newline="") as f:
        f.write("q30\tno-such-doc\t1\r\nq31\talso-missing\t2\r\n")
    spec = f"beir:{folder}"
    with pytest.warns(UserWarning, match="2 judged document ids are not in the corpus"):
        result = evaluate_retrieval(_config(phase2_run.out, teacher_store, spec, tmp_path, modes=("teacher",)))
    assert any("2 judged document ids" in n for n in result.notes)
    with pytest.raises(BadSourceError, match=r"2 judged document ids are not in the corpus; drop --strict"):
        evaluate_retrieval(_config(phase2_run.out, teacher_store, spec, tmp_path, strict=True))


def test_run_trained_against_another_store_is_refused(phase2_run, corpus, tiny_bert, tmp_path):
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    other = tmp_path / "bert-store"
    precompute(
        PrecomputeConfig(
            store=str(other), data=(corpus.spec,), teacher=TeacherConfig(model=str(tiny_bert)), progress=False
        )
    )
    with pytest.raises(FingerprintMismatchError, match="was trained against teacher fingerprint"):
        evaluate_retrieval(_config(phase2_run.out, other, corpus.spec, tmp_path))


def test_store_lacking_texts_names_the_command_and_teacher_fills_them(
    phase2_run, teacher_store, corpus, tiny_qwen2, tmp_path
):
    folder = tmp_path / "beir"
    shutil.copytree(corpus.folder, folder)
    with open(folder / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "new1", "title": "", "text": "A passage the teacher never saw."}) + "\n")
    store = copy_store(teacher_store, tmp_path / "store")
    spec = f"beir:{folder}"
    with pytest.raises(
        MissingVectorsError,
        match=r"lacks teacher vectors for 0 queries and 1 passages(.|\n)*"
        r"ddx precompute-teacher --teacher",
    ):
        evaluate_retrieval(_config(phase2_run.out, store, spec, tmp_path))
    result = evaluate_retrieval(
        _config(phase2_run.out, store, spec, tmp_path, teacher=str(tiny_qwen2), modes=("teacher", "hybrid"))
    )
    assert {r["passages"] for r in result.rows} == {N_PASSAGES + 1}


def test_empty_split_is_a_clear_error(phase2_run, teacher_store, corpus, tmp_path):
    with pytest.raises(BadSourceError, match=r"split 'dev' has no qrels \(splits with qrels: \['test', 'train'\]\)"):
        evaluate_retrieval(_config(phase2_run.out, teacher_store, corpus.spec, tmp_path, split="dev"))


def test_k_larger_than_the_corpus_ranks_everything(phase2_run, teacher_store, corpus, tmp_path):
    result = evaluate_retrieval(
        _config(phase2_run.out, teacher_store, corpus.spec, tmp_path, k_values=(10, 5000), modes=("teacher",))
    )
    assert result.rows[0]["Recall@5000"] == 1.0
    assert any(f"k=5000 is larger than the corpus ({N_PASSAGES} passages)" in n for n in result.notes)


def test_train_split_queries_evaluate_too(phase2_run, teacher_store, corpus, tmp_path):
    result = evaluate_retrieval(
        _config(phase2_run.out, teacher_store, corpus.spec, tmp_path, split="train", modes=("student",))
    )
    assert result.rows[0]["queries"] == TRAIN_QUERIES


def test_cli_prints_the_table_and_json(phase2_run, teacher_store, corpus, tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    args = [
        "evaluate",
        "--model",
        phase2_run.out,
        "--store",
        str(teacher_store),
        "--data",
        corpus.spec,
        "--k",
        "10,100",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "e"),
    ]
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0, table.output
    assert "hybrid" in table.output and "% teacher" in table.output
    as_json = CliRunner().invoke(cli, [*args, "--json", "--modes", "teacher,hybrid"])
    assert as_json.exit_code == 0, as_json.output
    assert [r["mode"] for r in json.loads(as_json.stdout)["rows"]] == ["teacher", "hybrid"]
    bad = CliRunner().invoke(cli, [*args, "--split", "dev"])
    assert bad.exit_code == 1 and "has no qrels" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_minilm_on_scifact_test_matches_the_published_ndcg(shared_data):
    """all-MiniLM-L6-v2 on SciFact test: nDCG@10 = 0.645 ± 0.002 (MTEB reports 64.51): loading, search and metrics."""
    from cli.offline_models import minilm_path

    result = evaluate_retrieval(
        EvalConfig(
            model=str(minilm_path()),
            data=(f"beir:{shared_data / 'scifact'}",),
            modes=("student",),
            device="cpu",
            progress=False,
        )
    )
    (row,) = result.rows
    assert row["queries"] == 300 and row["passages"] == 5183
    assert row["nDCG@10"] == pytest.approx(0.645, abs=0.002)
