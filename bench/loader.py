"""Phase-2 batches/s of the training DataLoader vs the rate the training step consumes them.

The loader must never be the bottleneck. This bench builds a store of realistic width (synthetic
3584-d float16 vectors, the gte-Qwen2-7B shape, for every SciFact text: 5,183 passages and 1,109
queries) through the storage API, tokenizes the texts with the all-MiniLM-L6-v2 tokenizer into a
token table, prepares SciFact's training queries (with a hard_negatives.jsonl of 10 random passages
each, ``--negatives`` of them drawn per step), and times, with the same batch shape:

* the loader: ``Phase2Dataset`` + ``phase2_collate_fn`` through a ``torch.utils.data.DataLoader`` with
  ``DistillBatchSampler``, exactly as ``DistillTrainer.get_train_dataloader`` builds it (workers not
  persistent, prefetch 4), for 0 and 2 workers, over whole epochs (worker start-up included);
* the consumer: one phase-2 training step (MiniLM student + 384 → 768 → 3584 projection,
  Phase2Loss, AdamW, forward + backward + step) on batches from that loader.

The ratio loader/consumer is how many times faster batches arrive than they are used (must be >> 1).

Example:
    python bench/loader.py                              # batch 16 × 3 negatives (as bench/train_step.py)
    python bench/loader.py --batch 32 --negatives 7 --steps 0   # TrainConfig's defaults, loader only (the
                                                                # step needs > 20 GB of RAM at 288 x 256 tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHARED = Path(os.environ.get("DDX_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=f"beir:{SHARED / 'scifact'}", help="BEIR folder (default: SciFact)")
    p.add_argument("--dim", type=int, default=3584)
    p.add_argument("--batch", type=int, default=16, help="queries per batch")
    p.add_argument("--negatives", type=int, default=3, help="hard negatives per query")
    p.add_argument("--epochs", type=int, default=3, help="loader epochs timed per worker setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--steps", type=int, default=4, help="training steps timed after one warm-up (0: loader only)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def build_store(path: Path, data: str, dim: int) -> Any:
    """Random float16 vectors of width ``dim`` for every text of ``data``, written through the storage API."""
    from precompute.sources import SourceOptions, parse_source
    from storage import TeacherSpec, TeacherStore
    from storage.keys import content_keys, role_code

    if (path / "zarr.json").exists():
        return TeacherStore.open(path)
    spec = TeacherSpec(
        model="synthetic-3584",
        weights_id="files:synthetic",
        pooling="lasttoken",
        normalize=True,
        max_seq_length=512,
        dim=dim,
    )
    store = TeacherStore.create(path, spec, dtype="float16")
    records = list(parse_source(data, SourceOptions()).iter_texts())
    keys = content_keys([r.role for r in records], [r.text for r in records])
    rng = np.random.default_rng(0)
    with store.writer() as writer:
        for s in range(0, len(records), 4096):
            n = len(keys[s : s + 4096])
            vectors = rng.standard_normal((n, dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            writer.append(
                keys[s : s + n],
                vectors.astype(np.float16),
                np.array([role_code(r.role) for r in records[s : s + n]], np.uint8),
                np.full(n, 128, np.int32),
            )
    store.refresh()
    return store


def with_hard_negatives(source: Path, target: Path, per_query: int = 10) -> str:
    """``source`` (a BEIR folder) linked into ``target`` plus a hard_negatives.jsonl of random passages per training
    query, so batches carry the usual hard negatives (mining needs a real teacher's vectors to find any)."""
    import random

    if not (target / "hard_negatives.jsonl").exists():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("corpus.jsonl", "queries.jsonl", "qrels"):
            (target / name).unlink(missing_ok=True)
            (target / name).symlink_to((source / name).resolve())
        ids = [json.loads(line)["_id"] for line in (source / "corpus.jsonl").read_text().splitlines()]
        qrels = (source / "qrels" / "train.tsv").read_text().splitlines()[1:]
        queries = sorted({line.split("\t")[0] for line in qrels})
        rng = random.Random(0)
        lines = [json.dumps({"query-id": q, "pos": [], "neg": rng.sample(ids, per_query)}) for q in queries]
        (target / "hard_negatives.jsonl").write_text("\n".join(lines) + "\n")
    return f"beir:{target}"


def make_loader(dataset: Any, sampler: Any, collate: Any, workers: int) -> torch.utils.data.DataLoader:
    """As ``DistillTrainer.get_train_dataloader`` (minus accelerate's wrapper, a pass-through on one process)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def time_loader(dataset: Any, sampler: Any, collate: Any, workers: int, epochs: int) -> dict[str, float]:
    batches, start = 0, time.perf_counter()
    first_batch: list[float] = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t = time.perf_counter()
        for i, _ in enumerate(make_loader(dataset, sampler, collate, workers)):
            if i == 0:
                first_batch.append(time.perf_counter() - t)
            batches += 1
    seconds = time.perf_counter() - start
    return {
        "batches": batches,
        "seconds": round(seconds, 3),
        "batches_per_s": round(batches / seconds, 1),
        "first_batch_s": round(statistics.mean(first_batch), 3),
    }


def time_training(store: Any, dataset: Any, sampler: Any, collate: Any, steps: int) -> dict[str, float]:
    from cli.offline_models import minilm_path
    from distill.model.model import StudentModelWithProjection
    from distill.train.losses import Phase2Loss
    from distill.train.trainer import DistillModule

    torch.manual_seed(0)
    model = StudentModelWithProjection.from_pretrained(str(minilm_path()), store.dim, device="cpu")
    module = DistillModule(model, Phase2Loss(), 2).train()
    optimizer = torch.optim.AdamW(
        [{"params": model.student.parameters(), "lr": 2e-5}, {"params": model.projection.parameters(), "lr": 1e-3}]
    )
    sampler.set_epoch(0)
    loader = iter(make_loader(dataset, sampler, collate, 0))
    batches = [next(loader) for _ in range(steps + 1)]
    times = []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module(**batch)["loss"].backward()
        optimizer.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    return {
        "steps": steps,
        "seconds_per_step": round(statistics.mean(times), 3),
        "steps_per_s": round(1 / statistics.mean(times), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from cli.offline_models import minilm_path
    from distill.train.data import prepare_data
    from distill.train.datasets import Phase2Dataset, phase2_collate_fn
    from distill.train.sampling import DistillBatchSampler
    from distill.train.tokens import TokenTable
    from precompute.sources import SourceOptions, parse_source

    work = args.dir or Path(tempfile.mkdtemp(prefix="ddx-bench-loader-"))
    data = with_hard_negatives(Path(args.data.removeprefix("beir:")), work / "data")
    t = time.perf_counter()
    store = build_store(work / "store", data, args.dim)
    build_s = time.perf_counter() - t
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokens = TokenTable.for_tokenizer(tokenizer, 256, work / "tokens")
    t = time.perf_counter()
    prepared = prepare_data([parse_source(data, SourceOptions())], store, tokens, phase=2)
    prepare_s = time.perf_counter() - t
    dataset = Phase2Dataset(prepared.phase2, prepared.texts, store, tokens, num_negatives=args.negatives)
    sampler = DistillBatchSampler.for_dataset(dataset, args.batch, seed=0)
    collate = phase2_collate_fn(tokens)
    sample = collate(dataset.__getitems__(list(range(args.batch))))
    rows = sample["teacher_query"].shape[0] * 2 + int(sample["neg_mask"].sum())

    loaders = {w: time_loader(dataset, sampler, collate, w, args.epochs) for w in args.workers}
    training = time_training(store, dataset, sampler, collate, args.steps) if args.steps else None
    return {
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "store_rows": len(store),
        "dim": store.dim,
        "store_build_s": round(build_s, 1),
        "prepare_s": round(prepare_s, 1),
        "examples": len(dataset),
        "batch_queries": args.batch,
        "negatives": args.negatives,
        "teacher_rows_per_batch": rows,
        "teacher_mb_per_batch": round(rows * store.dim * 4 / 2**20, 2),
        "loader": {str(w): r for w, r in loaders.items()},
        "training": training,
        "ratio": {str(w): round(r["batches_per_s"] / training["steps_per_s"], 1) for w, r in loaders.items()}
        if training
        else {},
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"store: {r['store_rows']:,} rows x {r['dim']} float16; {r['examples']} phase-2 examples; batch "
        f"{r['batch_queries']} queries x {r['negatives']} negatives = {r['teacher_rows_per_batch']} teacher rows "
        f"({r['teacher_mb_per_batch']} MB float32) per batch; {r['threads']} torch threads, load "
        f"{r['load_avg'][0]:.1f}",
        "",
        "| path | batches | seconds | batches/s | first batch s | vs training step |",
        "|---|---|---|---|---|---|",
    ]
    for w, x in r["loader"].items():
        lines.append(
            f"| DataLoader, {w} workers | {x['batches']} | {x['seconds']} | {x['batches_per_s']} | "
            f"{x['first_batch_s']} | {str(r['ratio'][w]) + 'x' if r['ratio'] else '-'} |"
        )
    if t := r["training"]:
        lines.append(
            f"| training step (consumer) | {t['steps']} | {t['seconds_per_step']} s/step | {t['steps_per_s']} "
            "| - | 1x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0 if min(result["ratio"].values(), default=float("inf")) > 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
