"""MS MARCO at scale: generate MS MARCO-shaped files of N passages, then measure each stage against its limit.

The reference workload is MS MARCO v1 (8.84 M passages, 1.01 M queries, 39.8 M triple lines, ~500 k
queries of hard negatives). This script writes files of that shape at any N, into ``--data`` (kept, and
reused by a later run with the same N) or a temporary folder:

* ``collection.tsv``: ``pid<TAB>passage``, 20–90 words from a 20 k-word vocabulary with raw quotes
  (``"Hello,"``, ``6"``), non-ASCII words and mojibake (``café``, ``東京``, ``â€™``), a few inner ``\\r`` and
  ``\\x85``; 2 % of the passages repeat an earlier passage's text.
* ``queries.train.tsv``, ``queries.dev.tsv`` (one query per 8.75 passages), ``qrels.train.tsv``,
  ``qrels.dev.tsv`` (TREC, one positive per query), ``triples.train.small.tsv`` (``--triples`` lines of
  query, positive and negative *text*), ``msmarco-hard-negatives.jsonl.gz`` (``--hard-negatives`` queries,
  50 negatives from each of two systems).

Each stage runs in a fresh subprocess, so its time and peak RSS are its own; times are CPU seconds
(user + system, every thread), steadier than wall time on this shared 2-core machine (both are shown).

===============  ===========================================================  ====================================
stage            measures                                                     target (limit)
===============  ===========================================================  ====================================
``pass1``        precompute's scan (read, key, dedup, store lookup) of          ≥ 150 k texts/s (polars read + hash
                 collection.tsv: ``precompute(limit=0)``, a stub teacher       of the same file)
``pass1-all``    the same over the whole folder (collection, queries, triples)  MS MARCO v1 estimate < 15 CPU-min
``reader``       ``msmarco:`` ``iter_texts`` and ``iter_text_blocks`` beside a  ≥ 140 k texts/s (5× the 28 k the
                 pure-Python line loop that makes one record a line             issue measured)
``eval``         ``load_eval_set`` of the dev split (whole corpus): peak RSS    ≤ 2 GB at 8.84 M passages (below
                                                                               that size: extrapolated from the
                                                                               peaks at N/2 and N)
``keyset``       ``KeySet.add_new`` of N and 2N keys in 8,192-key blocks        work(2N) / work(N) ≤ 2.5 (linear: 2
                                                                               plus growth steps; quadratic: 4)
``phase2-ids``   phase-2 preparation of the hard-negatives file: every id      MS MARCO's ~503 k queries resolved
                 resolved to a text position (reading the file and the         in < 60 CPU-s (the issue: 0.97 ms a
                 texts' index shown beside it)                                 query, ~8 min)
===============  ===========================================================  ====================================

Storage stages (cold gathers, full scan, verify, ls/info, commit RSS) slot into :data:`STAGES`.

Example:
    python bench/scale.py                                  # 8.84 M passages: the full-size run (~3 GB of files)
    python bench/scale.py --passages 200000                # a quick run
    python bench/scale.py --passages 200000 --stages reader,keyset --json
    python bench/scale.py --passages 1000000 --data /tmp/marco-1m   # keep the files for the next run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MSMARCO = {"passages": 8_841_823, "queries": 1_010_916, "triple_lines": 39_780_811}
MSMARCO_HARD_NEGATIVE_QUERIES = 502_939  # lines of sentence-transformers' msmarco-hard-negatives.jsonl
ISSUE_READER_RATE = 28_000  # texts/s the issue measured for the msmarco: reader before columns
PASSAGES_PER_QUERY = 8.75
DEV_QUERIES = 6_980
DUPLICATE_EVERY = 50  # 2 % of passages repeat an earlier passage's text
Row = dict[str, Any]


# --- synthetic MS MARCO ---------------------------------------------------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a counter-based generator, so a passage's text is a pure function of its pid."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _vocabulary() -> np.ndarray:
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20_000)]
    quoted = ['"Hello,"', '6"', '"the', 'end"', "it's", '""', '"a"']
    foreign = ["café", "naïve", "Zürich", "東京", "â€™", "Ã©", "–", "Ωmega", "résumé"]
    rare = ["a\rb", "c\x85d"]  # inner line-break characters that text-mode readers split on
    return np.array(words + quoted * 40 + foreign * 30 + rare, dtype=object)


VOCAB = _vocabulary()


def _texts(ids: np.ndarray, salt: int, shortest: int, spread: int) -> list[str]:
    """Texts of ``ids``: ``shortest`` to ``shortest + spread - 1`` words, each a hash of (id, salt, position)."""
    seed = ids.astype(np.uint64) * np.uint64(2654435761) + np.uint64(salt)
    lengths = (shortest + _mix(seed) % np.uint64(spread)).astype(np.int64)
    words = _mix(seed[:, None] * np.uint64(131) + np.arange(shortest + spread, dtype=np.uint64)) % np.uint64(len(VOCAB))
    return [" ".join(VOCAB[w[:n]]) for w, n in zip(words, lengths, strict=True)]


def passage_texts(pids: np.ndarray) -> list[str]:
    """Passage texts by pid; every ``DUPLICATE_EVERY``-th (by hash) repeats an earlier pid's text."""
    source = pids.astype(np.uint64).copy()
    dup = (_mix(source ^ np.uint64(0xD0B)) % np.uint64(DUPLICATE_EVERY) == 0) & (source > 0)
    source[dup] = _mix(source[dup]) % source[dup]
    return _texts(source, 1, 20, 71)


def query_texts(qids: np.ndarray) -> list[str]:
    return _texts(qids, 2, 4, 9)


def generate(root: Path, passages: int, triples: int, hard_negatives: int, block: int = 65_536) -> dict[str, Any]:
    """Write the MS MARCO-shaped folder; returns what was written and how long it took."""
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    queries = max(1, round(passages / PASSAGES_PER_QUERY))
    dev = min(DEV_QUERIES, max(1, queries // 10))
    rng = np.random.default_rng(0)
    with open(root / "collection.tsv", "w", encoding="utf-8", newline="") as f:
        for s in range(0, passages, block):
            pids = np.arange(s, min(s + block, passages))
            f.writelines(f"{p}\t{t}\n" for p, t in zip(pids.tolist(), passage_texts(pids), strict=True))
    qids = np.arange(queries)
    positives = rng.integers(0, passages, queries)
    for name, part in (("train", qids[dev:]), ("dev", qids[:dev])):
        with open(root / f"queries.{name}.tsv", "w", encoding="utf-8", newline="") as f:
            for s in range(0, len(part), block):
                ids = part[s : s + block]
                f.writelines(f"{q}\t{t}\n" for q, t in zip(ids.tolist(), query_texts(ids), strict=True))
        with open(root / f"qrels.{name}.tsv", "w", encoding="utf-8") as f:
            f.writelines(f"{q}\t0\t{positives[q]}\t1\n" for q in part.tolist())
    with open(root / "triples.train.small.tsv", "w", encoding="utf-8", newline="") as f:
        for s in range(0, triples, block):
            n = min(block, triples - s)
            q = rng.integers(dev, queries, n) if queries > dev else rng.integers(0, queries, n)
            qs, ps, ns = query_texts(q), passage_texts(positives[q]), passage_texts(rng.integers(0, passages, n))
            f.writelines(f"{a}\t{b}\t{c}\n" for a, b, c in zip(qs, ps, ns, strict=True))
    with gzip.open(root / "msmarco-hard-negatives.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
        for q in range(dev, min(queries, dev + hard_negatives)):
            neg = {system: rng.integers(0, passages, 50).tolist() for system in ("bm25", "ance")}
            f.write(json.dumps({"qid": q, "pos": [int(positives[q])], "neg": neg}) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(root.iterdir())}
    return {
        "passages": passages,
        "queries": queries,
        "triples": triples,
        "bytes": sizes,
        "seconds": round(time.perf_counter() - start, 1),
    }


# --- measurements (each in its own process) --------------------------------------------------------------------------
def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Clock:
    """CPU and wall seconds of a ``with`` block."""

    def __enter__(self) -> Clock:
        self.cpu, self.wall = cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = cpu_s() - self.cpu, time.perf_counter() - self.wall


def _rate(n: int, clock: Clock) -> str:
    return f"{n / clock.cpu / 1e3:,.0f} k texts/CPU-s ({n / clock.wall / 1e3:,.0f} k/s wall)"


def _scan(data: str, workdir: Path) -> tuple[Any, Clock]:
    """``precompute(limit=0)`` over ``data`` into an empty store, with a stub teacher (pass 1 alone)."""
    from types import SimpleNamespace

    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig
    from storage import TeacherSpec

    spec = TeacherSpec(model="stub", weights_id="files:stub", pooling="mean", normalize=True, max_seq_length=512, dim=8)
    store = workdir / f"store-{os.getpid()}"
    config = PrecomputeConfig(
        store=str(store), data=(data,), teacher=TeacherConfig(model="stub"), limit=0, progress=False
    )
    try:
        with Clock() as clock:
            summary = precompute(config, encoder=SimpleNamespace(spec=spec, forward_calls=0))  # type: ignore[arg-type]
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return summary, clock


def polars_read_and_hash(path: Path) -> tuple[int, Clock]:
    """The limit: polars reads the file and hashes every text (its own hash, streaming)."""
    import polars as pl

    with Clock() as clock:
        frame = (
            pl.scan_csv(
                path, separator="\t", quote_char=None, has_header=False, schema={"id": pl.String, "text": pl.String}
            )
            .select(pl.col("text").hash())
            .collect(engine="streaming")
        )
    return frame.height, clock


def stage_pass1(root: Path, workdir: Path) -> list[Row]:
    summary, clock = _scan(f"msmarco:{root / 'collection.tsv'}", workdir)
    n, polars_clock = polars_read_and_hash(root / "collection.tsv")
    rate = summary.texts_read / clock.cpu
    return [
        {
            "stage": "pass1",
            "measured": _rate(summary.texts_read, clock),
            "texts_per_cpu_s": round(rate),
            "texts_per_s_wall": round(summary.texts_read / clock.wall),
            "texts": summary.texts_read,
            "unique": summary.unique_texts,
            "peak_rss_mib": peak_rss() >> 20,
            "limit": "polars read + hash: " + _rate(n, polars_clock),
            "target": "≥ 150 k texts/s",
            "ok": rate >= 150_000,
        },
    ]


def stage_pass1_all(root: Path, workdir: Path) -> list[Row]:
    """Pass 1 over every file: the rate counts the texts in the files (a triple line holds three), most of
    which the reader drops as repeats, so it carries over to MS MARCO's counts."""
    info = json.loads((root / "generated.json").read_text())
    summary, clock = _scan(f"msmarco:{root}", workdir)
    in_files = info["passages"] + info["queries"] + 3 * info["triples"]
    full = MSMARCO["passages"] + MSMARCO["queries"] + 3 * MSMARCO["triple_lines"]
    minutes = clock.cpu / in_files * full / 60
    return [
        {
            "stage": "pass1-all",
            "measured": _rate(in_files, clock) + f" ({summary.texts_read:,} given, {summary.unique_texts:,} unique)",
            "texts_in_files": in_files,
            "texts": summary.texts_read,
            "unique": summary.unique_texts,
            "peak_rss_mib": peak_rss() >> 20,
            "limit": f"MS MARCO v1 ({full / 1e6:.0f} M texts in its files) at this rate: {minutes:.1f} CPU-min",
            "target": "< 15 CPU-min",
            "ok": minutes < 15,
        },
    ]


def line_loop(path: Path) -> int:
    """The floor of any reader that makes a record per line: decode, origin string, partition, record (no
    id ledger, no checks beyond the old reader's). The ``msmarco:`` reader before columns did this plus a
    ledger of ~3 µs a record (git 4571b15: 271 k texts/CPU-s on the 1 M-passage files)."""
    from precompute.sources import TextRecord

    n = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            origin = f"{path}:{i}"
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            line = raw.decode("utf-8")
            if line.strip():
                rid, tab, text = line.partition("\t")
                if tab and rid.strip() and text.strip():
                    TextRecord(rid.strip(), text, "passage", origin)
                    n += 1
    return n


def stage_reader(root: Path, workdir: Path) -> list[Row]:
    from precompute.sources import parse_source

    path = root / "collection.tsv"
    with Clock() as loop:
        n_loop = line_loop(path)
    source = parse_source(f"msmarco:{path}")
    with Clock() as records:
        n_records = sum(1 for _ in source.iter_texts())
    with Clock() as blocks:
        n_blocks = sum(len(b) for b in source.iter_text_blocks())
    target = 5 * ISSUE_READER_RATE
    rows = []
    for stage, n, clock in (("reader", n_records, records), ("reader-blocks", n_blocks, blocks)):
        call = "iter_texts" if stage == "reader" else "iter_text_blocks"
        rows.append(
            {
                "stage": stage,
                "measured": f"{call} {_rate(n, clock)}",
                "limit": f"line loop (no ledger): {_rate(n_loop, loop)}",
                "target": f"≥ {target / 1e3:.0f} k texts/s (5× the issue's 28 k)",
                "ok": n / clock.cpu >= target,
                "texts": n,
                "texts_per_cpu_s": round(n / clock.cpu),
            }
        )
    return rows


def _eval_folder(root: Path, half: bool = False) -> Path:
    """The collection (or its first half), dev queries and dev qrels alone: an ``msmarco:`` folder's text
    triples would join the corpus."""
    folder = root / ("eval-dev-half" if half else "eval-dev")
    folder.mkdir(exist_ok=True)
    for name in ("queries.dev.tsv", "qrels.dev.tsv", *(() if half else ("collection.tsv",))):
        if not (folder / name).exists():
            (folder / name).symlink_to(root / name)
    if half and not (folder / "collection.tsv").exists():
        with open(root / "collection.tsv", "rb") as src, open(folder / "collection.tsv", "wb") as dst:
            n = int(json.loads((root / "generated.json").read_text())["passages"]) // 2
            dst.writelines(line for _, line in zip(range(n), src, strict=False))
    return folder


def _eval_peak(folder: Path) -> tuple[int, int, int, float]:
    """``(RSS after imports, peak RSS, passages, CPU-s)`` of ``load_eval_set`` over ``folder``, in a subprocess."""
    code = (
        "import json, resource, sys, time, warnings; sys.path.insert(0, sys.argv[2]);"
        "from distill.evaluate.inputs import load_eval_set; from precompute.sources import parse_source;"
        "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024;"
        "base = rss(); t = time.process_time();"
        "warnings.simplefilter('ignore');"
        "es = load_eval_set(parse_source('msmarco:' + sys.argv[1]), 'dev', strict=False);"
        "print(json.dumps([base, rss(), len(es.doc_ids), time.process_time() - t]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(REPO)], capture_output=True, text=True, check=True
    )
    base, peak, n, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return base, peak, n, cpu


def stage_eval(root: Path, workdir: Path) -> list[Row]:
    base, peak, n, cpu = _eval_peak(_eval_folder(root))
    full = MSMARCO["passages"]
    if n < full:  # the slope between half and all of the corpus, carried to MS MARCO's size
        _, half_peak, half_n, _ = _eval_peak(_eval_folder(root, half=True))
        at_full = peak + (peak - half_peak) / max(n - half_n, 1) * (full - n)
        limit = f"8.84 M passages: {at_full / 2**30:.2f} GiB (slope from {half_n:,} to {n:,} passages)"
    else:
        at_full, limit = peak, "measured at full size"
    return [
        {
            "stage": "eval",
            "measured": f"load_eval_set peak RSS {peak / 2**30:.2f} GiB for {n:,} passages "
            f"({base / 2**30:.2f} GiB after imports), {cpu:.1f} CPU-s",
            "limit": limit,
            "target": "≤ 2 GB at 8.84 M",
            "ok": at_full <= 2e9,
            "peak_rss": peak,
            "rss_after_imports": base,
            "passages": n,
        },
    ]


def stage_keyset(root: Path, workdir: Path) -> list[Row]:
    """KeySet at N and 2N keys (N ≤ 4 M). The verdict is on slots probed, the work (deterministic), summed over
    N × (1, 1.15, 1.31) so that growth steps (1.5× the table) fall alike at both sizes; CPU time (best of 3:
    other jobs on the machine stretch single runs) is shown beside it."""
    from storage.keys import KeySet

    n = min(int(json.loads((root / "generated.json").read_text())["passages"]), 4_000_000)
    keys = np.random.default_rng(0).integers(0, 2**63, (3 * n, 2), dtype=np.int64).view("S16").ravel()

    def fill(size: int) -> tuple[KeySet, float]:
        ks = KeySet()
        with Clock() as clock:
            for s in range(0, size, 8192):
                ks.add_new(keys[s : min(s + 8192, size)])
        return ks, clock.cpu

    def work(size: int) -> int:
        return sum(fill(int(size * f))[0].slots_probed for f in (1, 1.15, 1.31))

    cpu = {size: min(fill(size)[1] for _ in range(3)) for size in (n, 2 * n)}
    ratio, cpu_ratio = work(2 * n) / work(n), cpu[2 * n] / cpu[n]
    ks = fill(2 * n)[0]
    return [
        {
            "stage": "keyset",
            "measured": f"slots probed ×{ratio:.2f} from {n:,} to {2 * n:,} keys; CPU {cpu[n]:.2f} → "
            f"{cpu[2 * n]:.2f} s (×{cpu_ratio:.2f}); {ks.nbytes / len(ks):.0f} B a key",
            "limit": "linear: ×2.0",
            "target": "×2N/N ≤ 2.5 (quadratic: ×4)",
            "ok": ratio <= 2.5,
            "cpu_ratio": round(cpu_ratio, 3),
        },
    ]


def _hard_negatives_folder(root: Path) -> Path:
    """collection.tsv, queries.train.tsv and the hard-negatives file alone (no text triples)."""
    folder = root / "hard-negatives"
    folder.mkdir(exist_ok=True)
    for name in ("collection.tsv", "queries.train.tsv", "msmarco-hard-negatives.jsonl.gz"):
        if not (folder / name).exists():
            (folder / name).symlink_to(root / name)
    return folder


def stage_phase2_ids(root: Path, workdir: Path) -> list[Row]:
    """Phase-2 preparation of the hard-negatives file: parse it, then resolve every id to a text position."""
    from distill.train import data
    from precompute.sources import parse_source

    source = parse_source(f"msmarco:{_hard_negatives_folder(root)}")
    with Clock() as scan:
        texts, maps = data.scan_sources([source])
    with Clock() as parse:
        examples = list(data._examples(source, None))
    ids = sum(1 + len(e.positive_ids) + len(e.negative_ids) for e in examples)
    replay = SimpleNamespace(spec=source.spec, splits=lambda: ["train"], training_examples=lambda _: iter(examples))
    with Clock() as resolve:
        got, _ = data.resolve_examples([replay], texts, maps, None, skip_bad=True)  # type: ignore[list-item]
    per_query = resolve.cpu / max(len(examples), 1) * 1e3
    full = MSMARCO_HARD_NEGATIVE_QUERIES * per_query / 1e3
    return [
        {
            "stage": "phase2-ids",
            "measured": (
                f"{per_query:.3f} ms a query ({len(examples):,} queries, {ids / max(len(examples), 1):.0f} ids each, "
                f"{resolve.cpu:.1f} CPU-s); reading the file {parse.cpu:.1f} CPU-s, texts' index {scan.cpu:.1f} CPU-s"
            ),
            "limit": f"MS MARCO's {MSMARCO_HARD_NEGATIVE_QUERIES:,} queries at this rate: {full:.0f} CPU-s to resolve",
            "target": "seconds (the issue: 0.97 ms a query, ~8 min)",
            "ok": full < 60,
            "queries": len(examples),
            "resolved": len(got),
            "ms_per_query": round(per_query, 4),
            "parse_cpu_s": round(parse.cpu, 1),
            "scan_cpu_s": round(scan.cpu, 1),
        }
    ]


STAGES: dict[str, Callable[[Path, Path], list[Row]]] = {
    "pass1": stage_pass1,
    "pass1-all": stage_pass1_all,
    "reader": stage_reader,
    "eval": stage_eval,
    "keyset": stage_keyset,
    "phase2-ids": stage_phase2_ids,
}


# --- driver ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--passages", type=lambda s: int(s.replace("_", "")), default=MSMARCO["passages"])
    p.add_argument("--triples", type=int, default=None, help="triple lines (default: passages / 4)")
    p.add_argument("--hard-negatives", type=int, default=None, help="queries with hard negatives (default: half)")
    p.add_argument("--data", type=Path, default=None, help="folder for the generated files (kept; reused at same N)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ensure_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    marker = root / "generated.json"
    if marker.exists() and json.loads(marker.read_text())["passages"] == args.passages:
        return dict(json.loads(marker.read_text()), reused=True)
    queries = round(args.passages / PASSAGES_PER_QUERY)
    info = generate(root, args.passages, args.triples or args.passages // 4, args.hard_negatives or queries // 2)
    marker.write_text(json.dumps(info))
    return info


def run_stage(name: str, root: Path, workdir: Path) -> Iterator[Row]:
    cmd = [sys.executable, __file__, "--child", name, "--data", str(root)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DDX_CACHE_DIR": str(workdir / "cache")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, check=False)
    if done.returncode:
        yield {"stage": name, "measured": "FAILED: " + done.stderr.strip().splitlines()[-1], "ok": False}
        sys.stderr.write(done.stderr)
        return
    yield from json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[Row], info: dict[str, Any]) -> None:
    how = "reused" if info.get("reused") else f"written in {info['seconds']} s"
    size = sum(info["bytes"].values()) / 2**30
    print(
        f"files: {info['passages']:,} passages, {info['queries']:,} queries, {info['triples']:,} triple lines, "
        f"{size:.2f} GiB ({how})"
    )
    print(f"{'stage':<14} {'ok':<4} {'measured':<90} {'limit / reference':<60} target")
    for r in rows:
        ok = {True: "yes", False: "NO", None: ""}[r.get("ok")]
        print(f"{r['stage']:<14} {ok:<4} {r['measured']:<90} {r.get('limit', ''):<60} {r.get('target', '')}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(STAGES[args.child](args.data, Path.cwd())))
        return
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        raise SystemExit(f"Unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}.")
    with tempfile.TemporaryDirectory(prefix="ddx-scale-") as tmp:
        root = args.data or Path(tmp) / "msmarco"
        info = ensure_data(root, args)
        rows = [row for name in args.stages.split(",") for row in run_stage(name, root.resolve(), Path(tmp))]
    if args.json:
        print(json.dumps({"generated": info, "rows": rows}, indent=2))
    else:
        print_table(rows, info)


if __name__ == "__main__":
    main()
