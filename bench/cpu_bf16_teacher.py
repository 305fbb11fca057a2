"""Teacher encoding on CPU: float32 vs bfloat16 autocast vs bfloat16 weights, side by side in one run.

On CPUs with AMX (Sapphire Rapids and later: ``lscpu | grep amx``) bfloat16 matrix products run on the tile unit, so
``ddx precompute-teacher --dtype bfloat16`` encodes several times faster than the CPU default (float32) with vectors
that agree to cosine ≥ 0.9999. The dtype is part of the teacher spec (and the store's fingerprint), so it is a
choice made once per store, not a default that changes under a user.

Usage:
    python bench/cpu_bf16_teacher.py [--texts 48] [--batch-size 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--texts", type=int, default=48, help="SciFact abstracts to encode")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from cli.offline_models import mpnet_path

    texts = []
    with open(Path(args.data_root) / "scifact" / "corpus.jsonl") as f:
        for line in f:
            d = json.loads(line)
            texts.append(f"{d['title']} {d['text']}")
            if len(texts) >= args.texts:
                break

    def timed(model: SentenceTransformer, autocast: bool = False) -> tuple[float, np.ndarray]:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            model.encode(texts[:4], batch_size=4)  # warm-up
            start = time.perf_counter()
            out = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
        return len(texts) / (time.perf_counter() - start), out.astype(np.float32)

    fp32 = SentenceTransformer(str(mpnet_path()), device="cpu")
    rate32, ref = timed(fp32)
    rate_ac, ac = timed(fp32, autocast=True)
    bf16 = SentenceTransformer(str(mpnet_path()), device="cpu", model_kwargs={"dtype": torch.bfloat16})
    rate_bf, bf = timed(bf16)

    def cos(a: np.ndarray) -> float:
        return float(((a * ref).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(ref, axis=1)).min())

    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    out = {
        "texts": len(texts),
        "amx_bf16": amx,
        "float32_texts_per_s": round(rate32, 2),
        "autocast_bf16_texts_per_s": round(rate_ac, 2),
        "bf16_weights_texts_per_s": round(rate_bf, 2),
        "bf16_weights_speedup": round(rate_bf / rate32, 2),
        "min_cos_autocast": round(cos(ac), 5),
        "min_cos_bf16_weights": round(cos(bf), 5),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<28}{v}")


if __name__ == "__main__":
    main()
