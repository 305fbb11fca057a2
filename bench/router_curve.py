"""The routing curve on real data: SciFact test and the TREC-DL-2019 subset, with the offline yardstick.

Teacher all-mpnet-base-v2 (768-d), student all-MiniLM-L6-v2 (384-d) + projection, CPU. Stages (each resumable;
timings accumulate in WORKDIR/timings.json):

* ``subset``     — BEIR folders under WORKDIR/data (read from the shared data, never copied into the repo):
  SciFact with ``--max-queries`` train queries (phase 2), as many *dev* queries taken from the rest of the train
  qrels (the router's fit set: queries the student never trained on) and as many test queries, their positives,
  and distractors up to ``--max-passages``; DL-19 with its judged queries and, per query in turn, its judged
  passages (highest grade first) up to ``--max-passages``;
* ``precompute`` — the teacher over both subsets, into one store;
* ``phase1``, ``phase2`` — the recipe of bench/e2e_scifact.py: phase 1 on both sets; phase 2 on ``--phase2-sources``
  (default SciFact's train half; ``scifact,hotpotqa,triples`` is e2e_scifact's mix), 7 mined negatives, into
  ``--phase2-out``;
* ``fit``        — ``ddx router fit`` on the dev queries, one router folder per ``--targets`` entry;
* ``evaluate``   — ``ddx evaluate --routed`` on SciFact test and DL-19 test for each router.

Without the subset options the whole corpora are used (a full run: precompute alone took ~1.5 h on 2 CPUs).

Usage:
    python bench/router_curve.py --workdir /tmp/ddx-router --max-passages 500 --max-queries 100
    python bench/router_curve.py --workdir /tmp/ddx-router --stages fit,evaluate --targets ndcg10,rr10,logp
    python bench/router_curve.py --workdir /tmp/ddx-router-full --stages phase2,fit,evaluate \
        --phase2-sources scifact,hotpotqa,triples --phase2-out phase2_mix
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from e2e_scifact import sources  # the yardstick's data sets (python bench/router_curve.py: bench/ is on sys.path)

STAGES = ("subset", "precompute", "phase1", "phase2", "fit", "evaluate")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:  # lines end at "\n" only: MS MARCO texts hold U+2028
        return [json.loads(line) for line in f if line.strip()]


def _read_qrels(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.strip().split("\t")
        if len(parts) == 3 and parts[2].lstrip("-").isdigit():
            rows.append((parts[0], parts[1], int(parts[2])))
    return rows


def _write_beir(folder: Path, docs: list[dict], queries: list[dict], qrels: dict[str, list]) -> None:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in qrels.items():
        lines = "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows)
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + lines)


def subset_scifact(root: Path, out: Path, max_queries: int | None, max_passages: int | None, seed: int) -> dict:
    rng = random.Random(seed)
    train = _read_qrels(root / "qrels" / "train.tsv")
    test = _read_qrels(root / "qrels" / "test.tsv")
    train_q = list(dict.fromkeys(q for q, _, _ in train))
    test_q = list(dict.fromkeys(q for q, _, _ in test))
    rng.shuffle(train_q)
    rng.shuffle(test_q)
    n = max_queries or len(train_q) // 2
    picked = {"train": set(train_q[:n]), "dev": set(train_q[n : 2 * n]), "test": set(test_q[: max_queries or None])}
    qrels = {s: [r for r in (test if s == "test" else train) if r[0] in picked[s]] for s in picked}
    positives = list(dict.fromkeys(d for rows in qrels.values() for _, d, _ in rows))
    docs = _read_jsonl(root / "corpus.jsonl")
    limit = max(max_passages or len(docs), len(positives))
    rest = [d["_id"] for d in docs if d["_id"] not in set(positives)]
    rng.shuffle(rest)
    keep = set(positives) | set(rest[: limit - len(positives)])
    queries = [q for q in _read_jsonl(root / "queries.jsonl") if any(q["_id"] in p for p in picked.values())]
    _write_beir(out, [d for d in docs if d["_id"] in keep], queries, qrels)
    return {"passages": len(keep), **{f"{s}_queries": len(p) for s, p in picked.items()}}


def subset_dl19(root: Path, out: Path, max_queries: int | None, max_passages: int | None) -> dict:
    rows = _read_qrels(root / "qrels" / "test.tsv")
    by_query: dict[str, list] = {}
    for q, d, g in rows:
        by_query.setdefault(q, []).append((g, d))
    qids = sorted(q for q, judged in by_query.items() if any(g > 0 for g, _ in judged))[: max_queries or None]
    lists = [sorted(by_query[q], key=lambda x: (-x[0], x[1])) for q in qids]
    docs = _read_jsonl(root / "corpus.jsonl")
    limit = max_passages or len(docs)
    keep: dict[str, None] = {}
    for depth in range(max(len(x) for x in lists)):
        for judged in lists:
            if depth < len(judged) and len(keep) < limit:
                keep.setdefault(judged[depth][1])
    if max_passages is None:
        keep |= dict.fromkeys(d["_id"] for d in docs)
    qrels = [(q, d, g) for q, d, g in rows if q in set(qids) and d in keep]
    qids = [q for q in qids if any(g > 0 for qq, _, g in qrels if qq == q)]
    queries = [q for q in _read_jsonl(root / "queries.jsonl") if q["_id"] in set(qids)]
    _write_beir(out, [d for d in docs if d["_id"] in keep], queries, {"test": [r for r in qrels if r[0] in set(qids)]})
    return {"passages": len(keep), "test_queries": len(qids)}


def _timed(timings: dict, name: str, fn):
    start = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    return out


def _memoize_student_encoding() -> None:
    """Encode each eval corpus with the student once per process (every router reuses it): bench-only."""
    from distill.evaluate.inputs import Encoders

    original, memo = Encoders.student_vectors, {}

    def cached(self, texts, role):  # type: ignore[no-untyped-def]
        key = (id(type(self)), role, hash(tuple(texts)), len(texts))
        if key not in memo:
            memo[key] = original(self, texts, role)
        return memo[key]

    Encoders.student_vectors = cached  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> dict:
    from cli.offline_models import minilm_path, mpnet_path

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timing_file = work / "timings.json"
    timings = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    sci, dl = work / "data" / "scifact", work / "data" / "dl19"
    spec = {"scifact": f"beir:{sci}", "dl19": f"beir:{dl}"}
    store, p1, p2 = work / "store", work / "phase1", work / args.phase2_out
    shared = sources(Path(args.data_root))

    def pick(option: str, value: str) -> tuple[str, ...]:  # data-set names → specs (this run's subsets first)
        names = value.split(",")
        if unknown := [n for n in names if n not in {**shared, **spec}]:
            raise SystemExit(f"{option}: unknown {unknown}; choose from scifact, dl19, hotpotqa, triples")
        return tuple(spec[n] if n in spec else shared[n] for n in names)

    phase2_data = pick("--phase2-sources", args.phase2_sources)
    stages, out = args.stages.split(","), {}
    if "subset" in stages:
        root = Path(args.data_root)
        out["subset"] = {
            "scifact": subset_scifact(root / "scifact", sci, args.max_queries, args.max_passages, args.seed),
            "dl19": subset_dl19(root / "msmarco-dl19-subset", dl, args.max_queries, args.max_passages),
        }
        (work / "subset.json").write_text(json.dumps(out["subset"], indent=2))
    if "precompute" in stages:
        from precompute.pipeline import PrecomputeConfig, precompute
        from precompute.teacher import TeacherConfig

        teacher = TeacherConfig(model=str(mpnet_path()))
        cfg = PrecomputeConfig(store=str(store), data=tuple(spec.values()), teacher=teacher)
        timings["precompute_encoded"] = _timed(timings, "precompute", lambda: precompute(cfg)).encoded
    common = dict(store=str(store), batch_size=32, seed=42, num_workers=2, logging_steps=20, save_steps=100_000)
    if "phase1" in stages or "phase2" in stages:
        from distill.train.config import TrainConfig
        from distill.train.run import train
    if "phase1" in stages:
        cfg1 = TrainConfig(
            phase=1, out=str(p1), student=str(minilm_path()), data=tuple(spec.values()), lr=5e-5, **common
        )
        _timed(timings, "phase1", lambda: train(cfg1))
    if "phase2" in stages:
        cfg2 = TrainConfig(
            phase=2, out=str(p2), init=str(p1), data=phase2_data, lr=3e-5, num_negatives=3, mine_negatives=7,
            **common,
        )  # fmt: skip
        _timed(timings, p2.name, lambda: train(cfg2))
    suffix = "" if args.fit_split == "dev" else f"-{args.fit_split.replace(',', '+')}"
    suffix += "" if p2.name == "phase2" else f"-{p2.name}"
    fit_data = pick("--fit-sources", args.fit_sources)
    suffix += "" if args.fit_sources == "scifact" else f"-fit-{args.fit_sources.replace(',', '+')}"
    targets = [t + suffix for t in args.targets.split(",")]
    if "fit" in stages:
        from distill.route.fit import RouterConfig, fit_router

        for target in targets:
            cfg = RouterConfig(
                store=str(store), model=str(p2), data=fit_data, split=args.fit_split, mine_negatives=7,
                target=target.removesuffix(suffix), out=str(work / "routers" / target), seed=args.seed,
            )  # fmt: skip
            out[f"fit_{target}"] = _timed(timings, f"fit_{target}", lambda c=cfg: fit_router(c)).to_dict()
    if "evaluate" in stages:
        from distill.evaluate.evaluate import EvalConfig
        from distill.route.curve import evaluate_routed

        _memoize_student_encoding()
        out["curves"] = {}
        for target in targets:
            cfg = EvalConfig(
                model=str(p2), store=str(store), data=(spec["scifact"], spec["dl19"]), split="test",
                modes=("teacher", "hybrid"), out=str(work / "eval" / target),
            )  # fmt: skip
            router = str(work / "routers" / target)
            result = _timed(timings, f"evaluate_{target}", lambda c=cfg, r=router: evaluate_routed(c, r))
            out["curves"][target] = {"rows": result.rows, "curves": result.curves, "files": result.files}
        done = json.loads((work / "router_curve.json").read_text()) if (work / "router_curve.json").exists() else {}
        curves = {**done.get("curves", {}), **out["curves"]}
        (work / "router_curve.json").write_text(json.dumps({"curves": curves, "timings": timings}, indent=2))
    timing_file.write_text(json.dumps(timings, indent=2))
    out["timings"] = timings
    return out


def print_curves(out: dict) -> None:
    for target, res in out.get("curves", {}).items():
        for rec in res["curves"]:
            name = rec["data"].rstrip("/").rsplit("/", 1)[-1]
            tea, hyb = rec["teacher"]["nDCG@10"], rec["hybrid"]["nDCG@10"]
            print(f"\n{name} test ({rec['queries']} queries), target {target}: teacher {tea:.4f}, hybrid {hyb:.4f}")
            print(f"{'usage':>6}" + "".join(f"{r:>22}" for r in ("encoder", "retrieval", "oracle", "random")))
            for b in rec["budgets"]:
                cells = []
                for router in ("encoder", "retrieval", "oracle", "random"):
                    row = next(r for r in rec["rows"] if r["router"] == router and r["budget"] == b)
                    lift = row["lift_over_random"]
                    shown = f"{row['nDCG@10']:.4f} {100 * row['nDCG@10'] / tea:5.1f}%"
                    cells.append(shown + (f" {lift:+.2f}" if lift is not None and router != "random" else "      "))
                print(f"{100 * b:>5g}%" + "".join(f"{c:>22}" for c in cells))
            cross = {k: c["crosses_teacher_at"] for k, c in rec["curves"].items()}
            print("reaches the teacher at usage: " + ", ".join(f"{k} {v}" for k, v in cross.items()))
    print("stage wall time (s): " + ", ".join(f"{k} {v}" for k, v in out["timings"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ddx-router")
    parser.add_argument("--data-root", default=str(SHARED))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--max-passages", type=int, help="passages per data set (default: the whole corpus)")
    parser.add_argument("--max-queries", type=int, help="queries per split (default: all; SciFact train halves)")
    parser.add_argument("--targets", default="ndcg10", help="router targets to fit and compare, comma-separated")
    parser.add_argument(
        "--fit-split", default="dev", help="SciFact split the routers are fitted on (dev: queries phase 2 never saw)"
    )
    parser.add_argument(
        "--phase2-sources",
        default="scifact",
        help="phase-2 data: scifact (its train half), hotpotqa, triples (the shared data sets); comma-separated",
    )
    parser.add_argument(
        "--fit-sources",
        default="scifact",
        help="router fit data: scifact (its --fit-split), hotpotqa (its dev questions), triples; comma-separated",
    )
    parser.add_argument("--phase2-out", default="phase2", help="phase-2 run folder under WORKDIR (routers follow it)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print_curves(out)


if __name__ == "__main__":
    main()
