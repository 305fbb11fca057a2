"""``ddx evaluate``: parse options, run :func:`distill.evaluate.evaluate.evaluate_retrieval` (with ``--routed``:
:func:`distill.route.curve.evaluate_routed`), print the table."""

from __future__ import annotations

from typing import Any

import click

from cli.options import (
    CommaList,
    ConfigCommand,
    config_option,
    echo_json,
    field_options,
    library_errors,
    store_access_options,
)

COLUMNS = ("MRR@10", "nDCG@10", "Recall@10", "Recall@100", "Recall@1000", "MAP")


@click.command("evaluate", cls=ConfigCommand)
@config_option
@store_access_options
@field_options(  # one option per EvalConfig field: its default, help and choices
    "distill.evaluate.config:EvalConfig",
    modes={"type": CommaList()},
    k_values={"decls": ["--k"], "type": CommaList(int)},
)
@click.option(
    "--routed",
    help="Router folder of 'ddx router fit': adds the routing curve (teacher usage 0-100 %, oracle, random) "
    "and writes routing-curve-SPLIT.json/.png next to the results.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@library_errors
def evaluate(data: tuple[str, ...], routed: str | None, as_json: bool, **options: Any) -> None:
    """Compare teacher, student, hybrid and projected retrieval on --data's --split.

    Teacher rows read teacher vectors from the store (the teacher does not run); hybrid pairs
    student-encoded queries with the teacher's passages (a --projection none run's: the passages'
    first D dims, renormalised; it has no projected mode). Metrics equal pytrec_eval's.

    \b
    Example:
        ddx evaluate --store stores/gte7b --model runs/p2 --data beir:data/scifact --split test
        ddx evaluate --store stores/gte7b --model runs/p2 --data msmarco:data/dl19 --json > results.json
        ddx evaluate --store stores/gte7b --model runs/p2 --data beir:data/scifact --routed runs/p2/router
    """
    from distill.evaluate.config import EvalConfig
    from distill.evaluate.evaluate import evaluate_retrieval

    config = EvalConfig(data=tuple(data), **options)
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
