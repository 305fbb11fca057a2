"""Peak RSS of ``precompute`` over SciFact's 5,183 passages vs 4× as many: memory must not grow with the corpus.

Precompute streams its sources twice and keeps per text only fixed-size arrays: the keys seen
(``KeySet``, 16 B a key), the keys to encode (16 B) and their done flags (1 B), plus each source's
id ledger (3 × int64 = 24 B an id, and a dict of recent ids that is flushed every 2^18 ids). Texts
are held one window at a time (``--window`` texts, sorted together by length), so beyond the key
arrays the peak is set by the window and the model, not by the corpus size.

Setup: a tiny random BERT (``tests.tiny_models.build_tiny_bert``, 2 layers, 32-d) so the runs are
fast; corpus 1× is SciFact's corpus.jsonl, corpus 4× repeats it with the texts altered (suffix
`` [copy k]``, new ids) so every text is a new key. Each run is a fresh subprocess; the peak is
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the baseline the RSS after imports and model load.

Reported per window size: both peaks, their difference, and the key-array bytes the difference
should be explained by (``extra texts × 57 B``: 16 + 16 + 1 + 24). A second table runs the scan pass
alone (``limit=0``: read, key, dedup every text, encode none) over 1×, 4× and 16× the corpus, which
shows where the growth stops: the ledger's dict of recent ids (~250 B an id) is flushed into its
arrays every 2^18 ids, and freed parse buffers stay with the allocator.

Before the fix in ``TeacherEncoder.token_lengths`` (one tokenizer call over the whole window kept
~130 KB of encodings per SciFact abstract alive), the same runs peaked at 1,269 and 3,367 MiB.

Example:
    python bench/precompute_memory.py                       # default window (65,536), scan 1x/4x/16x
    python bench/precompute_memory.py --windows 65536,4096 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_TEXT = 16 + 16 + 1 + 24  # seen keys, keys to encode, done flags, id ledger


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="BEIR SciFact folder (default ../shared/data/scifact)")
    p.add_argument("--copies", type=int, default=4, help="size of the large corpus, in copies of SciFact")
    p.add_argument(
        "--windows",
        default="65536",
        help="comma-separated --window values to measure (default: precompute's default, 65536)",
    )
    p.add_argument("--scan-copies", default="1,4,16", help="corpus sizes (in copies) for the scan-only runs")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def child(args: argparse.Namespace) -> None:
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig, load_teacher

    teacher = TeacherConfig(model=str(args.model), device="cpu")
    encoder = load_teacher(teacher)
    encoder.encode(["warm up the model once"], "passage")  # allocator pools, lazy kernels: same for both runs
    baseline = rss_bytes()
    config = PrecomputeConfig(
        store=str(args.store),
        data=(f"beir:{args.corpus}",),
        teacher=teacher,
        window=args.window,
        limit=args.limit,
        progress=False,
    )
    t0 = time.perf_counter()
    summary = precompute(config, encoder=encoder)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(
        json.dumps(
            {
                "baseline": baseline,
                "peak": peak,
                "encoded": summary.encoded,
                "texts": summary.texts_read,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


def write_corpus(src: Path, dest: Path, copies: int) -> int:
    """SciFact's corpus ``copies`` times (copy k > 0: texts end in " [copy k]", ids "<id>-k"); returns lines."""
    dest.mkdir(parents=True)
    lines = (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    n = 0
    with open(dest / "corpus.jsonl", "w", encoding="utf-8") as f:
        for k in range(copies):
            for line in lines:
                obj = json.loads(line)
                if k:
                    obj["_id"], obj["text"] = f"{obj['_id']}-{k}", f"{obj['text']} [copy {k}]"
                f.write(json.dumps(obj) + "\n")
                n += 1
    return n


def run_child(model: Path, corpus: Path, store: Path, window: int = 65_536, limit: int | None = None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        str(model),
        "--corpus",
        str(corpus),
        "--store",
        str(store),
        "--window",
        str(window),
        *(["--limit", str(limit)] if limit is not None else []),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DDX_CACHE_DIR": str(store.parent / "cache"),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_model(path: Path) -> Path:
    code = f"from tests.tiny_models import build_tiny_bert; build_tiny_bert(__import__('pathlib').Path({str(path)!r}))"
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    data = args.data or Path(os.environ.get("DDX_SHARED_DATA", REPO.parent / "shared" / "data")) / "scifact"
    work = Path(tempfile.mkdtemp(prefix="ddx-memory-"))
    try:
        model = build_model(work / "tiny-bert")
        copies = sorted({1, args.copies, *(int(c) for c in args.scan_copies.split(","))})
        corpora = {k: work / f"x{k}" for k in copies}
        for k, folder in corpora.items():
            write_corpus(data, folder, k)
        results = {"full": [], "scan": []}
        for window in (int(w) for w in args.windows.split(",")):
            runs = {k: run_child(model, corpora[k], work / f"s{k}-{window}", window) for k in (1, args.copies)}
            for r in runs.values():
                print(f"window {window}, {r['texts']} texts: peak {r['peak'] / 2**20:.1f} MiB", file=sys.stderr)
            results["full"].append(compare(runs[1], runs[args.copies], window=window))
        scans = {k: run_child(model, corpora[k], work / f"scan{k}", limit=0) for k in sorted(set(copies))}
        results["scan"] = [compare(scans[1], scans[k], copies=k) for k in scans if k != 1]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, as_json=args.json)


def compare(small: dict, large: dict, **label: int) -> dict:
    extra = large["texts"] - small["texts"]
    return {
        **label,
        "small": small,
        "large": large,
        "peak_diff": large["peak"] - small["peak"],
        "baseline_diff": large["baseline"] - small["baseline"],
        "key_arrays_expected": extra * BYTES_PER_TEXT,
    }


def report(results: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    mib = 2**20
    print("full precompute (tiny BERT):")
    print(f"{'window':>7} {'texts':>7} {'baseline MiB':>13} {'peak MiB':>9} {'peak-baseline':>14} {'s':>6}")
    for r in results["full"]:
        for side in ("small", "large"):
            s = r[side]
            print(
                f"{r['window']:>7} {s['texts']:>7} {s['baseline'] / mib:>13.1f} {s['peak'] / mib:>9.1f} "
                f"{(s['peak'] - s['baseline']) / mib:>14.1f} {s['seconds']:>6.1f}"
            )
        print(
            f"{'':>7} peak difference {r['peak_diff'] / mib:.1f} MiB; the key arrays account for "
            f"{r['key_arrays_expected'] / mib:.2f} MiB ({BYTES_PER_TEXT} B x extra texts)"
        )
    print("scan pass only (limit=0: read, key, dedup; no encoding):")
    first = results["scan"][0]["small"] if results["scan"] else None
    if first:
        print(f"  {first['texts']:>7} texts: peak {first['peak'] / mib:.1f} MiB")
    for r in results["scan"]:
        s = r["large"]
        print(
            f"  {s['texts']:>7} texts: peak {s['peak'] / mib:.1f} MiB (+{r['peak_diff'] / mib:.1f} MiB; key arrays "
            f"{r['key_arrays_expected'] / mib:.2f} MiB)"
        )


if __name__ == "__main__":
    main()
