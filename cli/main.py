"""The ``ddx`` command: a click group whose subcommands are imported only when run.

``ddx --help`` must answer in well under a second, so this module imports neither torch nor any
ddx package that does; each subcommand lives in its own module and is loaded on first use.
"""

from __future__ import annotations

import importlib

import click

__all__ = ["cli", "main"]

# command name -> "module:attribute"
COMMANDS: dict[str, tuple[str, str]] = {
    "precompute-teacher": (
        "cli.precompute_cmd:precompute_teacher",
        "Run the teacher once over your data into a store.",
    ),
    "cache": ("cli.cache_cmd:cache", "Inspect, verify and clean a teacher store."),
    "train": ("cli.train_cmd:train", "Train the student (phase 1 or 2) from stored teacher vectors."),
    "evaluate": ("cli.evaluate_cmd:evaluate", "Compare teacher, student and hybrid retrieval."),
    "router": ("cli.router_cmd:router", "Fit and export the router that sends hard queries to the teacher."),
    "demo": ("cli.demo_cmd:demo", "Run precompute → phase 1 → phase 2 → evaluate offline on a built-in corpus."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="ddx", prog_name="ddx")  # the installed distribution's version
def cli() -> None:
    """ddx: distill retrieval models from a teacher you run only once.

    \b
    Example:
        ddx precompute-teacher --teacher Alibaba-NLP/gte-Qwen2-7B-instruct --store stores/gte7b --data beir:scifact
        ddx train --phase 1 --store stores/gte7b --student sentence-transformers/all-mpnet-base-v2 \\
            --data beir:scifact --out runs/p1
        ddx evaluate --store stores/gte7b --model runs/p1 --data beir:scifact --split test
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ddx")


if __name__ == "__main__":
    main()
