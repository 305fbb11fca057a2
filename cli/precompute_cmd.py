"""``ddx precompute-teacher``: parse options, run :func:`precompute.precompute`, print the summary."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

import click

from cli.options import ConfigCommand, config_option, echo_json, field_options, library_errors, store_access_options

if TYPE_CHECKING:  # the pipeline imports numpy and the store; load it only when the command runs
    from precompute.pipeline import PrecomputeSummary

# One option per field of PrecomputeConfig, of TeacherConfig for the teacher, of RayConfig for --engine ray (as
# --ray-*): their defaults, help and choices.
PIPELINE, TEACHER, RAY = (
    "precompute.config:PrecomputeConfig",
    "precompute.config:TeacherConfig",
    "precompute.config:RayConfig",
)
RAY_FIELDS = ("address", "actors", "actor_gpus", "actor_cpus", "unit_rows", "max_restarts", "max_task_retries")


def _roles(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    return ("query", "passage") if value == "both" else (value,)


@click.command("precompute-teacher", cls=ConfigCommand)
@config_option
@store_access_options
@field_options(TEACHER, "model", model={"decls": ["--teacher"]})
@field_options(PIPELINE, "store", "data")
@field_options(TEACHER, skip=("model",))
@field_options(
    PIPELINE,
    skip=("store", "data", "teacher"),
    roles={
        "type": click.Choice(["both", "query", "passage"]),
        "default": "both",
        "multiple": False,
        "callback": _roles,
    },
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process (one per rank under torchrun/SLURM); ray: a Ray Data job over a Ray cluster "
    "(pip install 'ddx[ray]'), the --ray-* options.",
)
@field_options(
    RAY,
    address={"decls": ["--ray-address"]},
    actors={"decls": ["--ray-actors"]},
    actor_gpus={"decls": ["--ray-actor-gpus"]},
    actor_cpus={"decls": ["--ray-actor-cpus"]},
    unit_rows={"decls": ["--ray-unit-rows"]},
    max_restarts={"decls": ["--ray-max-restarts"]},
    max_task_retries={"decls": ["--ray-max-task-retries"]},
)
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@library_errors
def precompute_teacher(
    model: str, store: str, data: tuple[str, ...], engine: str, as_json: bool, **options: Any
) -> None:
    """Run the teacher once over every text of --data that the store lacks.

    Texts already stored (from any earlier run or data set) are skipped, so rerunning with one more
    data set encodes only the new texts, and rerunning after a crash resumes. With torchrun, every
    rank encodes its own deterministic slice into its own segment. With --engine ray, a Ray Data job
    spreads the texts over GPU actors, each unit of work committed as a segment of its own.

    \b
    Example:
        ddx precompute-teacher --teacher Alibaba-NLP/gte-Qwen2-7B-instruct --store stores/gte7b \\
            --data beir:data/scifact --data msmarco:data/msmarco --max-seq-length 512
        torchrun --nproc-per-node 8 -m cli.main precompute-teacher --teacher ... --store ... --data ...
        ddx precompute-teacher --engine ray --ray-address auto --teacher ... --store s3://bucket/gte7b --data ...
    """
    from precompute.config import PrecomputeConfig, RayConfig, TeacherConfig

    teacher_keys = {f.name for f in fields(TeacherConfig)} & set(options)
    teacher = TeacherConfig(model=model, **{k: options.pop(k) for k in teacher_keys})
    ray_config = RayConfig(**{k: options.pop(k) for k in RAY_FIELDS})
    config = PrecomputeConfig(store=store, data=tuple(data), teacher=teacher, **options)
    if engine == "ray":
        from precompute.ray_engine import precompute_ray

        summary = precompute_ray(config, ray_config)
    else:
        from precompute.pipeline import precompute

        summary = precompute(config)
    if as_json:  # every rank prints its own object (scripts collect them); rank 0's carries the job total
        echo_json(summary.to_dict())
        return
    if summary.rank == 0:  # text: rank 0 only, with the job's total
        _print_summary(summary)


def _print_summary(summary: PrecomputeSummary) -> None:
    d = summary.to_dict()
    click.echo(f"store {d['store']}  (teacher fingerprint {d['fingerprint']})")
    for s in d["sources"]:
        click.echo(
            f"  {s['spec']}: {s['passages']:,} passages, {s['queries']:,} queries"
            + (f", {s['skipped_bad']} bad records skipped" if s["skipped_bad"] else "")
        )
    click.echo(
        (f"rank {d['rank']} of {d['world_size']}: " if d["world_size"] > 1 else "")
        + f"read {d['texts_read']:,} texts, {d['unique_texts']:,} distinct; {d['already_stored']:,} already "
        f"stored; encoded {d['encoded']:,} in {d['seconds']:.1f}s ({d['texts_per_s']:,.1f} texts/s, "
        f"{d['tokens_per_s']:,.0f} tokens/s, padding {100 * d['padding_waste']:.1f}%)"
    )
    if d["encoded"] == 0:
        click.echo("nothing to encode: every text is already in the store (the teacher did not run)")
    for s in d["salvaged"]:
        click.echo(f"resumed: kept {s['rows']:,} rows of interrupted segment {s['segment']}")
    if d["engine"] == "ray" and d["segments"]:
        click.echo(f"ray: {len(d['segments'])} unit segment(s) committed; 'ddx cache compact {d['store']}' merges them")
    if (job := d["job_total"]) is not None:
        click.echo(
            f"job {job['job']}: {len(job['ranks_reported'])} of {job['world_size']} ranks reported; encoded "
            f"{job['encoded']:,} texts in {job['seconds']:.1f}s ({job['texts_per_s']:,.1f} texts/s), "
            f"{len(job['segments'])} segment(s)"
            + ("" if job["complete"] else f"; PARTIAL: ranks {job['missing_ranks']} did not report in time")
        )
