"""Phase 1 then phase 2 on real data (SciFact, HotpotQA, MS MARCO triples) with tiny models: the losses fall.

SciFact is subsampled into a smaller BEIR copy under tmp (its judged training queries and their positives, a few
test queries, and random other abstracts), and HotpotQA to its first questions (saved as a ``train`` file), so the
tiny-Qwen2 precompute stays short. The MS MARCO toy triples are read in place.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from statistics import mean

import pytest

from tests.distill.conftest import FAST, log_losses

pytestmark = pytest.mark.slow

SCIFACT_TRAIN_QUERIES = 120
SCIFACT_EXTRA_PASSAGES = 300
HOTPOT_QUESTIONS = 60


def _read_qrels(path: Path) -> list[tuple[str, str, str]]:
    rows = [line.rstrip("\r\n").split("\t") for line in path.read_text().splitlines()]
    return [(q, d, s) for q, d, s in rows if q != "query-id"]


def _subsample_scifact(src: Path, dst: Path) -> dict[str, int]:
    rng = random.Random(0)
    train = _read_qrels(src / "qrels" / "train.tsv")
    test = _read_qrels(src / "qrels" / "test.tsv")
    train_queries = sorted({q for q, _, _ in train})[:SCIFACT_TRAIN_QUERIES]
    test_queries = sorted({q for q, _, _ in test})[:20]
    train = [r for r in train if r[0] in set(train_queries)]
    test = [r for r in test if r[0] in set(test_queries)]
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").read_text().splitlines()]
    judged = {d for _, d, _ in train + test}
    others = [doc["_id"] for doc in corpus if doc["_id"] not in judged]
    keep = judged | set(rng.sample(others, SCIFACT_EXTRA_PASSAGES))
    (dst / "qrels").mkdir(parents=True)
    (dst / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus if d["_id"] in keep))
    wanted = set(train_queries) | set(test_queries)
    queries = [line for line in (src / "queries.jsonl").read_text().splitlines() if json.loads(line)["_id"] in wanted]
    (dst / "queries.jsonl").write_text("\n".join(queries) + "\n")
    for name, rows in (("train", train), ("test", test)):
        (dst / "qrels" / f"{name}.tsv").write_text(
            "query-id\tcorpus-id\tscore\r\n" + "".join(f"{q}\t{d}\t{s}\r\n" for q, d, s in rows)
        )
    return {"train_queries": len(train_queries), "passages": len(keep)}


def _fixed_batch_loss(
    run: str, store_path: Path, data: tuple[str, ...], token_cache: Path, batches: int = 8, batch_size: int = 16
) -> float:
    """Mean phase-2 loss (temperature 0.1, as trained) of a saved run on the same seeded batches, no dropout."""
    import numpy as np
    import torch

    from distill.model.model import StudentModelWithProjection
    from distill.train.config import TrainConfig
    from distill.train.data import prepare_data
    from distill.train.datasets import Phase2Dataset, phase2_collate_fn
    from distill.train.losses import Phase2Loss
    from distill.train.tokens import TokenTable
    from distill.train.trainer import DistillModule
    from precompute.sources import SourceOptions, parse_source
    from storage.store import TeacherStore

    store = TeacherStore.open(store_path)
    model = StudentModelWithProjection.load(run, device="cpu").eval()
    tokens = TokenTable.for_tokenizer(model.student.tokenizer, int(model.student.max_seq_length), token_cache)
    prepared = prepare_data([parse_source(s, SourceOptions()) for s in data], store, tokens, phase=2)
    dataset = Phase2Dataset(prepared.phase2, prepared.texts, store, tokens, num_negatives=3, seed=0)
    # The loss as phase 2 trained it: its InfoNCE spaces and MSE reduction are TrainConfig's defaults, not the
    # loss class's (this measured the 'projected' space alone after the default became 'projected+hybrid').
    trained = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    loss = Phase2Loss(temperature=0.1, space=trained["infonce_space"], mse_reduction=trained["mse_reduction"])
    collate, module = phase2_collate_fn(tokens), DistillModule(model, loss, 2)
    order = np.random.default_rng(0).permutation(len(dataset))
    with torch.no_grad():
        return mean(
            float(
                module(**collate(dataset.__getitems__(order[i * batch_size : (i + 1) * batch_size].tolist())))["loss"]
            )
            for i in range(batches)
        )


def test_phase1_then_phase2_on_real_data(shared_data: Path, tiny_qwen2: Path, tiny_bert: Path, tmp_path: Path) -> None:
    from distill.train.config import TrainConfig
    from distill.train.run import train
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    scifact = tmp_path / "scifact"
    counts = _subsample_scifact(shared_data / "scifact", scifact)
    hotpot = tmp_path / "hotpotqa"
    hotpot.mkdir()
    lines = (shared_data / "hotpotqa-dev500" / "dev_subsampled.jsonl").read_text().splitlines()
    (hotpot / "train.jsonl").write_text("\n".join(lines[:HOTPOT_QUESTIONS]) + "\n")
    data = (f"beir:{scifact}", f"hotpotqa:{hotpot}", f"msmarco:{shared_data / 'msmarco-triples-toy'}")

    store = tmp_path / "store"
    summary = precompute(
        PrecomputeConfig(
            store=str(store), data=data, progress=False, teacher=TeacherConfig(model=str(tiny_qwen2), device="cpu")
        )
    )
    assert summary.encoded > counts["passages"] + HOTPOT_QUESTIONS

    common = dict(store=str(store), data=data, token_cache=str(tmp_path / "tokens"), **{**FAST, "seed": 3})
    p1 = train(
        TrainConfig(phase=1, out=str(tmp_path / "p1"), student=str(tiny_bert), max_steps=40, batch_size=32, **common)
    )
    p2 = train(
        TrainConfig(
            phase=2,
            out=str(tmp_path / "p2"),
            init=p1.out,
            epochs=3,
            batch_size=16,
            num_negatives=3,
            temperature=0.1,
            **common,
        )
    )

    l1, l2 = log_losses(p1.out), log_losses(p2.out)
    assert mean(l1[-5:]) < 0.5 * mean(l1[:5]), (l1[:5], l1[-5:])
    # Phase-2 batches differ a lot (HotpotQA's distractors, SciFact's lone positives, the triples' one negative), so
    # the logged losses are noisy: compare whole epochs (the same examples), and, for a clean measurement, the
    # phase-2 loss of the model before and after phase 2 on the same fixed batches, in eval mode.
    per_epoch = len(l2) // 3
    assert mean(l2[-per_epoch:]) < mean(l2[:per_epoch]), (mean(l2[:per_epoch]), mean(l2[-per_epoch:]))
    before = _fixed_batch_loss(p1.out, store, data, tmp_path / "tokens")
    after = _fixed_batch_loss(p2.out, store, data, tmp_path / "tokens")
    # Measured with the loss as trained (projected+hybrid): 2.756 → 2.545 (0.92); a phase 2 that changes no weight
    # gives exactly 1.0. (0.85 held for the 'projected' space alone, the default before projected+hybrid.)
    assert after < 0.96 * before, (before, after)
    # Every data set contributed examples: SciFact's judged train queries (all their positives are kept), one per
    # HotpotQA question, and the toy triples (one per distinct (query, positive)).
    assert p2.report["unknown_ids"] == {} and p2.report["missing_vectors"] == 0
    assert p2.report["examples"] > counts["train_queries"] + HOTPOT_QUESTIONS + 50
    assert p1.report["held_out_queries"] == 20, "SciFact's test-only queries stay out of phase 1"
