"""``ddx train``: parse options (config file under flags), run :func:`distill.train.run.train`, print the result."""

from __future__ import annotations

from typing import Any

import click

from cli.options import config_option, echo_json, library_errors


@click.command("train")
@config_option
@click.option("--phase", type=click.IntRange(1, 2), required=True, help="1: MSE+cosine on texts; 2: InfoNCE+MSE.")
@click.option("--store", required=True, help="Teacher store to read vectors from (never written).")
@click.option("--data", multiple=True, help="Source, repeatable (as for precompute-teacher).")
@click.option("--out", required=True, help="Run folder (student_base/, hybrid/, projection_layer.pt, ...).")
@click.option("--student", help="Student sentence-transformer (hub id or folder).")
@click.option("--init", help="Start from this run folder (phase 2 starts from phase 1).")
@click.option(
    "--split",
    default="train",
    show_default=True,
    help="Split(s) of examples to train on, comma-separated (e.g. train,dev).",
)
@click.option(
    "--hard-negatives", multiple=True, help="Extra example file(s), e.g. the ST MS MARCO hard-negatives jsonl."
)
@click.option(
    "--mine-negatives",
    type=int,
    default=0,
    show_default=True,
    help="Mine K negatives per query from stored teacher vectors (no teacher run).",
)
@click.option(
    "--mine-margin",
    type=float,
    default=0.95,
    show_default=True,
    help="Skip mined candidates scoring >= margin × the weakest positive (likely unjudged positives).",
)
@click.option("--num-negatives", type=int, default=7, show_default=True, help="Hard negatives per query per step.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Examples per device per step.")
@click.option("--lr", type=float, default=2e-5, show_default=True, help="Student learning rate.")
@click.option(
    "--projection-lr",
    type=float,
    help="Projection learning rate (default 1e-4 after the ridge warm start, 1e-3 from random, "
    "the student's --lr in phase 2).",
)
@click.option("--warmup", type=float, default=0.1, show_default=True, help="< 1: fraction of steps; >= 1: steps.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--bf16", is_flag=True, help="bfloat16 mixed precision.")
@click.option("--fp16", is_flag=True, help="float16 mixed precision.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--max-seq-length", type=int, help="Student tokens per text (default: the student's).")
@click.option("--projection-hidden", type=int, help="Projection hidden width (default 2 × student dim).")
@click.option(
    "--projection-init",
    type=click.Choice(["ridge", "random"]),
    default="ridge",
    show_default=True,
    help="New projections: fit the output layer by ridge regression on stored vectors first.",
)
@click.option("--mse-weight", type=float, help="MSE weight (default 0.4 in phase 1, 0.2 in phase 2).")
@click.option(
    "--mse-reduction",
    type=click.Choice(["vector", "element"]),
    default="vector",
    show_default=True,
    help="vector: squared distance per vector; element: torch's mean over elements (~1/dim as large).",
)
@click.option("--cos-weight", type=float, default=0.6, show_default=True, help="Phase-1 cosine weight.")
@click.option("--infonce-weight", type=float, default=0.8, show_default=True, help="Phase-2 InfoNCE weight.")
@click.option("--temperature", type=float, default=0.05, show_default=True, help="InfoNCE temperature.")
@click.option(
    "--infonce-space",
    default="projected+hybrid",
    show_default=True,
    help="Where InfoNCE runs: projected student on both sides (projected), projected queries vs "
    "teacher passages (hybrid), the student's own space (student), or several joined with '+' "
    "(e.g. projected+hybrid: terms averaged).",
)
@click.option("--negatives-scope", type=click.Choice(["batch", "own"]), default="batch", show_default=True)
@click.option(
    "--mini-batch-size",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Phase 2: sequences per forward of the cached (GradCache) loss: memory is set by this, not by "
    "batch × negatives × length; same gradient, ~1/3 more compute. 0: the plain step (all in one graph).",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=False,
    show_default=True,
    help="Recompute the student's layer activations in backward: less memory, ~30 % more time.",
)
@click.option("--length-grouping/--no-length-grouping", default=True, show_default=True)
@click.option("--allow-missing", is_flag=True, help="Drop examples lacking teacher vectors instead of stopping.")
@click.option("--skip-bad", is_flag=True, help="Drop unknown ids and queries without positives instead of stopping.")
@click.option("--expect-teacher", help="Refuse a store made by another teacher than this one.")
@click.option("--title-join", default="{title} {text}", show_default=True, help="Must match the precompute run's.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the newest complete checkpoint in OUT/checkpoints (damaged ones are skipped and set aside).",
)
@click.option("--num-workers", type=int, default=2, show_default=True, help="DataLoader workers.")
@click.option("--logging-steps", type=int, default=10, show_default=True)
@click.option("--save-steps", type=int, default=500, show_default=True)
@click.option("--save-total-limit", type=int, default=2, show_default=True)
@click.option("--token-cache", help="Folder for token tables (default $DDX_CACHE_DIR or ~/.cache/ddx).")
@click.option("--device", help="Torch device (default: CUDA when available).")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@library_errors
def train(as_json: bool, data: tuple[str, ...], hard_negatives: tuple[str, ...], **options: Any) -> None:
    """Train the student from stored teacher vectors; the teacher never runs.

    Phase 1 matches the projected student to the teacher on every text of --data (queries judged
    only in held-out splits are left out). Phase 2 trains retrieval with hard negatives (from the
    data, --hard-negatives files, or --mine-negatives) and in-batch negatives. Texts without a stored
    vector stop the run before training, with the precompute command that adds them.

    \b
    Example:
        ddx train --phase 1 --store stores/gte7b --student sentence-transformers/all-mpnet-base-v2 \\
            --data msmarco:data/msmarco --data hotpotqa:data/hotpotqa --out runs/p1
        ddx train --phase 2 --store stores/gte7b --init runs/p1 --data msmarco:data/msmarco \\
            --hard-negatives data/msmarco-hard-negatives.jsonl.gz --out runs/p2
        ddx train --config runs.yaml --lr 3e-5
    """
    from distill.train.config import TrainConfig
    from distill.train.run import end_distributed
    from distill.train.run import train as run

    config = TrainConfig(data=tuple(data), hard_negatives=tuple(hard_negatives), **options)
    result = run(config)
    if not end_distributed():
        return  # every rank returns the same result; rank 0 reports it
    if as_json:
        echo_json(result.to_dict())
        return
    first = f"{result.first_loss:.4f}" if result.first_loss is not None else "-"
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    click.echo(
        f"phase {config.phase}: {result.steps} steps on {result.report.get('examples', 0):,} examples, "
        f"loss {first} -> {final} ({result.report.get('seconds', 0):.0f}s)"
    )
    if result.report.get("resumed_from"):
        click.echo(f"  resumed from: {result.report['resumed_from']}")
    for key in ("missing_vectors", "dropped_missing", "held_out_queries"):
        if result.report.get(key):
            click.echo(f"  {key.replace('_', ' ')}: {result.report[key]:,}")
    if result.report.get("mined"):
        m = result.report["mined"]
        click.echo(
            f"  mined {m['mined']:,} negatives for {m['queries']:,} queries "
            f"({m['skipped_as_likely_positive']:,} candidates skipped as likely positives)"
        )
    click.echo(f"student_base: {result.student_base}\nprojection:   {result.projection}\nhybrid:       {result.hybrid}")
