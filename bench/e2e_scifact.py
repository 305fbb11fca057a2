"""End to end on real data: precompute → phase 1 → phase 2 → evaluate, every stage timed.

Teacher all-mpnet-base-v2 (768-d), student all-MiniLM-L6-v2 (384-d), projection 384 → 768 → 768, CPU.

* precompute: SciFact (corpus + all queries), HotpotQA (questions + paragraphs), the MS MARCO TREC-DL-2019
  subset and the MS MARCO text triples, into one store;
* phase 1 on all those texts (queries judged only in test splits are left out automatically);
* phase 2 on SciFact train (positives from qrels/train.tsv, negatives mined from the stored teacher vectors),
  HotpotQA (supporting vs distractor paragraphs) and the MS MARCO triples;
* evaluate every mode on SciFact test and on TREC-DL-2019 (graded qrels), plus the untrained student.

Stages can run separately (``--stages precompute`` now, ``--stages phase1,phase2,evaluate`` later); timings
accumulate in WORKDIR/timings.json and the final table goes to WORKDIR/results.json.

``--projection none`` measures the student-dimension ("MRL") mode against the projection on the same store: no
projection, MiniLM's own 384-d output distilled into the first 384 of mpnet's 768 dims (renormalised); its hybrid
rows search those cut teacher vectors, its teacher rows the full ones. Give it its own run folders
(``--phase1-out``/``--phase2-out``) so the projection's runs stay.

Usage:
    python bench/e2e_scifact.py --workdir /tmp/ddx-e2e
    python bench/e2e_scifact.py --workdir /tmp/ddx-e2e --stages evaluate --json
    python bench/e2e_scifact.py --workdir /tmp/ddx-e2e --stages phase2,evaluate \
        --infonce-space projected --phase2-out phase2_projected --no-phase1-eval
    python bench/e2e_scifact.py --workdir /tmp/ddx-e2e --stages phase1,phase2,evaluate \
        --projection none --phase1-out phase1_none --phase2-out phase2_none
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STAGES = ("precompute", "phase1", "phase2", "evaluate")


def sources(root: Path) -> dict[str, str]:
    return {
        "scifact": f"beir:{root / 'scifact'}",
        "hotpotqa": f"hotpotqa:{root / 'hotpotqa-dev500'}",
        "dl19": f"beir:{root / 'msmarco-dl19-subset'}",
        "triples": f"msmarco:{root / 'msmarco-triples-toy'}",
    }


def _timed(timings: dict, name: str, fn):
    start = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    return out


def run(args: argparse.Namespace) -> dict:
    from cli.offline_models import minilm_path, mpnet_path
    from distill.evaluate.evaluate import EvalConfig, evaluate_retrieval
    from distill.train.config import TrainConfig
    from distill.train.run import train
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timing_file = work / "timings.json"
    timings = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    src = sources(Path(args.data_root))
    store, p1, p2 = work / "store", work / args.phase1_out, work / args.phase2_out
    stages = args.stages.split(",")
    out: dict = {}
    if "precompute" in stages:
        cfg = PrecomputeConfig(
            store=str(store), data=tuple(src.values()), teacher=TeacherConfig(model=str(mpnet_path()))
        )
        summary = _timed(timings, "precompute", lambda: precompute(cfg))
        out["precompute"] = summary.to_dict()
        timings["precompute_encoded"] = summary.encoded
    common = {
        "store": str(store),
        "batch_size": args.batch_size,
        "seed": 42,
        "num_workers": 2,
        "logging_steps": 20,
        "save_steps": 100_000,
        "split": "train,dev",
        "projection": args.projection,
        "teacher_dims": args.teacher_dims,
        "bf16": args.bf16,
    }
    if "phase1" in stages:
        cfg1 = TrainConfig(
            phase=1,
            out=str(p1),
            student=str(minilm_path()),
            data=tuple(src.values()),
            epochs=args.phase1_epochs,
            lr=5e-5,
            **common,
        )
        out["phase1"] = _timed(timings, p1.name, lambda: train(cfg1)).to_dict()
    if "phase2" in stages:
        cfg2 = TrainConfig(
            phase=2,
            out=str(p2),
            init=str(p1),
            data=(src["scifact"], src["hotpotqa"], src["triples"]),
            epochs=args.phase2_epochs,
            lr=3e-5,
            num_negatives=args.negatives,
            infonce_space=args.infonce_space,
            mine_negatives=args.mine_negatives,
            **common,
        )
        out["phase2"] = _timed(timings, p2.name, lambda: train(cfg2)).to_dict()
    if "evaluate" in stages:
        rows = []
        for name in ("scifact", "dl19"):
            for run_name, run_dir in (("phase 2", p2), ("phase 1", p1))[: 1 if args.no_phase1_eval else 2]:
                cfg = EvalConfig(
                    model=str(run_dir),
                    store=str(store),
                    data=(src[name],),
                    split="test",
                    out=str(work / "eval" / run_dir.name),
                )
                result = _timed(timings, f"evaluate_{name}_{run_dir.name}", lambda c=cfg: evaluate_retrieval(c))
                rows += [{**r, "run": run_name} for r in result.rows]
            base = EvalConfig(model=str(minilm_path()), data=(src[name],), split="test", modes=("student",))
            rows += [{**r, "run": "untrained", "mode": "student (untrained)"} for r in evaluate_retrieval(base).rows]
        out["rows"] = rows
        results = "results.json" if p2.name == "phase2" else f"results_{p2.name}.json"
        (work / results).write_text(json.dumps({"rows": rows, "timings": timings}, indent=2))
    timing_file.write_text(json.dumps(timings, indent=2))
    out["timings"] = timings
    return out


def print_rows(rows: list[dict], timings: dict) -> None:
    cols = ("MRR@10", "nDCG@10", "Recall@100", "Recall@1000", "MAP")
    print(f"{'data':<22}{'run':<10}{'mode':<22}" + "".join(f"{c:>12}" for c in cols) + f"{'% teacher':>11}{'cos':>8}")
    for r in rows:
        name = r["data"].rstrip("/").rsplit("/", 1)[-1]
        kept, cos = r.get("retained_nDCG@10"), r.get("mean_cos_to_teacher")
        print(
            f"{name:<22}{r.get('run', ''):<10}{r['mode']:<22}"
            + "".join(f"{r[c]:>12.4f}" for c in cols)
            + f"{(f'{kept:.1f}' if kept is not None else '-'):>11}{(f'{cos:.3f}' if cos is not None else '-'):>8}"
        )
    print("stage wall time (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ddx-e2e")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--phase1-epochs", type=float, default=1.0)
    parser.add_argument("--phase2-epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--mine-negatives", type=int, default=7)
    parser.add_argument(
        "--infonce-space",
        default="projected+hybrid",
        help="phase-2 InfoNCE space: projected, hybrid (projected queries against the stored teacher passages), "
        "student, or several joined with '+' (e.g. projected+hybrid)",
    )
    parser.add_argument(
        "--projection",
        choices=("mlp", "none"),
        default="mlp",
        help="mlp: the projection MLP; none: no projection, the student distilled into the teacher's first "
        "--teacher-dims dims (renormalised; the reference system's 'MRL')",
    )
    parser.add_argument(
        "--teacher-dims", type=int, default=None, help="with --projection none: D (default: the student's 384)"
    )
    parser.add_argument(
        "--phase1-out", default="phase1", help="phase-1 run folder under WORKDIR (keep runs of other settings)"
    )
    parser.add_argument(
        "--phase2-out", default="phase2", help="phase-2 run folder under WORKDIR (keep runs of other settings)"
    )
    parser.add_argument("--no-phase1-eval", action="store_true", help="evaluate the phase-2 run only")
    parser.add_argument("--bf16", action="store_true", help="train with bfloat16 autocast (fast on AMX CPUs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    elif "rows" in out:
        print_rows(out["rows"], out["timings"])
    else:
        print(json.dumps(out["timings"], indent=2))


if __name__ == "__main__":
    main()
