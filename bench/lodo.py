"""Leave one domain out: does the recipe hold up on a data set whose texts it never saw?

For each of SciFact, the TREC-DL-2019 subset and HotpotQA (the data in ../shared/data), phase 1 + phase 2 train on
the other two and the held-out one is evaluated (teacher, student, hybrid, projected, and the untrained student).
No text of the held-out domain reaches training, passages included: the DL-19 domain is MS MARCO, so the MS MARCO
triples go with it. Teacher all-mpnet-base-v2, student all-MiniLM-L6-v2, CPU.

* phase 1: every text of the training domains (queries judged only in test splits are left out automatically);
* phase 2: SciFact train qrels, HotpotQA supporting vs distractor paragraphs, the MS MARCO triples — those of the
  training domains — with 7 negatives a query mined from the stored teacher vectors (DL-19 has only test qrels);
* evaluate: SciFact ``test``, DL-19 ``test``, HotpotQA ``dev`` (its one split: 500 questions, 4,8k paragraphs).

A recipe is the defaults plus ``--set KEY=VALUE`` overrides of TrainConfig fields for both phases (``--p1``/``--p2``
for one phase), named by ``--recipe``: the ablation is one run of this script per recipe over the same store.
Targets (issue 15): on each held-out set hybrid ≥ 95 % of the teacher's nDCG@10, student ≥ the untrained student.

Usage:
    python bench/lodo.py --workdir /tmp/ddx-lodo --stages precompute        # the store, once (bf16 teacher)
    python bench/lodo.py --workdir /tmp/ddx-lodo --recipe default
    python bench/lodo.py --workdir /tmp/ddx-lodo --recipe l2sp --set l2sp=1 --folds hotpotqa
    python bench/lodo.py --workdir /tmp/ddx-lodo --table                     # every recipe measured so far
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from e2e_scifact import sources  # the same four data sets (python bench/lodo.py: bench/ is on sys.path)

DOMAINS = ("scifact", "dl19", "hotpotqa")


# What each domain contributes: (phase-1 sources, phase-2 sources, held-out evaluation source and split).
def domain(name: str, src: dict[str, str]) -> tuple[list[str], list[str], tuple[str, str]]:
    if name == "scifact":
        return [src["scifact"]], [src["scifact"]], (src["scifact"], "test")
    if name == "dl19":  # MS MARCO: the DL-19 passages and the triples; DL-19 has no training qrels
        return [src["dl19"], src["triples"]], [src["triples"]], (src["dl19"], "test")
    return [src["hotpotqa"]], [src["hotpotqa"]], (src["hotpotqa"], "dev")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def overrides(pairs: list[str]) -> dict[str, Any]:
    from distill.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise SystemExit(f"--set/--p1/--p2 {pair!r}: use KEY=VALUE with KEY a TrainConfig field")
        out[key] = _value(value)
    return out


def precompute_store(args: argparse.Namespace, src: dict[str, str]) -> dict:
    from cli.offline_models import mpnet_path
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    teacher = TeacherConfig(model=str(mpnet_path()), dtype=args.teacher_dtype)
    cfg = PrecomputeConfig(store=args.store, data=tuple(src.values()), teacher=teacher)
    return precompute(cfg).to_dict()


def untrained(args: argparse.Namespace, name: str, src: dict[str, str]) -> dict:
    """The untrained student on a held-out set (cached in WORKDIR/untrained.json: it never changes)."""
    from cli.offline_models import minilm_path
    from distill.evaluate.evaluate import EvalConfig, evaluate_retrieval

    cache = Path(args.workdir) / "untrained.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if name not in known:
        data, split = domain(name, src)[2]
        cfg = EvalConfig(model=str(minilm_path()), data=(data,), split=split, modes=("student",), progress=False)
        known[name] = evaluate_retrieval(cfg).rows[0]
        cache.write_text(json.dumps(known, indent=2))
    return known[name]


def fold(args: argparse.Namespace, held_out: str, src: dict[str, str], timings: dict) -> dict:
    from cli.offline_models import minilm_path
    from distill.evaluate.evaluate import EvalConfig, evaluate_retrieval
    from distill.train.config import TrainConfig
    from distill.train.run import train

    work = Path(args.workdir) / args.recipe / f"without-{held_out}"
    p1_data: list[str] = []
    p2_data: list[str] = []
    for name in DOMAINS:
        if name != held_out:
            a, b, _ = domain(name, src)
            p1_data += a
            p2_data += b
    common: dict[str, Any] = {
        "store": args.store,
        "batch_size": 32,
        "seed": 42,
        "num_workers": 2,
        "logging_steps": 20,
        "save_steps": 100_000,
        "split": "train,dev",
        "bf16": args.bf16,
        "progress": not args.no_progress,
    }
    both = overrides(args.set)
    p1, p2 = work / "phase1", work / "phase2"
    if not (p1 / "ddx_run.json").exists():
        cfg1 = TrainConfig(
            phase=1,
            out=str(p1),
            student=str(minilm_path()),
            data=tuple(p1_data),
            **{**common, "lr": 5e-5, **both, **overrides(args.p1)},
        )
        start = time.perf_counter()
        train(cfg1)
        timings[f"{held_out}/phase1"] = round(time.perf_counter() - start, 1)
    if not args.phase1_only and not (p2 / "ddx_run.json").exists():
        cfg2 = TrainConfig(
            phase=2,
            out=str(p2),
            init=str(p1),
            data=tuple(p2_data),
            **{**common, "lr": 3e-5, "num_negatives": 3, "mine_negatives": 7, **both, **overrides(args.p2)},
        )
        start = time.perf_counter()
        train(cfg2)
        timings[f"{held_out}/phase2"] = round(time.perf_counter() - start, 1)
    data, split = domain(held_out, src)[2]
    start = time.perf_counter()
    run = p1 if args.phase1_only else p2
    modes = tuple(args.modes.split(","))
    cfg = EvalConfig(
        model=str(run), store=args.store, data=(data,), split=split, modes=modes, out=str(run / "eval"), progress=False
    )
    rows = evaluate_retrieval(cfg).rows
    timings[f"{held_out}/evaluate"] = round(time.perf_counter() - start, 1)
    by_mode = {r["mode"]: r for r in rows}
    base = untrained(args, held_out, src)
    teacher = by_mode["teacher"]["nDCG@10"]
    return {
        "held_out": held_out,
        "trained_on": [n for n in DOMAINS if n != held_out],
        "teacher": teacher,
        **{m: by_mode[m]["nDCG@10"] for m in ("student", "hybrid", "projected") if m in by_mode},
        "hybrid_pct": round(100 * by_mode["hybrid"]["nDCG@10"] / teacher, 1),
        "untrained": base["nDCG@10"],
        "cos_hybrid": by_mode["hybrid"].get("mean_cos_to_teacher"),
        "rows": rows,
    }


def table(workdir: Path) -> list[dict]:
    out = []
    for results in sorted(workdir.glob("*/lodo.json")):
        spec = json.loads(results.read_text())
        for r in spec["folds"].values():
            out.append({"recipe": spec["recipe"], "overrides": spec["overrides"], **r})
    return out


def print_table(rows: list[dict]) -> None:
    nan = float("nan")
    head = f"{'recipe':<14}{'held out':<10}{'teacher':>9}{'hybrid':>9}{'% teach':>9}{'student':>9}{'untrained':>11}"
    print(head + f"{'projected':>11}  targets")
    for r in rows:
        ok = ("hybrid ok" if r["hybrid_pct"] >= 95 else "HYBRID<95%") + (
            "" if "student" not in r else ", student ok" if r["student"] >= r["untrained"] else ", STUDENT<untrained"
        )
        print(
            f"{r['recipe']:<14}{r['held_out']:<10}{r['teacher']:>9.4f}{r['hybrid']:>9.4f}{r['hybrid_pct']:>9.1f}"
            f"{r.get('student', nan):>9.4f}{r['untrained']:>11.4f}{r.get('projected', nan):>11.4f}  {ok}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ddx-lodo")
    parser.add_argument("--store", help="teacher store (default WORKDIR/store)")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--stages", default="train", help="precompute, train (train+evaluate), or both: a,b")
    parser.add_argument("--folds", default=",".join(DOMAINS), help="held-out sets to run, comma-separated")
    parser.add_argument("--recipe", default="default", help="name of this recipe's folder under WORKDIR")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--p1", action="append", default=[], metavar="KEY=VALUE", help="phase-1 override")
    parser.add_argument("--p2", action="append", default=[], metavar="KEY=VALUE", help="phase-2 override")
    parser.add_argument("--bf16", action="store_true", help="train with bfloat16 autocast (fast on AMX CPUs)")
    parser.add_argument("--teacher-dtype", default="bfloat16", help="teacher compute dtype for --stages precompute")
    parser.add_argument("--phase1-only", action="store_true", help="no phase 2: evaluate the phase-1 run")
    parser.add_argument("--modes", default="teacher,student,hybrid,projected", help="evaluation modes")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table", action="store_true", help="print every recipe measured under WORKDIR and stop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    args.store = args.store or str(work / "store")
    if args.table:
        rows = table(work)
        print(json.dumps(rows, indent=2, default=str)) if args.json else print_table(rows)
        return
    src = sources(Path(args.data_root))
    stages = args.stages.split(",")
    if "precompute" in stages:
        print(json.dumps(precompute_store(args, src)))
    if "train" not in stages:
        return
    out_file = work / args.recipe / "lodo.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    spec = json.loads(out_file.read_text()) if out_file.exists() else {"folds": {}, "timings": {}}
    spec.update(recipe=args.recipe, overrides={"both": args.set, "phase1": args.p1, "phase2": args.p2})
    spec.update(bf16=args.bf16, phase1_only=args.phase1_only, modes=args.modes)
    for held_out in args.folds.split(","):
        result = fold(args, held_out, src, spec["timings"])
        # Read again before writing: another fold of this recipe may have finished meanwhile (runs of one recipe
        # in parallel, one fold each), and its result must not be lost to this process's older copy.
        done = json.loads(out_file.read_text()) if out_file.exists() else {"folds": {}, "timings": {}}
        spec["folds"] = {**done["folds"], held_out: result}
        spec["timings"] = {**done["timings"], **spec["timings"]}
        tmp = out_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(spec, indent=2, default=str))
        os.replace(tmp, out_file)
    rows = [{"recipe": args.recipe, **r} for r in spec["folds"].values()]
    print(json.dumps(rows, indent=2, default=str)) if args.json else print_table(rows)


if __name__ == "__main__":
    main()
