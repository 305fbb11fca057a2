"""Storage at scale (issue 10): gathers, scans, verify, ls/info on a synthetic 3584-d store, beside their limits.

Writes a store of ``--rows`` synthetic float16 rows through ddx's writer (no model), then measures each
storage row of issue 10 against its limit, in one run:

* **cold random gathers** (batches of 288; every chunk file evicted from the page cache first with
  ``POSIX_FADV_DONTNEED``): one ``preadv`` a row on raw descriptors (the limit) vs ``get_rows`` in
  ``pread`` mode (the default) vs ``mmap`` mode (the path before); rows/s and bytes read from disk
  (``/proc/self/io`` read_bytes) per byte returned;
* **warm random gathers** (page cache hot): ``pread`` vs ``mmap`` mode, interleaved repeats, median ratio;
* **full scan** (cold): a raw sequential read of every chunk file (the limit) vs ``iter_batches`` (rows
  checked) vs the memory-map scan it replaced; each in a child process for its peak RSS;
* **verify** (cold): ``cat`` of the store's files vs ``ddx cache verify``, each a child process;
* **ls/info**: ``ddx cache info --json`` (COMMITs only) vs ``--duplicates`` (loads every key, what info
  did before), each a child process: wall, CPU and peak RSS;
* **commit**: index.parquet of ``--rows`` rows from 4,096-row index parts, streamed part by part vs
  built in memory (before), each a child process: RSS growth.

Ratios matter, not absolute times (2 shared cores). Exit status 0 when every target is met.

Example:
    python bench/store_scale.py --rows 300000          # ~2.1 GB store, a few minutes
    python bench/store_scale.py --json > scale.json    # 4 M rows, ~28.7 GB: a store larger than RAM
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import TeacherSpec, TeacherStore, content_keys  # noqa: E402
from storage.segment_format import check_rows, key_seeds  # noqa: E402

BATCH = 288


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=4_000_000, help="rows in the store (default 4 M, ~28.7 GB)")
    p.add_argument("--dim", type=int, default=3584)
    p.add_argument("--cold-batches", type=int, default=20, help="batches of 288 per cold gather (pread paths)")
    p.add_argument("--cold-mmap-batches", type=int, default=3, help="batches for the slow cold mmap path")
    p.add_argument("--warm-rows", type=int, default=200_000, help="rows of the store kept warm for warm gathers")
    p.add_argument("--warm-batches", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    p.add_argument("--store", type=Path, default=None, help="reuse a store an earlier --keep run built")
    p.add_argument("--keep", action="store_true", help="keep the store after the run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the store ---------------------------------------------------------------------------------


def build_store(path: Path, rows: int, dim: int) -> float:
    """Write ``rows`` rows of random finite float16 bits through the writer; returns rows/s."""
    spec = TeacherSpec(
        model="bench-synthetic",
        weights_id="files:bench",
        pooling="lasttoken",
        normalize=True,
        max_seq_length=512,
        dim=dim,
    )
    store = TeacherStore.create(path, spec)
    rng = np.random.default_rng(0)
    block = 8192
    t0 = time.perf_counter()
    with store.writer() as w:
        for s in range(0, rows, block):
            e = min(s + block, rows)
            keys = content_keys("passage", [f"scale passage {i}" for i in range(s, e)])
            bits = rng.integers(0, 1 << 16, size=(e - s, dim), dtype=np.uint16) & 0xBFFF  # top exponent bit off:
            vecs = bits.view(np.float16)  # random, incompressible and finite (the writer refuses NaN/inf)
            roles = (np.arange(s, e) % 10 == 0).astype(np.uint8)
            w.append(keys, vecs, roles, np.full(e - s, 128, np.int32))
    return rows / (time.perf_counter() - t0)


def chunk_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path, "segments").glob("*/vectors/c/*/0"))


def evict(path: Path) -> None:
    """Drop every file of the store from the page cache (clean pages: the writer fsynced them)."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_bytes_io() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


# -- gathers -----------------------------------------------------------------------------------


def raw_pread_gather(store: TeacherStore, batches: np.ndarray) -> None:
    """The limit: one preadv a row into the output, sorted by file and offset, no checks."""
    seg = store.segments[0]
    row_bytes = seg.dim * 2
    fds: dict[int, int] = {}
    out = np.empty((BATCH, seg.dim), np.float16)
    view = memoryview(out).cast("B")  # type: ignore[arg-type]
    for b in batches:
        order = np.argsort(b)
        for k, g in zip(order.tolist(), b[order].tolist(), strict=True):
            c, r = divmod(g, seg.chunk_rows)
            if c not in fds:
                fds[c] = os.open(Path(store.url, "segments", seg.seg_id, "vectors", "c", str(c), "0"), os.O_RDONLY)
                os.posix_fadvise(fds[c], 0, 0, os.POSIX_FADV_RANDOM)
            os.preadv(fds[c], [view[k * row_bytes : (k + 1) * row_bytes]], r * row_bytes)
    for fd in fds.values():
        os.close(fd)


def cold_gathers(path: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each path in turn, ``--repeats`` times, the store evicted before each; medians."""
    rng = np.random.default_rng(1)
    runs: dict[str, list[tuple[float, float]]] = {"raw_pread": [], "pread": [], "mmap": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(_cold_gather(path, name, args, rng))
    return {
        name: {
            "rows_per_s": statistics.median(r for r, _ in got),
            "read_per_returned": statistics.median(b for _, b in got),
        }
        for name, got in runs.items()
    }


def _cold_gather(path: Path, name: str, args: argparse.Namespace, rng: np.random.Generator) -> tuple[float, float]:
    """(rows/s, bytes read from disk per byte returned) of one cold run of ``name``."""
    store = TeacherStore.open(path)
    store.gather_mode = "pread" if name == "raw_pread" else name
    store._row_gather()  # builds the row checks (reads the index) before the clock starts
    n = args.cold_mmap_batches if name == "mmap" else args.cold_batches
    batches = rng.integers(0, store.rows, size=(n, BATCH))
    buf = np.empty((BATCH, store.dim), np.float16)
    evict(path)
    io0, t0 = read_bytes_io(), time.perf_counter()
    if name == "raw_pread":
        raw_pread_gather(store, batches)
    else:
        for b in batches:
            store.get_rows(b, out=buf)
    wall, read = time.perf_counter() - t0, read_bytes_io() - io0
    return batches.size / wall, read / (batches.size * store.dim * 2)


def warm_gathers(path: Path, args: argparse.Namespace) -> dict[str, float]:
    """pread vs mmap mode with the page cache hot (rows drawn from the first ``--warm-rows``), interleaved."""
    stores = {}
    for mode in ("pread", "mmap"):
        stores[mode] = TeacherStore.open(path)
        stores[mode].gather_mode = mode
    span = min(args.warm_rows, stores["pread"].rows)
    batches = np.random.default_rng(2).integers(0, span, size=(args.warm_batches, BATCH))
    buf = np.empty((BATCH, stores["pread"].dim), np.float16)
    for s in stores.values():  # warm: page cache and (mmap) the maps
        for lo in range(0, span, 16384):
            s.get_rows(np.arange(lo, min(lo + 16384, span)))
    rates: dict[str, list[float]] = {m: [] for m in stores}
    for _ in range(args.repeats):
        for mode, s in stores.items():
            t0 = time.perf_counter()
            for b in batches:
                s.get_rows(b, out=buf)
            rates[mode].append(batches.size / (time.perf_counter() - t0))
    ratio = statistics.median(p / m for p, m in zip(rates["pread"], rates["mmap"], strict=True))
    return {
        "pread_rows_per_s": statistics.median(rates["pread"]),
        "mmap_rows_per_s": statistics.median(rates["mmap"]),
        "pread_over_mmap": ratio,
    }


# -- children (one measurement each, for its own peak RSS) -------------------------------------


def child(name: str, path: Path) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    if name == "raw_read":
        buf = None
        for f in chunk_files(path):
            size = f.stat().st_size
            buf = buf if buf is not None and len(buf) == size else np.empty(size, np.uint8)
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(buf)
            rows += 1
    elif name == "scan":
        for _, v in TeacherStore.open(path).iter_batches():
            rows += len(v)
    elif name == "scan_mmap":
        rows = _mmap_scan(TeacherStore.open(path))
    elif name == "verify":
        from storage import verify_store

        assert verify_store(path).ok
    elif name in ("index_stream", "index_in_memory"):
        from storage import segment_format as sf
        from storage.fs import Location

        loc, base = Location(path), _vm("VmRSS")
        if name == "index_stream":
            sf.stream_index(loc, PARTS_SEG)
        else:
            sf.write_index(loc, PARTS_SEG, sf.IndexColumns.concat(sf.read_parts(loc, PARTS_SEG)))
        return {"wall_s": time.perf_counter() - t0, "rss_growth_mib": peak_rss_mib() - base}
    elif name in ("info", "info_duplicates"):
        from storage import store_info

        store_info(TeacherStore.open(path), duplicates=name == "info_duplicates")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: per address space, so not the parent's as ru_maxrss can be)."""
    return _vm("VmHWM")


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


PARTS_SEG = "parts-only"


def build_parts(path: Path, rows: int, part_rows: int = 4096) -> None:
    """A segment holding only index parts of ``rows`` rows (what a writer's commit turns into index.parquet)."""
    from storage.segment_format import IndexColumns

    parts = Path(path, "segments", PARTS_SEG, "parts")
    parts.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i, s in enumerate(range(0, rows, part_rows)):
        n = min(part_rows, rows - s)
        cols = IndexColumns(
            np.frombuffer(rng.bytes(16 * n), dtype="S16"),
            np.arange(s, s + n, dtype=np.int64),
            np.zeros(n, np.uint8),
            np.full(n, 128, np.int32),
            rng.integers(0, 1 << 32, n, dtype=np.uint32),
        )
        (parts / f"part-{i:06d}.parquet").write_bytes(cols.to_parquet_bytes())


def _mmap_scan(store: TeacherStore) -> int:
    """The scan before issue 10: chunks memory-mapped (and kept mapped), rows checked from the maps."""
    rows = 0
    for seg in store.segments:
        cols = seg.index()
        order = np.argsort(cols.rows)
        keys, crcs = cols.keys[order], cols.crcs[order] if cols.crcs is not None else None
        for c in range(seg.n_chunks):
            lo, hi = c * seg.chunk_rows, min((c + 1) * seg.chunk_rows, seg.rows)
            vecs = np.asarray(seg.chunk(c)[: hi - lo])
            if crcs is not None:
                assert not len(check_rows(key_seeds(keys[lo:hi]), crcs[lo:hi], vecs))
            rows += len(vecs)
    return rows


def run_child(name: str, path: Path, *, cold: bool = True) -> dict[str, float]:
    if cold:
        evict(path)
    if name == "cat":
        files = [str(f) for f in Path(path).rglob("*") if f.is_file()]
        t0 = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        return {"wall_s": time.perf_counter() - t0}
    cmd = [sys.executable, __file__, "--child", name, "--store", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    base = None
    if args.store is None:
        base = Path(tempfile.mkdtemp(prefix="ddx-scale-", dir=args.dir))
        path = base / "store"
        write_rate = build_store(path, args.rows, args.dim)
    else:
        path, write_rate = args.store, float("nan")
    try:
        res: dict = {"rows": TeacherStore.open(path).rows, "write_rows_per_s": write_rate}
        res["cold_gather"] = cold_gathers(path, args)
        res["warm_gather"] = warm_gathers(path, args)
        res["scan"] = {n: run_child(n, path) for n in ("raw_read", "scan", "scan_mmap")}
        res["verify"] = {n: run_child(n, path) for n in ("cat", "verify")}
        res["info"] = {n: run_child(n, path, cold=False) for n in ("info", "info_duplicates")}
        parts = path.parent / "parts"
        res["commit_index"] = {}
        for n in ("index_stream", "index_in_memory"):
            shutil.rmtree(parts, ignore_errors=True)
            build_parts(parts, res["rows"])
            res["commit_index"][n] = run_child(n, parts, cold=False)
        shutil.rmtree(parts, ignore_errors=True)
        return res
    finally:
        if base is not None and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif base is not None:
            print(f"store kept at {path}", file=sys.stderr)


def checks(r: dict) -> list[tuple[str, str, str, bool]]:
    """(row, measured, target, met) for the table."""
    cg, wg, sc, vf, inf = r["cold_gather"], r["warm_gather"], r["scan"], r["verify"], r["info"]
    ci = r["commit_index"]
    p, raw, mm = cg["pread"], cg["raw_pread"], cg["mmap"]
    scan_ratio = sc["raw_read"]["wall_s"] / sc["scan"]["wall_s"]
    verify_ratio = vf["verify"]["wall_s"] / vf["cat"]["wall_s"]
    return [
        ("cold gather, pread (default)", f"{p['rows_per_s']:,.0f} rows/s", ">= 10,000 rows/s", p["rows_per_s"] >= 1e4),
        (
            "  vs one preadv a row",
            f"{p['rows_per_s'] / raw['rows_per_s']:.2f}x ({raw['rows_per_s']:,.0f} rows/s)",
            ">= 0.8x",
            p["rows_per_s"] >= 0.8 * raw["rows_per_s"],
        ),
        ("  bytes read / returned", f"{p['read_per_returned']:.2f}", "<= 1.5", p["read_per_returned"] <= 1.5),
        (
            "cold gather, mmap (before)",
            f"{mm['rows_per_s']:,.0f} rows/s, read/returned {mm['read_per_returned']:.0f}",
            "(reference)",
            True,
        ),
        (
            "warm gather, pread / mmap",
            f"{wg['pread_over_mmap']:.2f}x ({wg['pread_rows_per_s']:,.0f} vs {wg['mmap_rows_per_s']:,.0f} rows/s)",
            "(reference)",
            True,
        ),
        ("full scan (cold) vs raw read", f"{scan_ratio:.2f}x", ">= 0.8x", scan_ratio >= 0.8),
        (
            "  scan peak RSS",
            f"{sc['scan']['rss_mib']:,.0f} MiB (mmap scan {sc['scan_mmap']['rss_mib']:,.0f}, "
            f"{sc['raw_read']['wall_s'] / sc['scan_mmap']['wall_s']:.2f}x raw)",
            "<= 1024 MiB",
            sc["scan"]["rss_mib"] <= 1024,
        ),
        (
            "verify (cold) vs cat",
            f"{verify_ratio:.2f}x cat time, RSS {vf['verify']['rss_mib']:,.0f} MiB",
            "<= 1.2x",
            verify_ratio <= 1.2,
        ),
        (
            "ls/info (COMMITs only)",
            f"{inf['info']['wall_s']:.2f} s, {inf['info']['rss_mib']:,.0f} MiB",
            "< 1 s, < 200 MiB",
            inf["info"]["wall_s"] < 1 and inf["info"]["rss_mib"] < 200,
        ),
        (
            "  with --duplicates (before)",
            f"{inf['info_duplicates']['wall_s']:.2f} s, {inf['info_duplicates']['rss_mib']:,.0f} MiB",
            "(reference)",
            True,
        ),
        (
            "commit: index.parquet RSS growth",
            f"{ci['index_stream']['rss_growth_mib']:,.1f} MiB streamed (in memory, before: "
            f"{ci['index_in_memory']['rss_growth_mib']:,.0f} MiB)",
            "flat (< 128 MiB)",
            ci["index_stream"]["rss_growth_mib"] < 128,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.store)))
        return 0
    res = run(args)
    table = checks(res)
    res["ok"] = all(met for *_, met in table)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['rows']:,} rows x {args.dim}-d fp16; written at {res['write_rows_per_s']:,.0f} rows/s")
        print(f"| {'row':<30} | {'measured':<58} | {'target':<17} | met |\n|{'-' * 32}|{'-' * 60}|{'-' * 19}|-----|")
        for row, measured, target, met in table:
            print(f"| {row:<30} | {measured:<58} | {target:<17} | {'yes' if met else 'NO':<3} |")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
