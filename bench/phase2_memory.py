"""Phase-2 step memory and time: the cached (GradCache) step against the plain one, each in its own process.

One phase-2 training step as ``ddx train`` runs it (``DistillModule.forward_backward`` of all-MiniLM-L6-v2 + a
384 → 768 → 768 projection, ``Phase2Loss`` in ``projected+hybrid`` with ``vector`` MSE, then AdamW), on a synthetic
batch at the worst case for memory: ``--batch`` queries of ``--query-len`` tokens, each with one positive and
``--negatives`` hard negatives of exactly ``--max-len`` tokens (no padding to shed). Variants:

* ``plain``: every sequence of the batch in one graph (``--mini-batch-size 0``);
* ``cached``: the cached step, ``--mini-batch-size`` sequences per forward (distill/train/cached_loss.py);
* ``plain-gc`` / ``cached-gc``: the same with ``--gradient-checkpointing``.

Each variant runs in a fresh subprocess (``--steps`` steps, the first untimed; ``--rounds`` runs the variants in turn
that many times, so that load from other processes hits them alike, and reports the median and the minimum step
time: on a shared machine the minimum is the least disturbed, and the process's CPU time per step, which other
processes do not inflate — with ``--threads 1`` it is the step's compute); its peak RSS is the child's own
``ru_maxrss``, and the parent samples the child's RSS meanwhile and stops it past ``--rss-limit-gb`` (default: 85 %
of the memory available at start), so a plain step too big for the machine is reported, not an OOM-killed neighbour.
At the default size the plain step needs ~22 GB (measured per sequence at smaller sizes, see ``--batch``): run it
only on a machine with that much free.

The arithmetic printed at the end sizes the default recipe for the product's student, all-mpnet-base-v2 at 512
tokens, with the default batch (32 × (2 + 7) = 288 sequences) on an 80 GB GPU.

Example:
    python bench/phase2_memory.py --batch 8 --max-len 128              # both variants at a size every machine fits
    python bench/phase2_memory.py --variants cached                    # the default size, cached only (≤ 3 GB)
    python bench/phase2_memory.py --variants cached,plain --json       # the full comparison (~22 GB for plain)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "cached", "plain-gc", "cached-gc")
GB = 1024**3

# all-mpnet-base-v2 (MPNetModel, eager attention: the scores are materialised) and all-MiniLM-L6-v2.
MPNET = dict(layers=12, hidden=768, heads=12, ffn=3072, params=109.5e6)
MINILM = dict(layers=6, hidden=384, heads=12, ffn=1536, params=22.7e6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="queries per step")
    p.add_argument("--negatives", type=int, default=7, help="hard negatives per query")
    p.add_argument("--max-len", type=int, default=256, help="tokens per passage (positives and negatives)")
    p.add_argument("--query-len", type=int, default=32, help="tokens per query")
    p.add_argument("--mini-batch-size", type=int, default=8, help="sequences per forward of the cached variants")
    p.add_argument("--variants", default="cached,plain", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round (the first is not timed)")
    p.add_argument("--rounds", type=int, default=1, help="rounds: every variant once per round, in turn")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--rss-limit-gb", type=float, default=None, help="stop a variant past this RSS (default: 85%% free)")
    p.add_argument("--teacher-dim", type=int, default=768, help="projection output (mpnet's 768 by default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return args


# ---------------------------------------------------------------- one variant (the child process)


def synthetic_batch(args: argparse.Namespace, vocab: int, seed: int = 0) -> dict[str, Any]:
    """A collated phase-2 batch: full-length sequences ([CLS] … [SEP] of random word pieces), random unit vectors."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)

    def tokens(n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1000, vocab, (n, length), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # BERT's [CLS] and [SEP]
        return ids, torch.ones(n, length, dtype=torch.long)

    b, k, d = args.batch, args.negatives, args.teacher_dim
    batch: dict[str, Any] = {"neg_mask": torch.ones(b, k, dtype=torch.bool)}
    for name, n, length in (("query", b, args.query_len), ("pos", b, args.max_len), ("neg", b * k, args.max_len)):
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = tokens(n, length)
    for name, shape in (("teacher_query", (b, d)), ("teacher_pos", (b, d)), ("teacher_neg", (b, k, d))):
        batch[name] = F.normalize(torch.randn(*shape, generator=g), dim=-1)
    return batch


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run ``--steps`` steps of ``args.child``; peak RSS and step times of this process."""
    import torch
    from sentence_transformers import SentenceTransformer

    from cli.offline_models import minilm_path
    from distill.model.model import StudentModelWithProjection
    from distill.model.projection import ProjectionLayer
    from distill.train.losses import Phase2Loss
    from distill.train.trainer import DistillModule

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student = SentenceTransformer(str(minilm_path()), device="cpu")
    student.max_seq_length = max(args.max_len, args.query_len)
    model = StudentModelWithProjection(student, ProjectionLayer(student_dim=384, teacher_dim=args.teacher_dim))
    cached = args.child.startswith("cached")
    module = DistillModule(
        model,
        Phase2Loss(space="projected+hybrid", mse_reduction="vector"),
        2,
        mini_batch_size=args.mini_batch_size if cached else None,
        gradient_checkpointing=args.child.endswith("-gc"),
    ).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-5)
    batch = synthetic_batch(args, student.tokenizer.vocab_size)
    rss_before = _rss()
    times, cpu, losses = [], [], []
    for _ in range(args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(module.forward_backward(batch)["loss"]))
        optimizer.step()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return {
        "variant": args.child,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        "rss_before_steps_gb": rss_before / GB,
        "step_times_s": [round(t, 3) for t in (times[1:] or times)],  # the first step allocates: untimed
        "step_cpu_s": [round(t, 3) for t in (cpu[1:] or cpu)],
        "losses": [round(x, 5) for x in losses],
        "threads": torch.get_num_threads(),
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- the parent: one subprocess per variant


def measure(variant: str, argv: list[str], limit_gb: float) -> dict[str, Any]:
    """Run one variant in a child process, sampling its RSS every 50 ms; stop it past ``limit_gb``."""
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child, sampled = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            sampled = max(sampled, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if sampled > limit_gb * GB:
            proc.kill()
            proc.wait()
            return {"variant": variant, "stopped": f"RSS passed {limit_gb:.1f} GB", "sampled_peak_gb": sampled / GB}
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return {"variant": variant, "failed": f"exit {proc.returncode}: {stderr.strip()[-2000:]}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["sampled_peak_gb"] = sampled / GB
    return result


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds: the highest peak, every timed step pooled (median, and minimum: the least disturbed)."""
    failed = [r for r in runs if "peak_rss_gb" not in r]
    if failed:
        return failed[0]
    times = [t for r in runs for t in r["step_times_s"]]
    cpu = [t for r in runs for t in r["step_cpu_s"]]
    return {
        "variant": runs[0]["variant"],
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "sampled_peak_gb": max(r["sampled_peak_gb"] for r in runs),
        "rss_before_steps_gb": max(r["rss_before_steps_gb"] for r in runs),
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "step_times_s": times,
        "step_cpu_s": statistics.median(cpu),
        "losses": runs[0]["losses"],
        "threads": runs[0]["threads"],
    }


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        f"--batch={args.batch}",
        f"--negatives={args.negatives}",
        f"--max-len={args.max_len}",
        f"--query-len={args.query_len}",
        f"--mini-batch-size={args.mini_batch_size}",
        f"--steps={args.steps}",
        f"--teacher-dim={args.teacher_dim}",
    ]
    return argv + ([f"--threads={args.threads}"] if args.threads else [])


# ---------------------------------------------------------------- the arithmetic


def activation_bytes_per_layer(seq: int, hidden: int, heads: int, ffn: int, *, half: bool) -> float:
    """Bytes one encoder layer keeps for backward per sequence (eager attention, dropout masks as bytes).

    Saved ``seq × hidden`` tensors: the QKV input, Q, K, V, the attention output, the out-projection's LayerNorm
    input, the FFN input and its LayerNorm input (8), plus two ``seq × ffn`` (the GELU's input and output); two
    dropout masks (1 byte). Per head, ``seq × seq``: the softmax output and the dropped-out probabilities, plus
    their dropout mask (1 byte). In 16-bit this is Korthikanti et al.'s ``s·h·(34 + 5·a·s/h)`` for ``ffn = 4h``.
    """
    width = 2 if half else 4
    per_token = (8 * hidden + 2 * ffn) * width + 2 * hidden
    per_head = seq * (2 * width + 1)
    return seq * per_token + heads * seq * per_head


def arithmetic(mini_batch_size: int, batch: int = 32, negatives: int = 7, gpu_gb: float = 80.0) -> dict[str, Any]:
    """The default phase 2 for mpnet at 512 tokens on an ``gpu_gb`` GPU: plain vs cached, fp32 and bf16."""
    seqs = batch * (2 + negatives)
    static = MPNET["params"] * 16 / GB  # fp32 weights + gradients + AdamW's two moments
    rows = {}
    for precision, half in (("fp32", False), ("bf16", True)):
        layer = activation_bytes_per_layer(512, MPNET["hidden"], MPNET["heads"], MPNET["ffn"], half=half)
        per_seq = layer * MPNET["layers"] / GB
        rows[precision] = {
            "per_layer_per_seq_mb": layer / 1024**2,
            "per_seq_gb": per_seq,
            "plain_gb": static + seqs * per_seq,
            "cached_gb": static + mini_batch_size * per_seq,
            "largest_mini_batch": int((gpu_gb * 0.9 - static) / per_seq),
        }
    return {"sequences": seqs, "static_gb": static, "gpu_gb": gpu_gb, "mini_batch_size": mini_batch_size, **rows}


def print_arithmetic(a: dict[str, Any]) -> None:
    m, n = a["mini_batch_size"], a["sequences"]
    print(
        f"\nall-mpnet-base-v2 at 512 tokens, default batch 32 × (1 query + 1 positive + 7 negatives) = {n} "
        f"sequences, {a['gpu_gb']:.0f} GB GPU;\n"
        f"weights + gradients + AdamW moments: 109.5 M params × 16 B = {a['static_gb']:.2f} GB"
    )
    print(
        f"{'':>6} {'MB/layer/seq':>13} {'GB/seq (12 l.)':>15} {'plain (288)':>12} {f'cached (m={m})':>15} {'max m':>6}"
    )
    for precision in ("fp32", "bf16"):
        r = a[precision]
        print(
            f"{precision:>6} {r['per_layer_per_seq_mb']:>13.1f} {r['per_seq_gb']:>15.3f} {r['plain_gb']:>10.1f} GB "
            f"{r['cached_gb']:>12.1f} GB {r['largest_mini_batch']:>6}"
        )
    print(
        f"plain needs {n} sequences' activations at once (> {a['gpu_gb']:.0f} GB in either precision); the cached step "
        f"holds {m}: it fits with room to spare (max m: 90 % of the GPU)."
    )


def print_results(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    seqs = args.batch * (2 + args.negatives)
    print(
        f"phase-2 step, MiniLM on CPU: {args.batch} queries × {args.query_len} tokens + "
        f"{args.batch * (1 + args.negatives)} passages × {args.max_len} tokens = {seqs} sequences; "
        f"cached mini-batch {args.mini_batch_size}"
    )
    print(
        f"{'variant':<10} {'peak RSS':>9} {'before steps':>13} {'median step':>12} {'min step':>9} "
        f"{'CPU time':>9}  note"
    )
    for r in results:
        if "peak_rss_gb" in r:
            print(
                f"{r['variant']:<10} {r['peak_rss_gb']:>6.2f} GB {r['rss_before_steps_gb']:>10.2f} GB "
                f"{r['step_s']:>10.2f} s {r['step_min_s']:>7.2f} s {r['step_cpu_s']:>7.2f} s  steps {r['step_times_s']}"
            )
        else:
            note = r.get("stopped") or r.get("failed")
            print(f"{r['variant']:<10} {'-':>9} {'-':>13} {'-':>12} {'-':>9} {'-':>9}  {note}")
    done = {r["variant"]: r for r in results if "peak_rss_gb" in r}
    for base, other in (("plain", "cached"), ("plain-gc", "cached-gc"), ("plain", "plain-gc"), ("plain", "cached-gc")):
        if base in done and other in done:
            a, b = done[base], done[other]
            print(
                f"{other} / {base}: peak RSS {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}×, step time "
                f"{b['step_s'] / a['step_s']:.2f}× (median), {b['step_min_s'] / a['step_min_s']:.2f}× (min), "
                f"CPU time {b['step_cpu_s'] / a['step_cpu_s']:.2f}×"
            )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args)))
        return
    import psutil

    limit = args.rss_limit_gb or 0.85 * psutil.virtual_memory().available / GB
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):  # in turn, so that load from other processes hits every variant alike
        for variant in args.variants:
            runs[variant].append(measure(variant, _child_argv(args), limit))
    results = [combine(variant_runs) for variant_runs in runs.values()]
    numbers = arithmetic(args.mini_batch_size)
    if args.json:
        print(json.dumps({"args": {**vars(args), "rss_limit_gb": limit}, "results": results, "mpnet_512": numbers}))
        return
    print_results(results, args)
    print_arithmetic(numbers)


if __name__ == "__main__":
    main()
