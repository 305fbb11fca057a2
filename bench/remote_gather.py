"""Random batched gathers from an S3 store (moto's server on 127.0.0.1) vs a local copy: rows/s and RSS.

Phase-2 training gathers teacher vectors in random batches of 288 rows, in every rank and every DataLoader
worker. Remote gathers used to download each 28 MiB chunk they touched and keep it for the process's life,
so every process ended up holding the whole store. Now a remote gather fetches the rows asked for by byte
range (adjacent rows merged) into a bounded LRU of rows (``TeacherStore.open(url, cache_bytes=...)``).

The bench builds a synthetic store locally, uploads a copy to moto's S3 server (started here, in a process
of its own, so its memory is not counted), then runs each mode in a fresh process:

* ``local``: the local copy (``pread`` gathers),
* ``s3``: the S3 store, byte ranges behind a cache of ``--cache-mib``,
* ``s3-whole-chunks``: the S3 store read the old way (whole chunks through zarr, kept), for comparison.

Each reports rows/s over ``--batches`` random batches and its RSS growth over the gathers (peak RSS after
the gathers minus RSS before them, ``VmHWM`` reset first; the key index and row checks are built before).
Target: the ``s3`` growth stays within the cache size plus a few batches, whatever the store size.

Example:
    python bench/remote_gather.py                      # 20k rows x 3584-d fp16 (~140 MB), 32 MiB cache
    python bench/remote_gather.py --rows 40000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage import TeacherStore, content_keys  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from store_scale import build_store  # noqa: E402  (the same synthetic store as the local-scale bench)

BUCKET = "ddx-bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000, help="rows in the store (default 20000: ~140 MB at 3584-d)")
    p.add_argument("--dim", type=int, default=3584)
    p.add_argument("--batch", type=int, default=288, help="rows per gather (phase-2 shape)")
    p.add_argument("--batches", type=int, default=60, help="random batches timed per mode")
    p.add_argument("--cache-mib", type=float, default=32.0, help="remote row cache of the s3 mode (MiB)")
    p.add_argument("--modes", default="local,s3,s3-whole-chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One mode in this (fresh) process: open, build the index and row checks, reset the peak, gather, measure."""
    if cfg["mode"] == "s3-whole-chunks":
        from storage.segment_reader import SegmentReader

        SegmentReader.rangeable = property(lambda self: False)  # type: ignore[assignment,method-assign]
    opts = cfg.get("storage_options")
    store = TeacherStore.open(cfg["url"], storage_options=opts, cache_bytes=int(cfg["cache_mib"] * 2**20))
    keys = content_keys("passage", [f"scale passage {i}" for i in range(cfg["rows"])])  # store_scale's texts
    gids = store.locate(keys)
    rng = np.random.default_rng(cfg["seed"])
    batches = [gids[rng.integers(0, len(gids), cfg["batch"])] for _ in range(cfg["batches"] + 1)]
    out = np.empty((cfg["batch"], store.dim), dtype=store.dtype)
    store.get_rows(batches[0][:1], out=out[:1])  # index, row checks and the gather's state built before timing
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    for b in batches[1:]:
        store.get_rows(b, out=out)
    elapsed = time.perf_counter() - t0
    ranges = store._row_gather().ranges
    return {
        "mode": cfg["mode"],
        "rows_per_s": cfg["batch"] * cfg["batches"] / elapsed,
        "rss_before_mib": before / 2**20,
        "rss_growth_mib": (_vm("VmHWM") - before) / 2**20,
        "range_requests": None if ranges is None else ranges.requests,
        "fetched_mib": None if ranges is None else ranges.bytes_fetched / 2**20,
        "cache_hits": None if ranges is None else ranges.hits,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import s3fs

    tmp = Path(tempfile.mkdtemp(prefix="ddx-remote-gather-"))
    port = free_port()
    moto = start_moto(port)
    try:
        opts = {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"region_name": "us-east-1"},
        }
        fs = s3fs.S3FileSystem(**opts)
        fs.call_s3("create_bucket", Bucket=BUCKET)
        local = tmp / "store"
        t0 = time.perf_counter()
        build_store(local, args.rows, args.dim)
        fs.put(str(local), f"{BUCKET}/store", recursive=True)
        setup_s = time.perf_counter() - t0
        store_mib = sum(f.stat().st_size for f in local.rglob("*") if f.is_file()) / 2**20
        results = []
        for mode in args.modes.split(","):
            cfg = {
                "mode": mode,
                "url": str(local) if mode == "local" else f"s3://{BUCKET}/store",
                "storage_options": None if mode == "local" else opts,
                "rows": args.rows,
                "batch": args.batch,
                "batches": args.batches,
                "cache_mib": args.cache_mib,
                "seed": args.seed,
            }
            run = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, check=False
            )
            if run.returncode != 0:
                raise RuntimeError(f"mode {mode} failed:\n{run.stderr}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    finally:
        moto.kill()
        moto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "rows": args.rows,
        "dim": args.dim,
        "store_mib": store_mib,
        "cache_mib": args.cache_mib,
        "batch": args.batch,
        "batches": args.batches,
        "setup_s": setup_s,
        "cpus": os.cpu_count(),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"store {args.rows} x {args.dim} fp16 = {store_mib:.0f} MiB; {args.batches} random batches of "
            f"{args.batch}; s3 cache {args.cache_mib:g} MiB"
        )
        print(f"{'mode':<17}{'rows/s':>10}{'RSS growth MiB':>16}{'requests':>10}{'fetched MiB':>13}")
        for r in results:
            req = "" if r["range_requests"] is None else str(r["range_requests"])
            fetched = "" if r["fetched_mib"] is None else f"{r['fetched_mib']:.1f}"
            print(f"{r['mode']:<17}{r['rows_per_s']:>10.0f}{r['rss_growth_mib']:>16.1f}{req:>10}{fetched:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
