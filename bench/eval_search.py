"""Benchmark exact top-k search side by side: chunked ``exact_search``, one dense ``q @ P.T`` + ``topk``, FAISS flat.

Each (method, dtype) runs in a fresh subprocess (this script re-invoked with ``--only METHOD``), so each peak RSS
is that method's own and one method's peak cannot mask another's. Every subprocess builds the same synthetic
normalised data from the seed (passages in float32 or float16, queries in float32), warms up on a few queries,
times ``--repeat`` full searches (best wall time kept; CPU seconds too, which stay meaningful on a busy machine),
and saves its top k. The parent then checks each method against the dense result: same top-k documents except
where scores tie within 1e-5 at the k-th place, and scores equal to 1e-5.

Example:
    python bench/eval_search.py --n-passages 200000 --dim 768 --n-queries 2000 --k 1000 --chunk-size 50000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("chunked", "dense", "faiss")
TOLERANCE = 1e-5
RESULT_PREFIX = "RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--only``/``--dtype``/``--out`` are for the per-method subprocesses)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-passages", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--n-queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=50_000)
    ap.add_argument("--query-block", type=int, default=None, help="queries per score block (default: automatic)")
    ap.add_argument("--dtypes", default="float32,float16", help="passage storage dtypes, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3, help="timed searches per method; the best wall time is kept")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write results as JSON to PATH ('-': stdout)")
    ap.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --- one method, in its own process -------------------------------------------------------------------------------


def make_data(n: int, nq: int, dim: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm Gaussian passages (``dtype``) and queries (float32), built in blocks to keep RSS at the data size."""
    rng = np.random.default_rng(seed)
    passages = np.empty((n, dim), dtype=dtype)
    for start in range(0, n, 10_000):
        block = rng.standard_normal((min(10_000, n - start), dim), dtype=np.float32)
        passages[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    queries = np.random.default_rng(seed + 1).standard_normal((nq, dim), dtype=np.float32)
    return passages, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def search_fn(method: str, args: argparse.Namespace) -> Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]:
    """``(queries, passages) -> (scores, indices)`` for ``method``."""
    import torch

    from distill.search.search import exact_search, faiss_search

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if method == "chunked":
        return lambda q, p: exact_search(
            q, p, args.k, chunk_size=args.chunk_size, query_block=args.query_block, device=device
        )
    if method == "faiss":
        return lambda q, p: faiss_search(q, p, args.k, index="flat", chunk_size=args.chunk_size)

    def dense(q: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = torch.from_numpy(q).to(device) @ torch.from_numpy(p).to(device).float().T
        top = torch.topk(scores, min(args.k, p.shape[0]), dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()

    return dense


def peak_rss_mib() -> float:
    """High-water resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident set size now."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def gpu_peak_mib(device: str | None) -> float | None:
    """Peak CUDA memory allocated by torch, when the search ran on a GPU."""
    import torch

    on_gpu = device != "cpu" and torch.cuda.is_available()
    return torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Time one method on one dtype; save its top k to ``--out``; return the measurements."""
    if args.only == "faiss":
        import faiss  # noqa: F401  (fail here, not inside the timed region)
    search = search_fn(args.only, args)
    passages, queries = make_data(args.n_passages, args.n_queries, args.dim, args.dtype, args.seed)
    search(queries[:8], passages[: min(len(passages), 20_000)])  # warm-up: thread pools, BLAS, allocator
    data_rss = rss_mib()  # libraries + data, before any full search
    walls, cpus, result = [], [], None
    for _ in range(args.repeat):
        result = None  # free the previous result before the next search
        wall, cpu = time.perf_counter(), time.process_time()
        result = search(queries, passages)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    scores, indices = result if result is not None else ((), ())
    np.savez(Path(args.out) / f"{args.only}-{args.dtype}.npz", scores=scores, indices=indices)
    peak = peak_rss_mib()
    return {
        "method": args.only,
        "dtype": args.dtype,
        "wall_s": min(walls),
        "wall_s_all": walls,
        "cpu_s": min(cpus),
        "queries_per_s": args.n_queries / min(walls),
        "peak_rss_mib": peak,
        "data_rss_mib": data_rss,
        "search_rss_mib": peak - data_rss,
        "gpu_peak_mib": gpu_peak_mib(args.device) if args.only != "faiss" else None,
    }


# --- the parent: launch, compare, report --------------------------------------------------------------------------


def launch(method: str, dtype: str, args: argparse.Namespace, out: str) -> dict[str, Any] | None:
    """Run one method in a fresh interpreter; ``None`` when it is unavailable (e.g. FAISS not installed)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", method, "--dtype", dtype, "--out", out]
    for name in ("n_passages", "dim", "n_queries", "k", "chunk_size", "query_block", "repeat", "seed", "device"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"[{method}/{dtype}] did not run (exit {proc.returncode}): {' | '.join(tail)}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def compare(candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray], n_docs: int) -> dict[str, Any]:
    """Agreement of two top-k results: scores position-wise, documents as sets up to near-ties at the k-th place."""
    s, i, rs, ri = candidate["scores"], candidate["indices"], reference["scores"], reference["indices"]
    if s.shape != rs.shape:
        return {"equal": False, "why": f"shape {s.shape} vs {rs.shape}"}
    max_diff = float(np.abs(s - rs).max()) if s.size else 0.0
    rows = np.arange(len(i))[:, None] * n_docs
    absent = ~np.isin(rows + i, rows + ri)  # documents of the candidate missing from the reference's row
    kth = rs[:, -1:]
    near_tie = np.abs(s - kth) <= TOLERANCE
    return {
        "equal": bool(max_diff <= TOLERANCE and np.all(near_tie[absent])),
        "max_score_diff": max_diff,
        "swapped_docs": int(absent.sum()),
        "same_position_frac": float(np.mean(i == ri)) if i.size else 1.0,
    }


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (dtype, method), each in its own process, plus agreement with the dense result."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddx-bench-") as out:
        for dtype in args.dtypes.split(","):
            results = {m: launch(m, dtype, args, out) for m in args.methods.split(",")}
            tops = {m: dict(np.load(Path(out) / f"{m}-{dtype}.npz")) for m, r in results.items() if r}
            dense = results.get("dense")
            for method, result in results.items():
                if result is None:
                    continue
                if dense is not None:
                    result["time_vs_dense"] = result["wall_s"] / dense["wall_s"]
                    result["cpu_vs_dense"] = result["cpu_s"] / dense["cpu_s"]
                    result["agreement"] = compare(tops[method], tops["dense"], args.n_passages)
                rows.append(result)
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Human-readable table of ``rows``."""
    print(
        f"N={args.n_passages} dim={args.dim} queries={args.n_queries} k={args.k} chunk={args.chunk_size} "
        f"repeat={args.repeat} cpus={os.cpu_count()}"
    )
    head = f"{'dtype':8} {'method':8} {'wall s':>7} {'q/s':>7} {'cpu s':>7} {'t/dense':>7} {'cpu/dense':>9} "
    print(head + f"{'peak RSS MiB':>12} {'search RSS MiB':>14} {'GPU peak MiB':>12}  equal to dense")
    for r in rows:
        agree = r.get("agreement", {})
        same = "-" if not agree else f"{agree['equal']} (max Δscore {agree.get('max_score_diff', 0):.1e})"
        gpu = "-" if r.get("gpu_peak_mib") is None else f"{r['gpu_peak_mib']:.0f}"
        print(
            f"{r['dtype']:8} {r['method']:8} {r['wall_s']:7.2f} {r['queries_per_s']:7.0f} {r['cpu_s']:7.2f} "
            f"{r.get('time_vs_dense', float('nan')):7.2f} {r.get('cpu_vs_dense', float('nan')):9.2f} "
            f"{r['peak_rss_mib']:12.0f} {r['search_rss_mib']:14.0f} {gpu:>12}  {same}"
        )
    print("search RSS = peak RSS - RSS after data and warm-up (the search's own memory); t/dense = wall time ratio")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one method (subprocess mode) or the whole comparison."""
    args = parse_args(argv)
    if args.only:
        print(RESULT_PREFIX + json.dumps(run_one(args)), flush=True)
        return
    rows = run_all(args)
    if args.json == "-":
        print(json.dumps({"config": vars(args), "results": rows}, indent=2))
        return
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
