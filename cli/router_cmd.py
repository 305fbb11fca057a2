"""``ddx router fit`` and ``ddx router export``: the switch between student and teacher, from the store."""

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


@click.group("router")
def router() -> None:
    """Fit a router that sends hard queries to the teacher, and export it as one routed model.

    \b
    Example:
        ddx router fit --store stores/gte7b --model runs/p2 --data msmarco:data/msmarco --out runs/p2/router
        ddx router export runs/p2/router --teacher Alibaba-NLP/gte-Qwen2-7B-instruct --teacher-usage 0.2 \\
            --out models/routed
    """


@router.command("fit", cls=ConfigCommand)
@config_option
@store_access_options
@field_options(  # one option per RouterConfig field
    "distill.route.config:RouterConfig",
    skip=("temperature", "train_batch_size", "patience"),  # internal knobs of the fit
    data={"required": False},  # --hard-negatives may stand in for it
    kinds={"type": CommaList()},
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@library_errors
def fit(data: tuple[str, ...], hard_negatives: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Fit the routers from stored teacher vectors; the teacher never runs.

    Per fit query, the hybrid (projected student query) and the teacher (stored query vector) rank its
    positives among its own negatives and a shared pool by stored teacher passage vectors; the router
    learns the teacher's gain (--target). Writes router.json and router.pt.

    \b
    Example:
        ddx router fit --store stores/gte7b --model runs/p2 --data msmarco:data/msmarco --out runs/p2/router
        ddx router fit --store stores/gte7b --model runs/p2 --data beir:data/scifact --split dev --json
    """
    from distill.route.config import RouterConfig
    from distill.route.fit import fit_router

    config = RouterConfig(data=tuple(data), hard_negatives=tuple(hard_negatives), **options)
    result = fit_router(config)
    if as_json:
        echo_json(result.to_dict())
        return
    r = result.report
    click.echo(
        f"router fitted on {result.queries:,} queries (pool {result.pool:,} passages, target {result.target}): "
        f"hybrid nDCG@10 {r['hybrid_ndcg10']:.4f}, teacher {r['teacher_ndcg10']:.4f}; teacher better on "
        f"{100 * r['gain_positive']:.1f} %, worse on {100 * r['gain_negative']:.1f} % of queries"
    )
    for kind in config.kinds:
        lift = r[kind].get("val_lift")
        shown = f"{lift:.3f}" if lift is not None else "- (too few queries to hold out)"
        how = r[kind]["selection"]
        click.echo(f"  {kind:<10} {r[kind]['best_epoch']} epochs ({how}), held-out lift over random {shown}")
    click.echo(f"router: {result.out}")


@router.command("export", cls=ConfigCommand)
@click.argument("router_dir", metavar="ROUTER")
@field_options("distill.route.config:RouterExportConfig", skip=("router",))  # ROUTER is the argument
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@library_errors
def export(router_dir: str, as_json: bool, **options: Any) -> None:
    """Write a SentenceTransformer that encodes queries by student + projection, and the hard ones by the teacher.

    Load it with SentenceTransformer(OUT, trust_remote_code=True) where ddx is installed (sentence-
    transformers >= 6 asks that flag for any module class outside its own package). Passages always go
    to the teacher: the index is the teacher's.

    \b
    Example:
        ddx router export runs/p2/router --teacher Alibaba-NLP/gte-Qwen2-7B-instruct --teacher-usage 0.2 \\
            --out models/routed
    """
    from distill.route.config import RouterExportConfig
    from distill.route.routed_model import export_routed

    result = export_routed(RouterExportConfig(router=router_dir, **options))
    if as_json:
        echo_json(result)
        return
    usage = result["teacher_usage"]
    share = f"{100 * usage:g} % of the fit queries" if usage is not None else "a fixed threshold"
    click.echo(
        f"routed model: {result['out']} (teacher {result['teacher']}, threshold {result['threshold']:.4g}: {share})"
    )
    click.echo(f'load it: SentenceTransformer("{result["out"]}", trust_remote_code=True)')
