"""One phase-2 training step on a GPU: teacher vectors from the store vs the 7B teacher running in the loop.

The product's student (all-mpnet-base-v2 shape: 12 layers, hidden 768, 384 tokens) with the projection
768 → 1536 → 3584 trains on phase-2 batches of ``--batch`` queries × (1 positive + ``--negatives`` hard
negatives), bf16 autocast, AdamW, ``Phase2Loss`` in the training default's spaces — the plain (uncached) step.

* ``store``: the batch's teacher vectors are one ``TeacherStore.get_rows`` gather from a ddx store of 3584-d
  float16 vectors (written through ddx's segment writer, random values: the step's cost does not depend on them);
* ``teacher-in-loop``: a gte-Qwen2-7B-instruct-shaped teacher (random bf16 weights, real config: 28 layers,
  hidden 3584, GQA 28/4, last-token pooling, left padding, the query instruction) encodes the batch's texts under
  ``torch.inference_mode`` and those vectors replace the stored ones; the student step is the same.

Texts are the TREC-DL-2019 subset's MS MARCO passages and queries (real lengths). The student's weights are
random too (the all-mpnet-base-v2 config and tokenizer, no weights file needed): the step's time depends on shapes.
GPU utilisation is NVML's, sampled every 50 ms during the timed steps. Variants alternate in rounds.

Usage (on the GPU machine):
    python bench/gpu_train_step.py --student-shell .gpu/mpnet_shell --corpus .gpu/dl19_corpus.jsonl \
        --queries .gpu/dl19_queries.jsonl --json-out $OUT/gpu_train_step.json
    python bench/gpu_train_step.py --tiny ...      # CPU smoke test of the script (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "


def load_jsonl_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def random_student(shell: Path, tmp: Path, tiny: bool) -> Path:
    """A SentenceTransformer folder with the shell's config and tokenizer and random weights."""
    from transformers import AutoConfig, AutoModel

    folder = tmp / "student"
    shutil.copytree(shell, folder)
    config = AutoConfig.from_pretrained(folder)
    if tiny:
        config.update({"num_hidden_layers": 2})  # the pooling config fixes hidden 768
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def build_store(path: Path, queries: list[str], passages: list[str], spec: Any) -> Any:
    """A ddx store holding a random ``spec.dim``-d float16 vector for every query and passage."""
    from storage import TeacherStore, content_keys, role_code

    dim = spec.dim
    store = TeacherStore.create(str(path), spec)
    rng = np.random.default_rng(0)
    with store.writer() as w:
        for role, texts in (("query", queries), ("passage", passages)):
            keys = content_keys([role] * len(texts), texts)
            vecs = rng.standard_normal((len(texts), dim), dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            roles = np.full(len(texts), role_code(role), dtype=np.uint8)
            w.append(keys, vecs.astype(np.float16), roles, np.full(len(texts), 64, dtype=np.int32))
    return TeacherStore.open(str(path))


class Batches:
    """Phase-2 batches in ``phase2_collate_fn``'s layout, teacher vectors gathered from the store."""

    def __init__(self, store: Any, tokenizer: Any, max_len: int, queries: list[str], passages: list[str]) -> None:
        from storage import content_keys

        self.store, self.tokenizer, self.max_len = store, tokenizer, max_len
        self.queries, self.passages = queries, passages
        self.q_rows = store.locate(content_keys(["query"] * len(queries), queries))
        self.p_rows = store.locate(content_keys(["passage"] * len(passages), passages))

    def _tok(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def make(self, step: int, b: int, k: int) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
        rng = np.random.default_rng(step)
        qi = rng.choice(len(self.queries), b, replace=len(self.queries) < b)
        pi = rng.choice(len(self.passages), b * (1 + k), replace=False)
        rows = np.concatenate([self.q_rows[qi], self.p_rows[pi]])
        vectors = self.store.get_rows(rows, dtype="float32")
        q_texts = [self.queries[i] for i in qi]
        p_texts = [self.passages[i] for i in pi]
        batch: dict[str, torch.Tensor] = {
            "neg_mask": torch.ones(b, k, dtype=torch.bool),
            "teacher_query": torch.from_numpy(vectors[:b]),
            "teacher_pos": torch.from_numpy(vectors[b : 2 * b]),
            "teacher_neg": torch.from_numpy(vectors[2 * b :]).reshape(b, k, -1),
        }
        for name, texts in (("query", q_texts), ("pos", p_texts[:b]), ("neg", p_texts[b:])):
            batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = self._tok(texts)
        return batch, q_texts, p_texts


class UtilSampler:
    """NVML GPU utilisation (%), sampled in a thread while ``active``."""

    def __init__(self, device: str) -> None:
        self.samples: list[float] = []
        self.active = False
        self._stop = False
        self.ok = device == "cuda"
        if self.ok:
            try:
                torch.cuda.utilization()
            except Exception:  # no NVML: report None
                self.ok = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if self.ok and self.active:
                self.samples.append(float(torch.cuda.utilization()))
            time.sleep(0.05)

    def take(self) -> float | None:
        out = statistics.mean(self.samples) if self.samples else None
        self.samples = []
        return out

    def close(self) -> None:
        self._stop = True


def teacher_vectors(teacher: Any, q_texts: list[str], p_texts: list[str], b: int, k: int) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        q = teacher.encode([QUERY_PROMPT + t for t in q_texts], batch_size=len(q_texts), convert_to_tensor=True)
        p = teacher.encode(p_texts, batch_size=64, convert_to_tensor=True)
    q, p = q.float().clone(), p.float().clone()
    return {"teacher_query": q, "teacher_pos": p[:b], "teacher_neg": p[b:].reshape(b, k, -1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys_path_bench = str(Path(__file__).resolve().parent)
    import sys

    if sys_path_bench not in sys.path:
        sys.path.insert(0, sys_path_bench)
    import gpu_precompute

    from distill.model.model import StudentModelWithProjection
    from distill.train.losses import Phase2Loss
    from distill.train.trainer import DistillModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        gpu_precompute.GTE_QWEN2_7B.update(
            hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
        )
        args.layers = 2
    dim = gpu_precompute.GTE_QWEN2_7B["hidden_size"]
    tmp = Path(tempfile.mkdtemp(prefix="ddx-gpu-train-"))
    passages = load_jsonl_texts(Path(args.corpus))
    queries = load_jsonl_texts(Path(args.queries))
    store = build_store(tmp / "store", queries, passages, gpu_precompute.random_teacher_spec())
    torch.manual_seed(0)
    model = StudentModelWithProjection.from_pretrained(
        str(random_student(Path(args.student_shell), tmp, args.tiny)), dim, max_seq_length=args.max_len, device=device
    )
    student_params = sum(p.numel() for p in model.student.parameters())
    module = DistillModule(model, Phase2Loss(space=args.space), 2).train()
    optimizer = torch.optim.AdamW(
        [{"params": model.student.parameters(), "lr": 2e-5}, {"params": model.projection.parameters(), "lr": 1e-3}]
    )
    batches = Batches(store, model.student.tokenizer, args.max_len, queries, passages)
    teacher = gpu_precompute.build_teacher(passages, tmp, device, args.layers)
    teacher.max_seq_length = 512
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    util = UtilSampler(device)
    stats: dict[str, dict[str, list[float]]] = {
        v: {"s": [], "data_s": [], "teacher_s": [], "tokens": []} for v in ("store", "teacher-in-loop")
    }
    peak: dict[str, float] = {}
    utilisation: dict[str, list[float]] = {v: [] for v in stats}

    def step(variant: str, i: int, timed: bool) -> None:
        sync()
        t0 = time.perf_counter()
        batch, q_texts, p_texts = batches.make(i, args.batch, args.negatives)
        t_data = time.perf_counter()
        if variant == "teacher-in-loop":
            batch.update(teacher_vectors(teacher, q_texts, p_texts, args.batch, args.negatives))
        sync()
        t_teacher = time.perf_counter()
        batch = {key: v.to(device, non_blocking=True) for key, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = module(**batch)["loss"]
        loss.backward()
        optimizer.step()
        sync()
        if timed:
            s = stats[variant]
            s["s"].append(time.perf_counter() - t0)
            s["data_s"].append(t_data - t0)
            s["teacher_s"].append(t_teacher - t_data)
            s["tokens"].append(float(sum(int(batch[f"{n}_attention_mask"].sum()) for n in ("query", "pos", "neg"))))

    for i in range(args.warmup):
        for variant in stats:
            step(variant, i, timed=False)
    i = args.warmup
    for _ in range(args.rounds):
        for variant in stats:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            util.take()
            util.active = True
            for k in range(args.steps):
                step(variant, i + k, timed=True)
            util.active = False
            u = util.take()
            if u is not None:
                utilisation[variant].append(u)
            if device == "cuda":
                peak[variant] = max(peak.get(variant, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        i += args.steps
    util.close()
    texts_per_step = args.batch * (2 + args.negatives)
    out: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "batch_queries": args.batch,
        "negatives": args.negatives,
        "texts_per_step": texts_per_step,
        "student_max_len": args.max_len,
        "student_params": student_params,
        "teacher_layers": args.layers,
        "infonce_space": args.space,
        "precision": "bf16 autocast" if device == "cuda" else "fp32",
        "variants": {},
    }
    for v, s in stats.items():
        mean_s = statistics.mean(s["s"])
        out["variants"][v] = {
            "steps_timed": len(s["s"]),
            "s_per_step": round(mean_s, 4),
            "median_s_per_step": round(statistics.median(s["s"]), 4),
            "data_s_per_step": round(statistics.mean(s["data_s"]), 4),
            "teacher_s_per_step": round(statistics.mean(s["teacher_s"]), 4),
            "queries_per_s": round(args.batch / mean_s, 1),
            "texts_per_s": round(texts_per_step / mean_s, 1),
            "student_tokens_per_step": round(statistics.mean(s["tokens"])),
            "gpu_util_pct": round(statistics.mean(utilisation[v]), 1) if utilisation[v] else None,
            "peak_gpu_gib": round(peak.get(v, 0.0), 1),
        }
    out["speedup_store_vs_teacher_in_loop"] = round(
        out["variants"]["teacher-in-loop"]["s_per_step"] / out["variants"]["store"]["s_per_step"], 1
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-shell", default=".gpu/mpnet_shell", help="all-mpnet-base-v2 folder without weights")
    p.add_argument("--corpus", default=".gpu/dl19_corpus.jsonl")
    p.add_argument("--queries", default=".gpu/dl19_queries.jsonl")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--negatives", type=int, default=7)
    p.add_argument("--max-len", type=int, default=384, help="student max tokens (all-mpnet-base-v2: 384)")
    p.add_argument("--space", default="projected+hybrid", help="phase-2 InfoNCE space(s)")
    p.add_argument("--layers", type=int, default=28, help="teacher layers")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json-out")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test of this script)")
    args = p.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)
    head = ("s/step", 9), ("data s", 9), ("teacher s", 11), ("queries/s", 11), ("GPU util %", 12), ("peak GiB", 10)
    print("\n" + f"{'variant':<18}" + "".join(f"{name:>{w}}" for name, w in head))
    for v, r in result["variants"].items():
        print(
            f"{v:<18}{r['s_per_step']:>9}{r['data_s_per_step']:>9}{r['teacher_s_per_step']:>11}"
            f"{r['queries_per_s']:>11}{r['gpu_util_pct']!s:>12}{r['peak_gpu_gib']:>10}"
        )
    print(f"store vs teacher in the loop: {result['speedup_store_vs_teacher_in_loop']}x")


if __name__ == "__main__":
    main()
