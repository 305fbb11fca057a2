"""``ddx train``: parse options (config file under flags), run :func:`distill.train.run.train`, print the result."""

from __future__ import annotations

from typing import Any

import click

from cli.options import ConfigCommand, config_option, echo_json, field_options, library_errors, store_access_options


@click.command("train", cls=ConfigCommand)
@config_option
@store_access_options
@field_options(  # one option per TrainConfig field: its default, help and choices
    "distill.train.config:TrainConfig",
    data={"required": False},  # --hard-negatives may stand in for it
    gradient_checkpointing={"decls": ["--gradient-checkpointing/--no-gradient-checkpointing"]},
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@library_errors
def train(as_json: bool, data: tuple[str, ...], hard_negatives: tuple[str, ...], **options: Any) -> None:
    """Train the student from stored teacher vectors; the teacher never runs.

    Phase 1 matches the projected student to the teacher on every text of --data (queries judged
    only in held-out splits are left out). Phase 2 trains retrieval with hard negatives (from the
    data, --hard-negatives files, or --mine-negatives) and in-batch negatives. Texts without a stored
    vector stop the run before training, with the precompute command that adds them. With
    --projection none there is no projection: the student is trained straight into the teacher's
    first --teacher-dims dims (its own dimension), renormalised, and the hybrid searches those.

    \b
    Example:
        ddx train --phase 1 --store stores/gte7b --student sentence-transformers/all-mpnet-base-v2 \\
            --data msmarco:data/msmarco --data hotpotqa:data/hotpotqa --out runs/p1
        ddx train --phase 2 --store stores/gte7b --init runs/p1 --data msmarco:data/msmarco \\
            --hard-negatives data/msmarco-hard-negatives.jsonl.gz --out runs/p2
        ddx train --phase 1 --store stores/mpnet --student sentence-transformers/all-MiniLM-L6-v2 \\
            --projection none --teacher-dims 384 --data beir:data/scifact --out runs/p1-mrl
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
    dims = result.report.get("teacher_dims")
    projection = result.projection
    if dims:  # --projection none
        projection = f"none: the teacher's first {dims} dims, renormalised ({projection})"
    click.echo(f"student_base: {result.student_base}\nprojection:   {projection}\nhybrid:       {result.hybrid}")
