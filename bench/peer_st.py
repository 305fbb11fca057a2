"""ddx against the sentence-transformers documentation's way of distilling, side by side, same models and data.

The peer (ST 6 docs, "Model Distillation" / ``EmbedDistillLoss``): load the texts with ``datasets``, add the
teacher's embeddings as a ``label`` column with ``dataset.map(teacher.encode)``, train the student with
``SentenceTransformerTrainer`` and ``EmbedDistillLoss(projection_dim=teacher_dim)`` (a linear projection owned
by the loss, saved with ``loss.save_projection``). ddx: ``precompute`` into the store once, then
``train --phase 1`` (student + MLP projection) from the store.

Experiments (each one a fresh process, like separate script runs):
  A  texts T0 (SciFact train queries + the first --passages SciFact passages), lr 5e-5
  B  same texts, lr 1e-4
  C  T0 + the MS MARCO triples data set (T1), lr 5e-5
Measured per experiment and system: teacher encode seconds and texts encoded, training seconds, wall seconds,
peak RSS, disk used by cached teacher vectors. Then hybrid nDCG@10 on SciFact test (projected student queries
against teacher passage vectors, read from a ddx store holding the SciFact corpus: --teacher-store).

Usage:
    python bench/peer_st.py --workdir /tmp/ddx-peer --teacher-store /tmp/ddx-e2e/store
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

EXPERIMENTS = {"A": ("T0", 5e-5), "B": ("T0", 1e-4), "C": ("T0+T1", 5e-5)}


def _data_root() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def write_texts(work: Path, passages: int) -> dict[str, Path]:
    """T0 and T1 as jsonl (text, role) files and as BEIR folders, from the shared data."""
    from precompute.sources import parse_source

    scifact = parse_source(f"beir:{_data_root() / 'scifact'}")
    train_q = set(scifact.qrels("train"))
    t0 = [(r.text, "query") for r in scifact.iter_texts("query") if r.id in train_q]
    t0 += [(r.text, "passage") for r, _ in zip(scifact.iter_texts("passage"), range(passages), strict=False)]
    triples = parse_source(f"msmarco:{_data_root() / 'msmarco-triples-toy'}")
    t1 = [(r.text, r.role) for r in triples.iter_texts()]
    out = {}
    for name, rows in (("T0", t0), ("T0+T1", t0 + t1)):
        folder = work / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "texts.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t, "role": r}) + "\n" for t, r in rows)
        _beir(folder / "beir", rows)
        out[name] = folder
    return out


def _beir(folder: Path, rows: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as c, open(folder / "queries.jsonl", "w") as q:
        for i, (text, role) in enumerate(rows):
            (q if role == "query" else c).write(json.dumps({"_id": f"t{i}", "text": text}) + "\n")


def worker_peer(args: argparse.Namespace) -> dict:
    """One peer experiment, exactly as the ST docs do it."""
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers import SentenceTransformerTrainingArguments as Args

    from cli.offline_models import minilm_path, mpnet_path

    start = time.perf_counter()
    teacher = SentenceTransformer(str(mpnet_path()), device="cpu")
    student = SentenceTransformer(str(minilm_path()), device="cpu")
    train = datasets.load_dataset("json", data_files=str(Path(args.texts) / "texts.jsonl"), split="train")
    encoded = {"n": 0}

    def add_teacher_embeddings(batch: dict) -> dict:
        encoded["n"] += len(batch["text"])
        return {"label": teacher.encode(batch["text"], batch_size=32).tolist()}

    t = time.perf_counter()
    train = train.map(add_teacher_embeddings, batched=True, batch_size=1000).select_columns(["text", "label"])
    encode_s = time.perf_counter() - t
    loss = losses.EmbedDistillLoss(student, distance_metric="cosine", projection_dim=teacher.get_embedding_dimension())
    out = Path(args.out)
    targs = Args(
        output_dir=str(out / "ckpt"),
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_ratio=0.1,
        seed=42,
        report_to="none",
        save_strategy="no",
        logging_steps=20,
        disable_tqdm=True,
    )
    t = time.perf_counter()
    SentenceTransformerTrainer(model=student, args=targs, train_dataset=train, loss=loss).train()
    train_s = time.perf_counter() - t
    student.save(str(out / "student"))
    loss.save_projection(str(out / "projection.safetensors"))
    return {
        "encode_s": encode_s,
        "texts_encoded": encoded["n"],
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
    }


def worker_ddx(args: argparse.Namespace) -> dict:
    """One ddx experiment: precompute (skips stored texts), then phase 1 from the store."""
    from cli.offline_models import minilm_path, mpnet_path
    from distill.train.config import TrainConfig
    from distill.train.run import train
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    start = time.perf_counter()
    data = (f"beir:{Path(args.texts) / 'beir'}",)
    t = time.perf_counter()
    summary = precompute(
        PrecomputeConfig(store=args.store, data=data, teacher=TeacherConfig(model=str(mpnet_path())), progress=False)
    )
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    train(
        TrainConfig(
            phase=1,
            store=args.store,
            data=data,
            out=args.out,
            student=str(minilm_path()),
            epochs=1,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=42,
            num_workers=0,
            progress=False,
            save_steps=100_000,
            logging_steps=20,
            split=None,
        )
    )
    return {
        "encode_s": encode_s,
        "texts_encoded": summary.encoded,
        "train_s": time.perf_counter() - t,
        "wall_s": time.perf_counter() - start,
    }


def hybrid_ndcg(system: str, run_dir: Path, teacher_store: str) -> float:
    """nDCG@10 on SciFact test: projected student queries against the teacher's SciFact passages."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from distill.evaluate.evaluate import load_eval_set
    from distill.evaluate.metrics import metrics_from_topk, trec_tie_priority
    from distill.search.search import exact_search
    from precompute.sources import parse_source
    from storage.keys import content_keys
    from storage.store import TeacherStore

    es = load_eval_set(parse_source(f"beir:{_data_root() / 'scifact'}"), "test", strict=False)
    if system == "ddx":
        from distill.model.model import StudentModelWithProjection

        model = StudentModelWithProjection.load(run_dir)
        queries = model.encode_projected(es.query_texts).numpy()
    else:
        from sentence_transformers import SentenceTransformer

        student = SentenceTransformer(str(run_dir / "student"), device="cpu")
        weights = load_file(str(run_dir / "projection.safetensors"))
        emb = torch.from_numpy(student.encode(es.query_texts, batch_size=64))
        queries = (emb @ weights["weight"].T + weights["bias"]).numpy()
    store = TeacherStore.open(teacher_store)
    passages = store.get(content_keys("passage", es.doc_texts), dtype="float32")
    priority = trec_tie_priority(es.doc_ids)
    scores, idx = exact_search(queries.astype(np.float32), passages, 1000, normalize=True, tie_priority=priority)
    return metrics_from_topk(es.qrels, es.query_ids, es.doc_ids, idx, scores).mean["nDCG@10"]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def orchestrate(args: argparse.Namespace) -> dict:
    work = Path(args.workdir)
    texts = write_texts(work, args.passages)
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(work / "peer_hf_cache"),
        "DDX_CACHE_DIR": str(work / "ddx_cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    results: dict = {"experiments": []}
    for exp, (data, lr) in EXPERIMENTS.items():
        for system in ("peer", "ddx"):
            out = work / system / exp
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                system,
                "--texts",
                str(texts[data]),
                "--lr",
                str(lr),
                "--out",
                str(out),
                "--store",
                str(work / "ddx_store"),
                "--batch-size",
                str(args.batch_size),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{system} {exp} failed:\n{proc.stderr[-3000:]}")
            row = {
                "exp": exp,
                "system": system,
                "data": data,
                "lr": lr,
                **json.loads(proc.stdout.strip().splitlines()[-1]),
            }
            print(json.dumps(row), file=sys.stderr)
            results["experiments"].append(row)
    results["disk_bytes"] = {
        "peer_hf_datasets_cache": _du(work / "peer_hf_cache"),
        "ddx_store": _du(work / "ddx_store"),
        "ddx_token_cache": _du(work / "ddx_cache" / "tokens"),
    }
    if args.teacher_store:
        results["hybrid_nDCG@10_scifact_test"] = {
            system: round(hybrid_ndcg(system, work / system / "A", args.teacher_store), 4) for system in ("peer", "ddx")
        }
    return results


def print_table(results: dict) -> None:
    rows = results["experiments"]
    print(f"{'exp':<4}{'system':<7}{'texts encoded':>14}{'encode s':>10}{'train s':>9}{'wall s':>9}{'peak RSS MB':>13}")
    for r in rows:
        print(
            f"{r['exp']:<4}{r['system']:<7}{r['texts_encoded']:>14,}{r['encode_s']:>10.1f}{r['train_s']:>9.1f}"
            f"{r['wall_s']:>9.1f}{r['peak_rss_mb']:>13,.0f}"
        )
    for system in ("peer", "ddx"):
        mine = [r for r in rows if r["system"] == system]
        print(
            f"{system}: teacher encode total {sum(r['encode_s'] for r in mine):.1f}s for "
            f"{sum(r['texts_encoded'] for r in mine):,} texts; wall total {sum(r['wall_s'] for r in mine):.1f}s"
        )
    peer = {r["exp"]: r for r in rows if r["system"] == "peer"}
    ddx = {r["exp"]: r for r in rows if r["system"] == "ddx"}
    enc = sum(r["encode_s"] for r in peer.values()) / max(sum(r["encode_s"] for r in ddx.values()), 1e-9)
    wall = sum(r["wall_s"] for r in peer.values()) / max(sum(r["wall_s"] for r in ddx.values()), 1e-9)
    print(f"ratios peer/ddx: teacher encode time {enc:.2f}x, wall time {wall:.2f}x")
    print(f"disk: {json.dumps(results['disk_bytes'])}")
    if "hybrid_nDCG@10_scifact_test" in results:
        print(f"hybrid nDCG@10 on SciFact test (experiment A): {results['hybrid_nDCG@10_scifact_test']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ddx-peer")
    parser.add_argument("--passages", type=int, default=1000, help="SciFact passages in T0.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-store", help="ddx store holding the SciFact corpus (for the hybrid nDCG).")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["peer", "ddx"], help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = (worker_peer if args.worker == "peer" else worker_ddx)(args)
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(row))
        return
    results = orchestrate(args)
    (Path(args.workdir) / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2)) if args.json else print_table(results)


if __name__ == "__main__":
    main()
