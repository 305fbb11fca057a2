"""``ddx router fit`` and ``ddx router export``: the switch between student and teacher, from the store."""

from __future__ import annotations

from typing import Any

import click

from cli.options import config_option, echo_json, library_errors


@click.group("router")
def router() -> None:
    """Fit a router that sends hard queries to the teacher, and export it as one routed model.

    \b
    Example:
        ddx router fit --store stores/gte7b --model runs/p2 --data msmarco:data/msmarco --out runs/p2/router
        ddx router export runs/p2/router --teacher Alibaba-NLP/gte-Qwen2-7B-instruct --teacher-usage 0.2 \\
            --out models/routed
    """


@router.command("fit")
@config_option
@click.option("--store", required=True, help="Teacher store the run was trained against (read only).")
@click.option("--model", required=True, help="Run folder of 'ddx train' (student + projection).")
@click.option("--data", multiple=True, help="Source with training examples, repeatable (as for train).")
@click.option("--out", help="Router folder (default: MODEL/router).")
@click.option(
    "--split",
    default="train",
    show_default=True,
    help="Split(s) of examples; one the student did not train on gives truer targets.",
)
@click.option("--hard-negatives", multiple=True, help="Extra example file(s), as for train.")
@click.option("--mine-negatives", type=int, default=0, show_default=True, help="Mine K negatives per query (stored).")
@click.option("--mine-margin", type=float, default=0.95, show_default=True)
@click.option(
    "--pool-size",
    type=int,
    default=50_000,
    show_default=True,
    help="Shared candidate passages every fit query is ranked against, besides its own positives and negatives.",
)
@click.option(
    "--target",
    type=click.Choice(["ndcg10", "rr10", "logp"]),
    default="ndcg10",
    show_default=True,
    help="The teacher's gain over the hybrid per query: nDCG@10, reciprocal rank@10, or InfoNCE log-likelihood.",
)
@click.option(
    "--kinds",
    default="encoder,retrieval",
    show_default=True,
    help="Routers to fit: encoder (student embedding), retrieval (+ the hybrid search's top scores).",
)
@click.option("--hidden", type=int, default=256, show_default=True, help="Router MLP width.")
@click.option("--epochs", type=int, default=200, show_default=True, help="Upper bound; a held-out 10 % stops it.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Student encode batch.")
@click.option("--allow-missing", is_flag=True, help="Drop examples lacking teacher vectors instead of stopping.")
@click.option("--skip-bad", is_flag=True, help="Drop unknown ids and queries without positives instead of stopping.")
@click.option("--title-join", default="{title} {text}", show_default=True, help="Must match the precompute run's.")
@click.option("--device", help="Torch device (default: CUDA when available).")
@click.option("--progress/--no-progress", default=True, help="Encode progress bars on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@library_errors
def fit(data: tuple[str, ...], hard_negatives: tuple[str, ...], kinds: str, as_json: bool, **options: Any) -> None:
    """Fit the routers from stored teacher vectors; the teacher never runs.

    Per fit query, the hybrid (projected student query) and the teacher (stored query vector) rank its
    positives among its own negatives and a shared pool by stored teacher passage vectors; the router
    learns the teacher's gain (--target). Writes router.json and router.pt.

    \b
    Example:
        ddx router fit --store stores/gte7b --model runs/p2 --data msmarco:data/msmarco --out runs/p2/router
        ddx router fit --store stores/gte7b --model runs/p2 --data beir:data/scifact --split dev --json
    """
    from distill.route.fit import RouterConfig, fit_router

    config = RouterConfig(
        data=tuple(data),
        hard_negatives=tuple(hard_negatives),
        kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
        **options,
    )
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


@router.command("export")
@click.argument("router_dir", metavar="ROUTER")
@click.option("--teacher", required=True, help="The teacher that wrote the store (hub id or folder); checked.")
@click.option("--out", required=True, help="Folder for the routed SentenceTransformer.")
@click.option("--teacher-usage", type=float, help="Fraction of the fit queries sent to the teacher [default: 0.2].")
@click.option("--threshold", type=float, help="Or a raw router-score threshold (score above: teacher).")
@click.option("--model", help="Run folder (default: the run the router was fitted on).")
@click.option("--revision", help="Teacher hub revision.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=None, help="For the teacher's own code.")
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
    from distill.route.routed_model import RouterExportConfig, export_routed

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
