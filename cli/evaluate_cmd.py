"""``ddx evaluate``: parse options, run :func:`distill.evaluate.evaluate.evaluate_retrieval` (with ``--routed``:
:func:`distill.route.curve.evaluate_routed`), print the table."""

from __future__ import annotations

from typing import Any

import click

from cli.options import config_option, echo_json, library_errors

COLUMNS = ("MRR@10", "nDCG@10", "Recall@10", "Recall@100", "Recall@1000", "MAP")


@click.command("evaluate")
@config_option
@click.option("--model", required=True, help="Run folder of 'ddx train' (or any sentence-transformer: student only).")
@click.option("--data", multiple=True, required=True, help="Source with qrels, repeatable.")
@click.option("--store", help="Teacher store (teacher and hybrid modes read their vectors from it).")
@click.option("--split", default="test", show_default=True)
@click.option(
    "--modes", default="teacher,student,hybrid,projected", show_default=True, help="Comma-separated modes to run."
)
@click.option("--k", "k_values", default="10,100,1000", show_default=True, help="Cut-offs (comma-separated).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Student encode batch.")
@click.option("--chunk-size", type=int, default=50_000, show_default=True, help="Passages per search step.")
@click.option(
    "--search",
    type=click.Choice(["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"]),
    default="exact",
    show_default=True,
)
@click.option("--device", help="Torch device (default: CUDA when available).")
@click.option("--strict", is_flag=True, help="Fail when qrels name documents absent from the corpus.")
@click.option("--teacher", help="Encode texts the store lacks with this teacher (writing them into the store).")
@click.option("--save-run", help="Folder for TREC run files.")
@click.option("--out", help="Folder for results JSON/CSV (default: MODEL/eval for runs).")
@click.option("--title-join", default="{title} {text}", show_default=True)
@click.option("--progress/--no-progress", default=True, help="Encode progress bars on stderr.")
@click.option(
    "--routed",
    help="Router folder of 'ddx router fit': adds the routing curve (teacher usage 0-100 %, oracle, random) "
    "and writes routing-curve-SPLIT.json/.png next to the results.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@library_errors
def evaluate(
    modes: str, k_values: str, data: tuple[str, ...], routed: str | None, as_json: bool, **options: Any
) -> None:
    """Compare teacher, student, hybrid and projected retrieval on --data's --split.

    Teacher rows read teacher vectors from the store (the teacher does not run); hybrid pairs
    student-encoded queries with the teacher's passages. Metrics equal pytrec_eval's.

    \b
    Example:
        ddx evaluate --store stores/gte7b --model runs/p2 --data beir:data/scifact --split test
        ddx evaluate --store stores/gte7b --model runs/p2 --data msmarco:data/dl19 --json > results.json
        ddx evaluate --store stores/gte7b --model runs/p2 --data beir:data/scifact --routed runs/p2/router
    """
    from distill.evaluate.evaluate import EvalConfig, evaluate_retrieval

    try:
        ks = tuple(int(k) for k in k_values.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"--k must be comma-separated integers, got {k_values!r}") from exc
    config = EvalConfig(data=tuple(data), modes=tuple(m.strip() for m in modes.split(",")), k_values=ks, **options)
    if routed:
        from distill.route.curve import evaluate_routed

        result = evaluate_routed(config, routed)
    else:
        result = evaluate_retrieval(config)
    if as_json:
        echo_json(result.to_dict())
        return
    print_table([r for r in result.rows if "router" not in r])
    if result.curves:
        print_routing(result.rows, result.curves)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for path in result.files:
        click.echo(f"wrote {path}")


def print_table(rows: list[dict[str, Any]]) -> None:
    """The evaluation table, one row per data set and mode."""
    width = max([10, *(len(row["mode"]) + 1 for row in rows)])
    header = f"{'data':<28} {'mode':<{width}}" + "".join(f"{c:>12}" for c in COLUMNS) + f"{'% teacher':>11}{'cos':>8}"
    click.echo(header)
    for row in rows:
        name = row["data"].split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1][:28]
        cells = "".join(f"{row.get(c, float('nan')):>12.4f}" for c in COLUMNS)
        kept = row.get("retained_nDCG@10")
        cos = row.get("mean_cos_to_teacher")
        click.echo(
            f"{name:<28} {row['mode']:<{width}}{cells}{(f'{kept:.1f}' if kept is not None else '-'):>11}"
            f"{(f'{cos:.3f}' if cos is not None else '-'):>8}"
        )


def print_routing(rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> None:
    """The routing curve per data set: every metric at each teacher usage, routers next to oracle and random."""
    routed = [r for r in rows if "router" in r]
    width = max(len(r["mode"]) for r in routed) + 1
    click.echo(
        f"\nrouting (queries above the router's threshold use their stored teacher vectors)\n"
        f"{'data':<28} {'router@usage':<{width}}"
        + "".join(f"{c:>12}" for c in COLUMNS)
        + f"{'% teacher':>11}{'lift':>8}"
    )
    for row in routed:
        name = row["data"].split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1][:28]
        cells = "".join(f"{row.get(c, float('nan')):>12.4f}" for c in COLUMNS)
        kept, lift = row.get("retained_nDCG@10"), row.get("lift_over_random")
        click.echo(
            f"{name:<28} {row['mode']:<{width}}{cells}{(f'{kept:.1f}' if kept is not None else '-'):>11}"
            f"{(f'{lift:.2f}' if lift is not None else '-'):>8}"
        )
    for curve in curves:
        name = curve["data"].split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
        crossings = ", ".join(
            f"{k} {100 * c['crosses_teacher_at']:.1f} %" if c["crosses_teacher_at"] is not None else f"{k} never"
            for k, c in curve["curves"].items()
        )
        click.echo(f"{name}: reaches the teacher's nDCG@10 at teacher usage: {crossings}")
