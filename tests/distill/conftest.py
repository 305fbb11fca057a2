"""Training fixtures: a small BEIR corpus, its teacher store (tiny Qwen2, 48-d) and short trained runs.

The corpus is built so its facts are known: 100 passages, 40 queries (q0–q29 judged in ``train``, q30–q39 only in
``test``), one or two positives per training query (q28 and q29 share a positive with q0 and q1, so the batch
sampler has duplicate positives to keep apart), and a ``hard_negatives.jsonl`` giving 0–6 negatives per query
(variable counts reach ``phase2_collate_fn``). The teacher store is built once per session; tests never write to it
(a test that needs to add vectors copies it first).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_models import WORDS, tiny_corpus

N_PASSAGES = 100
N_QUERIES = 40
TRAIN_QUERIES = 30
TEACHER_DIM = 48
STUDENT_DIM = 32

# Settings that make a few dozen CPU steps of a random tiny student learn reliably: large learning rates (the
# student is random, not pretrained), no warmup, one log record per step (the loss-falls tests read them all).
# Measured over three tiny-BERT builds (their WordPiece vocabularies differ): phase 1 ends at 0.46-0.47 of its first
# steps' loss, phase 2 at 0.31-0.47.
FAST = dict(
    device="cpu",
    num_workers=0,
    progress=False,
    logging_steps=1,
    warmup=0,
    lr=3e-3,
    projection_lr=3e-3,
    seed=7,
    save_steps=10_000,
)


@dataclass(frozen=True)
class Corpus:
    """A BEIR folder and what it holds (ids → texts, judged pairs, hard negatives)."""

    folder: Path
    passages: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, list[tuple[str, str]]]
    negatives: dict[str, list[str]]

    @property
    def spec(self) -> str:
        return f"beir:{self.folder}"


def write_beir(
    folder: Path,
    passages: dict[str, str],
    queries: dict[str, str],
    qrels: dict[str, list[tuple[str, str]]],
    negatives: dict[str, list[str]] | None = None,
) -> Path:
    """Write a BEIR folder (CRLF qrels with a header, as the real files have)."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for pid, text in passages.items():
            f.write(json.dumps({"_id": pid, "title": "", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    for split, pairs in qrels.items():
        with open(folder / "qrels" / f"{split}.tsv", "w", newline="") as f:
            f.write("query-id\tcorpus-id\tscore\r\n")
            f.writelines(f"{q}\t{d}\t1\r\n" for q, d in pairs)
    if negatives is not None:
        with open(folder / "hard_negatives.jsonl", "w") as f:
            for qid, negs in negatives.items():
                f.write(json.dumps({"query-id": qid, "pos": [], "neg": negs}) + "\n")
    return folder


def make_corpus(folder: Path, seed: int = 0) -> Corpus:
    """The fixture corpus described in the module docstring (deterministic)."""
    rng = random.Random(seed)
    passages = {f"d{i}": text for i, text in enumerate(tiny_corpus(N_PASSAGES, seed=seed + 11))}
    positives: dict[str, list[str]] = {}
    for q in range(N_QUERIES):
        positives[f"q{q}"] = [f"d{i}" for i in rng.sample(range(N_PASSAGES), 2 if q % 3 == 0 else 1)]
    positives["q28"] = [positives["q0"][0]]
    positives["q29"] = [positives["q1"][0]]
    queries = {}
    for qid, pos in positives.items():
        words = passages[pos[0]].rstrip(".").lower().split()
        picked = [*rng.sample(words, min(4, len(words))), rng.choice(WORDS[60:])]
        queries[qid] = " ".join(picked) + "?"
    qrels = {
        "train": [(q, d) for q in list(positives)[:TRAIN_QUERIES] for d in positives[q]],
        "test": [(q, d) for q in list(positives)[TRAIN_QUERIES:] for d in positives[q]],
    }
    negatives = {}
    for q in list(positives)[:TRAIN_QUERIES]:
        pool = [p for p in passages if p not in positives[q]]
        negatives[q] = rng.sample(pool, rng.choice([0, 1, 2, 3, 6]))
    write_beir(folder, passages, queries, qrels, negatives)
    return Corpus(folder, passages, queries, qrels, negatives)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second OpenMP thread that
    competes with other processes made steps 2-3x slower (measured: 24.5 s vs 11.7 s for 12 phase-2 steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("data") / "fixture-beir")


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, tiny_qwen2: Path) -> Path:
    """Every text of ``corpus`` encoded by tiny Qwen2 (48-d). Read-only for tests: copy it to add vectors."""
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    store = tmp_path_factory.mktemp("stores") / "qwen-store"
    summary = precompute(
        PrecomputeConfig(
            store=str(store),
            data=(corpus.spec,),
            teacher=TeacherConfig(model=str(tiny_qwen2), device="cpu"),
            progress=False,
        )
    )
    assert summary.encoded == N_PASSAGES + N_QUERIES
    return store


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture
def config(teacher_store: Path, corpus: Corpus, tiny_bert: Path, token_cache: Path, tmp_path: Path):
    """``config(**overrides)`` → a fast TrainConfig on the fixture corpus and store (out under tmp_path)."""
    from distill.train.config import TrainConfig

    def make(**overrides: Any) -> TrainConfig:
        values: dict[str, Any] = dict(
            phase=1,
            store=str(teacher_store),
            data=(corpus.spec,),
            out=str(tmp_path / "run"),
            student=str(tiny_bert),
            token_cache=str(token_cache),
            max_steps=4,
            batch_size=8,
            **FAST,
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make


@dataclass
class TrainedRun:
    """A finished run: what ``train`` returned and the in-memory model it saved (to compare reloads against)."""

    result: Any
    model: Any

    @property
    def out(self) -> str:
        return self.result.out


def train_keeping_model(config: Any) -> TrainedRun:
    """``train(config)``, also keeping the trained model object that ``StudentModelWithProjection.save`` wrote."""
    from distill.model.model import StudentModelWithProjection
    from distill.train.run import train

    saved: list[Any] = []
    original = StudentModelWithProjection.save

    def save(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved.append(self)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StudentModelWithProjection, "save", save)
        result = train(config)
    assert len(saved) == 1, "a single-process run writes its run folder exactly once"
    return TrainedRun(result, saved[0].eval())


@pytest.fixture(scope="session")
def phase1_run(
    tmp_path_factory: pytest.TempPathFactory, teacher_store: Path, corpus: Corpus, tiny_bert: Path, token_cache: Path
) -> TrainedRun:
    """A 24-step phase-1 run on the fixture (student tiny BERT 32-d → projection 32 → 64 → 48).

    The projection starts random (not ridge-fitted), so the loss curve shows what training itself does.
    """
    from distill.train.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "phase1"
    return train_keeping_model(
        TrainConfig(
            phase=1,
            store=str(teacher_store),
            data=(corpus.spec,),
            out=str(out),
            student=str(tiny_bert),
            token_cache=str(token_cache),
            max_steps=24,
            batch_size=16,
            projection_init="random",
            **FAST,
        )
    )


@pytest.fixture(scope="session")
def phase2_run(
    tmp_path_factory: pytest.TempPathFactory,
    teacher_store: Path,
    corpus: Corpus,
    phase1_run: TrainedRun,
    token_cache: Path,
) -> TrainedRun:
    """A 24-step phase-2 run from ``phase1_run`` (hard negatives from the file plus 2 mined per query)."""
    from distill.train.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "phase2"
    return train_keeping_model(
        TrainConfig(
            phase=2,
            store=str(teacher_store),
            data=(corpus.spec,),
            out=str(out),
            init=phase1_run.out,
            token_cache=str(token_cache),
            max_steps=24,
            batch_size=8,
            num_negatives=3,
            mine_negatives=2,
            mine_margin=0.999,
            temperature=0.1,
            **FAST,
        )
    )


@pytest.fixture(scope="session")
def mrl_phase1_run(
    tmp_path_factory: pytest.TempPathFactory, teacher_store: Path, corpus: Corpus, tiny_bert: Path, token_cache: Path
) -> TrainedRun:
    """A 16-step phase-1 run with ``--projection none``: tiny BERT's own 32-d output against the teacher's first 32
    of 48 dims, renormalised (no projection, no warm start)."""
    from distill.train.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "mrl-phase1"
    return train_keeping_model(
        TrainConfig(
            phase=1,
            store=str(teacher_store),
            data=(corpus.spec,),
            out=str(out),
            student=str(tiny_bert),
            token_cache=str(token_cache),
            projection="none",
            teacher_dims=STUDENT_DIM,
            max_steps=16,
            batch_size=16,
            **FAST,
        )
    )


@pytest.fixture(scope="session")
def mrl_phase2_run(
    tmp_path_factory: pytest.TempPathFactory,
    teacher_store: Path,
    corpus: Corpus,
    mrl_phase1_run: TrainedRun,
    token_cache: Path,
) -> TrainedRun:
    """A 32-step phase-2 run from ``mrl_phase1_run`` (``--projection none``, D from the run), the cached
    (GradCache) step with mini-batches of 4. Its loss ends at ~0.5 of its first steps' (16 steps: ~0.95; the
    loss is noisy from batch to batch, 4 batches an epoch)."""
    from distill.train.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "mrl-phase2"
    return train_keeping_model(
        TrainConfig(
            phase=2,
            store=str(teacher_store),
            data=(corpus.spec,),
            out=str(out),
            init=mrl_phase1_run.out,
            token_cache=str(token_cache),
            projection="none",
            max_steps=32,
            batch_size=8,
            num_negatives=3,
            mine_negatives=2,
            mine_margin=0.999,
            temperature=0.1,
            mini_batch_size=4,
            **FAST,
        )
    )


def log_losses(run_dir: str | Path) -> list[float]:
    """The ``loss`` of every step record of ``train_log.jsonl`` (the summary record at the end has none)."""
    records = [json.loads(line) for line in Path(run_dir, "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def copy_store(store: Path, target: Path) -> Path:
    shutil.copytree(store, target)
    return target


class TeacherCalled(AssertionError):
    """Raised by :func:`forbid_teacher` when anything runs the teacher."""


@contextmanager
def forbid_teacher(teacher_dir: Path) -> Iterator[list[str]]:
    """Make every way of running the teacher raise :class:`TeacherCalled`; yields the list of attempts.

    Four independent tripwires, so that a teacher call is caught whatever path it takes:
    ``load_teacher`` (in its module and where precompute imported it), ``TeacherEncoder.encode``,
    ``SentenceTransformer.encode`` of a Qwen2 model, and — the catch-alls — loading any SentenceTransformer from
    the teacher's folder, or a forward pass of ``Qwen2Model`` (the teacher's architecture; the student is BERT).
    Attempts are also recorded, so a caller that swallowed the exception is still caught by the list.
    """
    from sentence_transformers import SentenceTransformer
    from transformers import Qwen2Model

    import precompute.pipeline
    import precompute.teacher

    calls: list[str] = []
    teacher = str(Path(teacher_dir).resolve())

    def trip(what: str) -> None:
        calls.append(what)
        raise TeacherCalled(f"the teacher ran during training: {what}")

    original_init, original_encode = SentenceTransformer.__init__, SentenceTransformer.encode

    def guarded_init(self: Any, model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> None:
        if model_name_or_path is not None and str(Path(str(model_name_or_path)).resolve()) == teacher:
            trip(f"SentenceTransformer({model_name_or_path!r})")
        original_init(self, model_name_or_path, *args, **kwargs)

    def guarded_encode(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Only the teacher's encode is forbidden: sentence-transformers' own save() encodes a sample sentence with
        # the *student* for its model card, and that is no teacher run.
        if any(isinstance(m, Qwen2Model) for m in self.modules()):
            trip("SentenceTransformer.encode of the teacher")
        return original_encode(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(precompute.teacher, "load_teacher", lambda *a, **k: trip("load_teacher"))
        mp.setattr(precompute.pipeline, "load_teacher", lambda *a, **k: trip("load_teacher"))
        mp.setattr(precompute.teacher.TeacherEncoder, "encode", lambda *a, **k: trip("TeacherEncoder.encode"))
        mp.setattr(precompute.teacher.TeacherEncoder, "launch", lambda *a, **k: trip("TeacherEncoder.launch"))
        mp.setattr(SentenceTransformer, "encode", guarded_encode)
        mp.setattr(SentenceTransformer, "__init__", guarded_init)
        mp.setattr(Qwen2Model, "forward", lambda *a, **k: trip("Qwen2Model.forward"))
        yield calls
    finally:
        mp.undo()


def fit_tiny_router(
    phase1_run: Any, teacher_store: Path, corpus: Corpus, tmp_path_factory: pytest.TempPathFactory, **overrides: Any
) -> str:
    """A router fitted on the tiny phase-1 run and store (small pool, few epochs, CPU); returns its folder."""
    from distill.route.fit import RouterConfig, fit_router

    values: dict[str, Any] = {
        "store": str(teacher_store),
        "model": phase1_run.out,
        "data": (corpus.spec,),
        "out": str(tmp_path_factory.mktemp("router") / "router"),
        "pool_size": 40,
        "epochs": 10,
        "device": "cpu",
        "progress": False,
    }
    return fit_router(RouterConfig(**{**values, **overrides})).out
