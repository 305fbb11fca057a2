"""``ddx cache verify`` against ``cat`` of the same files, side by side, cold (target ≤ 1.2× ``cat``).

Each round evicts the store from the page cache (``POSIX_FADV_DONTNEED``), then times ``cat`` of every file,
``verify_store`` with this checkout and, with ``--baseline DIR``, ``verify_store`` with another checkout's code
(e.g. a ``git worktree`` of an older commit), each in a fresh process. Rounds alternate, so load from other jobs
hits all of them alike; the medians and their ratios are printed.

Example:
    python bench/store_scale.py --rows 4000000 --dir /tmp --keep          # builds a 28.7 GB store
    git worktree add /tmp/old <commit>
    python bench/verify_vs_cat.py /tmp/ddx-scale-*/store --baseline /tmp/old --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from store_scale import evict  # noqa: E402

VERIFY = "import sys; from storage import verify_store; assert verify_store(sys.argv[1]).ok"


def timed(store: Path, argv: list[str], env: dict[str, str] | None = None) -> float:
    evict(store)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", type=Path)
    p.add_argument("--baseline", type=Path, default=None, help="checkout whose verify to time beside this one")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    files = [str(f) for f in args.store.rglob("*") if f.is_file()]
    runs: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "cat": (["cat", *files], None),
        "verify": ([sys.executable, "-c", VERIFY, str(args.store)], {**os.environ, "PYTHONPATH": str(REPO)}),
    }
    if args.baseline:
        env = {**os.environ, "PYTHONPATH": str(args.baseline)}
        runs["baseline"] = ([sys.executable, "-c", VERIFY, str(args.store)], env)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (argv, env) in runs.items():
            times[name].append(timed(args.store, argv, env))
        print({k: round(v[-1], 2) for k, v in times.items()}, file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"median_s": med, **{f"{k}_over_cat": med[k] / med["cat"] for k in med if k != "cat"}}, indent=1))


if __name__ == "__main__":
    main()
