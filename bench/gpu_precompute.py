"""ddx precompute on a GPU with a gte-Qwen2-7B-instruct-shaped teacher, against a bare SentenceTransformer.encode.

The teacher is built with gte-Qwen2-7B-instruct's configuration (hidden 3584, 28 layers, 28 heads, 4 KV heads,
intermediate 18944, vocab 151,646) and random bf16 weights — no download: throughput depends on the shapes, not
the values. Texts are real MS MARCO passages (the TREC-DL-2019 subset's 5,000) plus copies with altered endings,
so the length distribution is MS MARCO's. Both paths run the same model on the same texts:

* bare: ``SentenceTransformer.encode(texts, batch_size=B)`` (ST sorts by characters, fixed batch size);
* ddx: ``precompute`` from a BEIR folder into a store (token-budget batches, writer thread, checksums).

Model FLOPs utilisation counts useful FLOPs only (real tokens, no padding): 2 × non-embedding parameters per token
plus 4 × layers × hidden × L² per sequence of length L for attention, against the card's dense bf16 peak.

Usage (on the GPU machine):
    python bench/gpu_precompute.py --corpus .gpu/dl19_corpus.jsonl --copies 2 --json-out $OUT/gpu_precompute.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

GTE_QWEN2_7B = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 151646,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
}
H200_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s, vendor datasheet (SXM)


def load_texts(corpus: Path, copies: int) -> list[str]:
    base = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").split("\n") if line.strip()]
    texts = list(base)
    for k in range(1, copies):
        texts += [f"{t} (variant {k})" for t in base]
    return texts


def build_teacher(texts: list[str], tmp: Path, device: str, layers: int):  # -> SentenceTransformer
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts[:5000],
        trainers.BpeTrainer(
            vocab_size=32000, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, bpe.token_to_id(eos))])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=eos, pad_token=eos, padding_side="left", model_max_length=512
    )
    small = tmp / "shell"
    tok.save_pretrained(small)
    Qwen2Model(
        Qwen2Config(
            **{
                **GTE_QWEN2_7B,
                "hidden_size": 64,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": len(tok),
            }
        )
    ).save_pretrained(small)
    transformer = Transformer(str(small), max_seq_length=512)
    transformer.tokenizer.padding_side = "left"
    config = Qwen2Config(**{**GTE_QWEN2_7B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        transformer.model = Qwen2Model(config).eval()
    torch.set_default_dtype(torch.float32)
    model = SentenceTransformer(
        modules=[transformer, Pooling(GTE_QWEN2_7B["hidden_size"], "lasttoken"), Normalize()], device=device
    )
    return model


def random_teacher_spec() -> Any:  # -> TeacherSpec
    """The TeacherSpec of :func:`build_teacher`'s model (random weights, gte-Qwen2-7B-instruct's shape)."""
    from storage.spec import TeacherSpec

    return TeacherSpec(
        model="random gte-Qwen2-7B-instruct shape",
        weights_id="random:seed0",
        pooling="lasttoken",
        normalize=True,
        max_seq_length=512,
        dim=GTE_QWEN2_7B["hidden_size"],
        padding_side="left",
        dtype="bfloat16",
    )


def useful_flops(lengths, layers: int, params_nonembed: int) -> float:
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    return float(2 * params_nonembed * lengths.sum() + 4 * layers * GTE_QWEN2_7B["hidden_size"] * (lengths**2).sum())


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig, TeacherEncoder

    texts = load_texts(Path(args.corpus), args.copies)
    tmp = Path(tempfile.mkdtemp(prefix="ddx-gpu-"))
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_teacher(texts, tmp, device, args.layers)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model[0].model.parameters())
    nonembed = params - model[0].model.embed_tokens.weight.numel()
    lengths = [len(x) for x in model.tokenizer(texts, truncation=True, max_length=512)["input_ids"]]
    flops = useful_flops(lengths, args.layers, nonembed)
    model.encode(texts[:256], batch_size=64)  # warm-up: kernels, allocator
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = torch.cuda.max_memory_allocated if device == "cuda" else (lambda: 0)
    reset = torch.cuda.reset_peak_memory_stats if device == "cuda" else (lambda: None)
    sync()
    results: dict = {
        "texts": len(texts),
        "tokens": int(sum(lengths)),
        "mean_tokens": float(np.mean(lengths)),
        "params": params,
        "build_s": round(build_s, 1),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "useful_tflop": round(flops / 1e12, 1),
        "runs": [],
    }

    def record(name: str, seconds: float, peak: int) -> None:
        results["runs"].append(
            {
                "method": name,
                "seconds": round(seconds, 2),
                "texts_per_s": round(len(texts) / seconds, 1),
                "tokens_per_s": round(sum(lengths) / seconds),
                "peak_gpu_gib": round(peak / 2**30, 1),
                "mfu_vs_989": round(flops / seconds / H200_BF16_PEAK, 3),
            }
        )

    for batch in args.st_batch_sizes:
        reset()
        start = time.perf_counter()
        vecs = model.encode(texts, batch_size=batch, convert_to_numpy=True)
        np.save(tmp / f"bare_{batch}.npy", vecs.astype(np.float16))
        sync()
        record(f"bare ST encode (batch {batch}) + np.save", time.perf_counter() - start, peak())
    corpus = tmp / "beir"
    corpus.mkdir()
    (corpus / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    )
    spec = random_teacher_spec()

    def ddx(name: str, budget: int) -> None:
        """One ddx precompute of the corpus into a fresh store, recorded as ``name``."""
        store = tmp / "store"
        reset()
        start = time.perf_counter()
        summary = precompute(
            PrecomputeConfig(
                store=str(store),
                data=(f"beir:{corpus}",),
                teacher=TeacherConfig(model="-"),
                token_budget=budget,
                roles=("passage",),
                progress=False,
            ),
            encoder=TeacherEncoder(model, spec, device),
        )
        sync()
        record(name, time.perf_counter() - start, peak())
        results["runs"][-1]["padding_waste"] = round(summary.padding_waste, 4)
        results["runs"][-1]["encoded"] = summary.encoded
        shutil.rmtree(store, ignore_errors=True)

    for budget in args.token_budgets:
        ddx(f"ddx precompute (token budget {budget})", budget)
    if args.compile:  # the same model, its blocks compiled (regional torch.compile), at the first budget
        from precompute.teacher import compile_blocks

        start = time.perf_counter()
        compile_blocks(model, spec)
        sync()
        results["compile_s"] = round(time.perf_counter() - start, 1)
        ddx(f"ddx precompute --compile (token budget {args.token_budgets[0]})", args.token_budgets[0])
    if args.profile_out:
        results["profile"] = profile_precompute(args, model, spec, corpus, tmp, device)
    bare = min(r["seconds"] for r in results["runs"] if r["method"].startswith("bare"))
    for r in results["runs"]:
        r["vs_best_bare"] = round(bare / r["seconds"], 3)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def profile_precompute(args: argparse.Namespace, model, spec, corpus: Path, tmp: Path, device: str) -> dict:
    """torch.profiler over one ddx precompute (first token budget): where the wall time goes.

    Writes the operator table (sorted by device time) to ``--profile-out`` and returns the share of the wall
    time the GPU spent in kernels (the rest is the GPU waiting on the host: tokenization, copies, the writer).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig, TeacherEncoder

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    store = tmp / "store_profile"
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        precompute(
            PrecomputeConfig(
                store=str(store),
                data=(f"beir:{corpus}",),
                teacher=TeacherConfig(model="-"),
                token_budget=args.token_budgets[0],
                roles=("passage",),
                progress=False,
            ),
            encoder=TeacherEncoder(model, spec, device),
        )
        if device == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    Path(args.profile_out).write_text(events.table(sort_by=sort, row_limit=40))
    kernel_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    shutil.rmtree(store, ignore_errors=True)
    kernel_s = kernel_us / 1e6
    return {"wall_s": round(wall, 2), "gpu_kernel_s": round(kernel_s, 2), "gpu_busy": round(kernel_s / wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=".gpu/dl19_corpus.jsonl")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--layers", type=int, default=GTE_QWEN2_7B["num_hidden_layers"])
    parser.add_argument("--st-batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--token-budgets", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--json-out")
    parser.add_argument("--profile-out", help="Also profile one ddx run (torch.profiler) and write its table here.")
    parser.add_argument(
        "--compile", action="store_true", help="Also run ddx with the teacher's blocks compiled (--compile)."
    )
    parser.add_argument("--tiny", action="store_true", help="Shrink the model (CPU smoke test of this script).")
    args = parser.parse_args()
    if args.tiny:
        GTE_QWEN2_7B.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
        args.layers = 2
    results = run(args)
    text = json.dumps(results, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)
    print(f"\n{'method':<44}{'s':>8}{'texts/s':>10}{'tokens/s':>12}{'MFU':>8}{'vs bare':>9}")
    for r in results["runs"]:
        print(
            f"{r['method']:<44}{r['seconds']:>8}{r['texts_per_s']:>10}{r['tokens_per_s']:>12}{r['mfu_vs_989']:>8}"
            f"{r['vs_best_bare']:>9}"
        )


if __name__ == "__main__":
    main()
