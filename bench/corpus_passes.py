"""Memory and read order of whole-corpus passes: mining's queries, evaluation's student corpus, a store's rows.

* ``mining``: peak RSS growth of ``mine_hard_negatives`` for each ``--queries`` count, in a fresh process each
  (a fake store returning random rows, ``--passages`` passages, ``--dim``-d); ``--block-mib`` sets
  ``distill.train.mining.QUERY_BLOCK_BYTES`` (default: the module's).
* ``student``: peak RSS growth of encoding ``--passages`` counts into evaluation's spilled student corpus (a stub
  encoder of 384-d ones), then of one search-style pass over it, in a fresh process each.
* ``read``: seconds to read a store's rows for a search (a ``--share`` of its ``--rows`` × ``--dim`` float16 rows,
  listed in key order as mining and evaluation list them): gathered in that order (the path before), sorted
  gathers, the scan (``store_blocks``'s path for a dense share); page cache warm, and cold (the store's files
  evicted with ``POSIX_FADV_DONTNEED`` first); best of ``--repeat`` (wall and CPU seconds: CPU stays meaningful on
  a busy machine).

Example:
    python bench/corpus_passes.py mining --queries 5000 10000 20000 --block-mib 64
    python bench/corpus_passes.py student --passages 500000 1000000 2000000
    python bench/corpus_passes.py read --rows 200000 --dim 384
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from store_scale import evict  # noqa: E402 - the page-cache eviction of the store benches


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FakeStore:
    """Random rows of ``dim`` (seeded by the first ids asked for); no scan (``rows`` huge: always gathered)."""

    rows = 1 << 62

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def get_rows(self, gids: np.ndarray, dtype: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
        rng = np.random.default_rng(int(np.asarray(gids)[:4].sum()) if len(gids) else 0)
        return rng.standard_normal((len(gids), self.dim), dtype=np.float32)


def child_mining(q: int, passages: int, dim: int, block_mib: int | None) -> float:
    import torch

    from distill.train import mining
    from distill.train.data import Phase2Examples, Ragged, TextIndex

    torch.set_num_threads(1)
    if block_mib:
        mining.QUERY_BLOCK_BYTES = block_mib << 20
    n = passages + q
    roles = np.r_[np.zeros(passages, np.uint8), np.ones(q, np.uint8)]
    texts = TextIndex(keys=np.zeros(n, "S16"), roles=roles, source=np.zeros(n, np.int16), gids=np.arange(n))
    ex = Phase2Examples(
        query=np.arange(passages, n),
        positives=Ragged.from_lists([[i % passages] for i in range(q)]),
        negatives=Ragged.from_lists([[] for _ in range(q)]),
        source=np.zeros(q, np.int16),
    )
    base = _peak_mib()
    mining.mine_hard_negatives(ex, texts, FakeStore(dim), k=8)  # type: ignore[arg-type]
    return _peak_mib() - base


def child_student(n: int) -> tuple[float, float]:
    from distill.evaluate.inputs import _student_corpus

    class Enc:
        def student_vectors(self, texts: list[str], role: str) -> np.ndarray:
            return np.ones((len(texts), 384), np.float32)  # ones, not zeros: calloc pages would stay untouched

    class Corpus:
        doc_ids = np.arange(n)

        def doc_text_blocks(self, size: int = 65_536) -> Iterator[list[str]]:
            for s in range(0, n, size):
                yield ["x"] * min(size, n - s)

    base = _peak_mib()
    spilled = _student_corpus(Corpus(), Enc())  # type: ignore[arg-type]
    encoded = _peak_mib() - base
    assert sum(len(b) for b in spilled.blocks()) == n
    return encoded, _peak_mib() - base


def _in_child(args: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return out.stdout.strip().splitlines()[-1]


def mining_table(a: argparse.Namespace) -> None:
    prev = None
    for q in a.queries:
        mib = float(_in_child(["_mining", str(q), str(a.passages), str(a.dim), str(a.block_mib or 0)]))
        qmib = q * a.dim * 4 / 2**20
        ratio = f"; x{mib / prev:.2f} vs the previous Q" if prev else ""
        print(f"Q={q:>7} x {a.dim}-d: peak RSS growth {mib:7.1f} MiB (queries' float32 size {qmib:.0f} MiB){ratio}")
        prev = mib


def student_table(a: argparse.Namespace) -> None:
    for n in a.passages:
        encoded, read = map(float, _in_child(["_student", str(n)]).split())
        print(f"N={n:>8} passages x 384-d: peak RSS growth {encoded:7.1f} MiB encoding, {read:7.1f} MiB after a pass")


def read_table(a: argparse.Namespace) -> None:
    from distill.search import search_inputs
    from distill.search.search_inputs import store_blocks
    from storage import TeacherSpec, TeacherStore, content_keys

    folder = Path(tempfile.mkdtemp(prefix="ddx-bench-"))
    try:
        spec = TeacherSpec(
            model="t", weights_id="files:x", pooling="mean", normalize=True, max_seq_length=32, dim=a.dim
        )
        store = TeacherStore.create(folder / "s", spec)
        keys = content_keys("passage", [f"p{i}" for i in range(a.rows)])
        rng = np.random.default_rng(0)
        with store.writer() as w:
            for s in range(0, a.rows, 8192):
                n = min(8192, a.rows - s)
                vectors = rng.standard_normal((n, a.dim)).astype(np.float16)
                w.append(keys[s : s + n], vectors, np.zeros(n, np.uint8), np.ones(n, np.int32))
        store = TeacherStore.open(folder / "s")
        rows = store.locate(np.sort(keys))[:: round(1 / a.share)]

        def key_order() -> Iterator[np.ndarray]:
            return (store.get_rows(rows[s : s + 65_536], dtype="float32") for s in range(0, len(rows), 65_536))

        def with_density(density: float) -> Callable[[], Iterator[np.ndarray]]:
            def run() -> Iterator[np.ndarray]:
                saved, search_inputs.SCAN_DENSITY = search_inputs.SCAN_DENSITY, density
                try:
                    yield from store_blocks(store, rows).blocks()
                finally:
                    search_inputs.SCAN_DENSITY = saved

            return run

        cases = {"key order (before)": key_order, "sorted gathers": with_density(2.0), "scan": with_density(0.0)}
        os.sync()
        for cold in (False, True):
            best = {name: (np.inf, np.inf) for name in cases}
            for _ in range(a.repeat):
                for name, fn in cases.items():
                    if cold:
                        evict(folder)
                    t0, c0 = time.perf_counter(), time.process_time()
                    assert sum(len(b) for b in fn()) == len(rows)
                    t, c = time.perf_counter() - t0, time.process_time() - c0
                    best[name] = (min(best[name][0], t), min(best[name][1], c))
            for name, (t, c) in best.items():
                print(f"{'cold' if cold else 'warm'} {name:20s}: {len(rows)} rows, {t:.2f} s wall, {c:.2f} s CPU")
    finally:
        shutil.rmtree(folder)


def main() -> None:
    if sys.argv[1:2] == ["_mining"]:
        q, p, d, block = map(int, sys.argv[2:6])
        print(child_mining(q, p, d, block or None))
        return
    if sys.argv[1:2] == ["_student"]:
        print(*child_student(int(sys.argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mining")
    m.add_argument("--queries", type=int, nargs="+", default=[5000, 10000, 20000])
    m.add_argument("--passages", type=int, default=20_000)
    m.add_argument("--dim", type=int, default=3584)
    m.add_argument("--block-mib", type=int, default=None)
    s = sub.add_parser("student")
    s.add_argument("--passages", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000])
    r = sub.add_parser("read")
    r.add_argument("--rows", type=int, default=200_000)
    r.add_argument("--dim", type=int, default=384)
    r.add_argument("--share", type=float, default=1.0, help="share of the store's rows read (every 1/share-th)")
    r.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    {"mining": mining_table, "student": student_table, "read": read_table}[a.what](a)


if __name__ == "__main__":
    main()
