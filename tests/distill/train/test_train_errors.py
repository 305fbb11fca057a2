"""Bad input stops training before any step, with an error that names the file or source and says how to fix it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distill.model.model import StudentModelWithProjection
from distill.model.projection import ProjectionLayer
from distill.model.run_file import RUN_FILE
from distill.train.run import train
from precompute.sources.errors import BadSourceError
from storage.errors import (
    DdxError,
    DimensionMismatchError,
    FingerprintMismatchError,
    MissingVectorsError,
)
from storage.store import TeacherStore
from tests.distill.conftest import N_PASSAGES, N_QUERIES, TRAIN_QUERIES, Corpus, copy_store, write_beir


def _variant(
    corpus: Corpus,
    folder: Path,
    *,
    passages: dict[str, str] | None = None,
    queries: dict[str, str] | None = None,
    train: list[tuple[str, str]] | None = None,
    negatives: dict[str, list[str]] | None = None,
) -> str:
    """The fixture corpus plus extra passages, queries, train judgments or hard negatives; returns its spec."""
    write_beir(
        folder,
        {**corpus.passages, **(passages or {})},
        {**corpus.queries, **(queries or {})},
        {"train": corpus.qrels["train"] + (train or []), "test": corpus.qrels["test"]},
        {**corpus.negatives, **(negatives or {})},
    )
    return f"beir:{folder}"


def test_store_of_another_teacher_than_expected(config) -> None:
    with pytest.raises(
        FingerprintMismatchError,
        match=r"holds vectors of teacher '.*tiny-qwen2'.*expects "
        r"'Alibaba-NLP/gte-Qwen2-7B-instruct'.*--expect-teacher",
    ):
        train(config(expect_teacher="Alibaba-NLP/gte-Qwen2-7B-instruct"))


def test_expected_teacher_accepted(config, tiny_qwen2: Path) -> None:
    assert train(config(expect_teacher=str(tiny_qwen2), max_steps=1)).steps == 1


def test_init_run_with_projection_to_another_dim(config, tiny_bert: Path, teacher_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run40"
    StudentModelWithProjection.from_pretrained(str(tiny_bert), 40, device="cpu").save(run, teacher_normalize=True)
    store = TeacherStore.open(teacher_store)
    (run / RUN_FILE).write_text(json.dumps({"store_fingerprint": store.fingerprint, "teacher_spec": {}}))
    with pytest.raises(
        DimensionMismatchError,
        match=rf"projection of '{re.escape(str(run))}' outputs 40-d vectors "
        r"but store .* holds 48-d .*--student alone",
    ):
        train(config(phase=2, init=str(run), student=None))


def test_init_run_whose_projection_does_not_fit_its_student(
    config, tiny_bert: Path, teacher_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "mismatched"
    StudentModelWithProjection.from_pretrained(str(tiny_bert), 48, device="cpu").save(run, teacher_normalize=True)
    ProjectionLayer(student_dim=24, teacher_dim=48).save(run)
    fingerprint = TeacherStore.open(teacher_store).fingerprint
    (run / RUN_FILE).write_text(json.dumps({"store_fingerprint": fingerprint, "teacher_spec": {}}))
    with pytest.raises(DimensionMismatchError, match=r"student emits 32-d embeddings but the projection expects 24-d"):
        train(config(phase=2, init=str(run), student=None))


def test_init_run_trained_against_another_store(config, corpus: Corpus, tiny_qwen2: Path, tmp_path: Path) -> None:
    """A real phase-1 run against a second store (same model, normalization off: another fingerprint, same dim)."""
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    small = write_beir(tmp_path / "small", dict(list(corpus.passages.items())[:12]), {}, {})
    other = tmp_path / "other-store"
    precompute(
        PrecomputeConfig(
            store=str(other),
            data=(f"beir:{small}",),
            progress=False,
            teacher=TeacherConfig(model=str(tiny_qwen2), device="cpu", normalize=False),
        )
    )
    run = tmp_path / "other-run"
    train(config(store=str(other), data=(f"beir:{small}",), out=str(run), max_steps=1))
    with pytest.raises(
        FingerprintMismatchError,
        match=rf"Run '{re.escape(str(run))}' was trained against teacher "
        rf"fingerprint {TeacherStore.open(other).fingerprint}.*Use the store the run was trained with",
    ):
        train(config(phase=2, init=str(run), student=None))


def test_init_folder_that_is_not_a_run(config, tmp_path: Path) -> None:
    with pytest.raises(DdxError, match=r"is not a finished ddx run \(ddx_run.json missing"):
        train(config(phase=2, init=str(tmp_path), student=None))


def test_no_examples_in_split(config, corpus: Corpus) -> None:
    with pytest.raises(
        DdxError,
        match=rf"No phase-2 examples left from \['{re.escape(corpus.spec)}'\] \(split "
        r"'dev'\): check that the data has queries with judged positives",
    ):
        train(config(phase=2, split="dev"))


def test_nothing_left_after_dropping_missing_vectors(config, corpus: Corpus, tmp_path: Path) -> None:
    """Every text is new to the store; allow_missing drops them all, and then there is nothing to train on."""
    folder = write_beir(
        tmp_path / "new", {"n1": "zebra quartz river"}, {"m1": "what zebra?"}, {"train": [("m1", "n1")]}
    )
    with pytest.raises(DdxError, match=r"No texts to train on from \['beir:.*new'\]"):
        train(config(data=(f"beir:{folder}",), allow_missing=True))
    with pytest.raises(DdxError, match=r"No phase-2 examples left from \['beir:.*new'\]"):
        train(config(phase=2, data=(f"beir:{folder}",), allow_missing=True))


def test_hard_negatives_with_unknown_ids(config, corpus: Corpus, tmp_path: Path) -> None:
    spec = _variant(corpus, tmp_path / "ghosts", negatives={"q0": ["ghost1", "ghost2", "d5"], "q2": ["ghost3"]})
    with pytest.raises(
        BadSourceError,
        match=rf"{re.escape(spec)}: training examples reference 3 ids that no --data "
        r"source defines\. Add the collection .* or pass --skip-bad",
    ):
        train(config(phase=2, data=(spec,)))
    result = train(config(phase=2, data=(spec,), skip_bad=True, max_steps=2))
    assert result.report["unknown_ids"] == {spec: 3} and result.report["no_positive"] == {}
    assert result.report["examples"] == TRAIN_QUERIES, "only the unknown ids are dropped, not their queries"


def test_hard_negatives_file_with_unknown_ids_is_named(config, corpus: Corpus, tmp_path: Path) -> None:
    """A ``--hard-negatives`` file (sentence-transformers' MS MARCO format) is a source of its own: it is named."""
    path = tmp_path / "my-hard-negatives.jsonl"
    lines = [
        {"qid": "q0", "pos": ["d0"], "neg": {"bm25": ["d1", "nope-1"], "ce": ["nope-2"]}},
        {"qid": "q1", "pos": [corpus.qrels["train"][2][1]], "neg": {"bm25": ["d3"]}},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(BadSourceError, match=rf"msmarco:{re.escape(str(path))}: training examples reference 2 ids"):
        train(config(phase=2, hard_negatives=(str(path),)))
    result = train(config(phase=2, hard_negatives=(str(path),), skip_bad=True, max_steps=1))
    assert result.report["unknown_ids"] == {f"msmarco:{path}": 2}


def test_query_without_a_known_positive(config, corpus: Corpus, tmp_path: Path) -> None:
    spec = _variant(
        corpus, tmp_path / "nopos", queries={"q99": "where is the missing passage?"}, train=[("q99", "d-missing")]
    )
    with pytest.raises(
        BadSourceError,
        match=rf"{re.escape(spec)}: training examples reference 1 ids that no --data "
        r"source defines and 1 queries without a known positive.*--skip-bad",
    ):
        train(config(phase=2, data=(spec,)))
    result = train(config(phase=2, data=(spec,), skip_bad=True, max_steps=1))
    assert result.report["no_positive"] == {spec: 1} and result.report["examples"] == TRAIN_QUERIES


NEW_PASSAGES = {
    "new1": "A zebra walked to the river city.",
    "new2": "Quartz crystals grow in the lung of the king.",
    "new3": "The coach of the team is born in the first year.",
}
NEW_QUERIES = {"nq1": "where did the zebra walk?", "nq2": "who is the coach?"}


def _missing_spec(corpus: Corpus, tmp_path: Path) -> str:
    return _variant(
        corpus, tmp_path / "grown", passages=NEW_PASSAGES, queries=NEW_QUERIES, train=[("nq1", "new1"), ("nq2", "new3")]
    )


def test_missing_vectors_message_command_reproduces_the_store(
    config, corpus: Corpus, teacher_store: Path, tmp_path: Path
) -> None:
    """The message's ``ddx precompute-teacher`` command, run as printed, fills exactly the gap in *this* store:
    if it described the teacher differently (prompt, pooling, dtype, ...), the store would refuse it with a
    fingerprint error, so a successful run proves the command reproduces the store's fingerprint."""
    store = copy_store(teacher_store, tmp_path / "store")
    spec = _missing_spec(corpus, tmp_path)
    with pytest.raises(MissingVectorsError) as info:
        train(config(phase=2, store=str(store), data=(spec,)))
    message = str(info.value)
    # Phase 2 needs the training queries, their positives and their hard negatives; new2 is in no example.
    passages = {d for _, d in corpus.qrels["train"]} | {n for negs in corpus.negatives.values() for n in negs}
    total = TRAIN_QUERIES + len(NEW_QUERIES) + len(passages) + 2
    assert f"4 of {total} texts this run needs have no teacher vector in {str(store)!r} (4 from {spec})" in message
    assert "--allow-missing" in message
    command = re.search(r"add them with:\n  (ddx precompute-teacher .*?)\nor pass --allow-missing", message, re.S)
    assert command is not None, message
    argv = shlex.split(command.group(1))
    assert argv[argv.index("--store") + 1] == str(store) and argv[argv.index("--data") + 1] == spec

    ddx = Path(sys.executable).with_name("ddx")
    proc = subprocess.run(
        [str(ddx), *argv[1:], "--no-progress", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["encoded"] == 5 and summary["fingerprint"] == TeacherStore.open(teacher_store).fingerprint
    assert len(TeacherStore.open(store)) == N_PASSAGES + N_QUERIES + 5

    result = train(config(phase=2, store=str(store), data=(spec,), max_steps=2))
    assert result.steps == 2 and result.report["missing_vectors"] == 0
    assert result.report["examples"] == TRAIN_QUERIES + 2


def test_missing_vectors_phase1_names_count_and_source(config, corpus: Corpus, tmp_path: Path) -> None:
    spec = _missing_spec(corpus, tmp_path)
    # Phase 1 needs every text except the test-only queries: the 3 new passages and 2 new (train) queries lack vectors.
    with pytest.raises(
        MissingVectorsError,
        match=rf"5 of {N_PASSAGES + TRAIN_QUERIES + 5} texts .* \(5 from "
        rf"{re.escape(spec)}\)\. The teacher never runs during training; add them with:\n  "
        r"ddx precompute-teacher --teacher",
    ):
        train(config(data=(spec,)))


def test_allow_missing_drops_and_reports(config, corpus: Corpus, tmp_path: Path) -> None:
    spec = _missing_spec(corpus, tmp_path)
    p2 = train(config(phase=2, data=(spec,), allow_missing=True, max_steps=2))
    assert p2.report["missing_vectors"] == 4, "nq1, nq2, new1, new3 (new2 is in no example)"
    assert p2.report["dropped_missing"] == 2 and p2.report["examples"] == TRAIN_QUERIES
    p1 = train(config(data=(spec,), allow_missing=True, max_steps=2, out=str(tmp_path / "p1")))
    assert p1.report["missing_vectors"] == 5 and p1.report["texts"] == N_PASSAGES + TRAIN_QUERIES


def test_store_missing(config, tmp_path: Path) -> None:
    with pytest.raises(DdxError, match=r"No teacher store at"):
        train(config(store=str(tmp_path / "nowhere")))


# -- data errors come before the student's weights load (seconds, not the minutes a large student takes) -----------


class StudentLoaded(AssertionError):
    """Raised by :func:`student_loads` when anything loads a sentence-transformer."""


@pytest.fixture
def student_loads() -> Iterator[list[str]]:
    """Every SentenceTransformer load (the student's weights) is recorded and refused; yields the record."""
    from sentence_transformers import SentenceTransformer

    loads: list[str] = []

    def refuse(self: Any, model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> None:
        loads.append(str(model_name_or_path))
        raise StudentLoaded(f"a model loaded before the data was checked: {model_name_or_path}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SentenceTransformer, "__init__", refuse)
        yield loads


@pytest.mark.parametrize("phase", [1, 2])
def test_missing_vectors_stop_the_run_before_the_student_loads(
    config, corpus: Corpus, phase1_run, tmp_path: Path, student_loads: list[str], phase: int
) -> None:
    spec = _missing_spec(corpus, tmp_path)
    start = {"student": None, "init": phase1_run.out} if phase == 2 else {}
    with pytest.raises(MissingVectorsError, match=r"texts this run needs have no teacher vector"):
        train(config(phase=phase, data=(spec,), **start))
    assert student_loads == []


def test_bad_examples_stop_the_run_before_the_student_loads(
    config, corpus: Corpus, phase1_run, tmp_path: Path, student_loads: list[str]
) -> None:
    spec = _variant(corpus, tmp_path / "ghosts", negatives={"q0": ["ghost1"]})
    with pytest.raises(BadSourceError, match=r"training examples reference 1 ids that no --data source defines"):
        train(config(phase=2, data=(spec,), init=phase1_run.out, student=None))
    with pytest.raises(DdxError, match=r"No phase-2 examples left"):
        train(config(phase=2, split="dev", init=phase1_run.out, student=None))
    assert student_loads == []


def test_unreadable_data_stops_the_run_before_the_student_loads(
    config, tmp_path: Path, student_loads: list[str]
) -> None:
    with pytest.raises(BadSourceError):
        train(config(data=(f"beir:{tmp_path / 'no-such-folder'}",)))
    assert student_loads == []
