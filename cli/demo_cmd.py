"""``ddx demo``: the whole pipeline, offline, in one command."""

from __future__ import annotations

from typing import Any

import click

from cli.options import ConfigCommand, config_option, echo_json, field_options, library_errors


@click.command("demo", cls=ConfigCommand)
@config_option
@field_options("cli.demo:DemoConfig")  # one option per DemoConfig field: its default and help
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
