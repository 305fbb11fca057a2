"""Start-up time of the ``ddx`` command line: ``ddx --help`` next to a bare interpreter, measured side by side.

``ddx --help`` (and every sub-command's ``--help``) must not import torch, transformers or sentence-transformers:
the library modules load when a command runs. tests/cli/test_cli_basics.py checks that without timing anything
(wall time on a shared machine is not a test); this bench measures what it buys. Each repeat runs, interleaved:

* ``python -c pass``: the interpreter's own start-up (the floor);
* ``python -c "import cli.main"``: the CLI's imports (click, the option tables);
* ``ddx --help``: the console-script entry point, as a user runs it;
* with ``--all``: ``ddx CMD --help`` for every command path.

The medians are reported, with the median of the per-repeat ratios to ``python -c pass`` (robust to other load on
the machine: both sides of a ratio ran within the same second). Target: ``ddx --help`` within ``--target`` seconds
(default 1.0, median). Exit status 0 when met.

Example:
    python bench/cli_startup.py
    python bench/cli_startup.py --repeats 20 --all --json > cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DDX = str(Path(sys.executable).with_name("ddx"))
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats; medians are reported (default 10)")
    p.add_argument("--all", action="store_true", help="also time 'ddx CMD --help' for every command path")
    p.add_argument("--target", type=float, default=1.0, help="median seconds 'ddx --help' must stay under")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def command_paths() -> list[tuple[str, ...]]:
    """Every command path below ``ddx`` (walked from the click groups, so a new command is timed too)."""
    import click

    from cli.main import cli

    ctx = click.Context(cli, info_name="ddx")
    out: list[tuple[str, ...]] = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        if path:
            out.append(path)
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), (*path, name))

    walk(cli, ())
    return out


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed


def run(args: argparse.Namespace) -> dict:
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import cli.main'": [sys.executable, "-c", "import cli.main"],
        "ddx --help": [DDX, "--help"],
    }
    if args.all:
        commands.update({f"ddx {' '.join(p)} --help": [DDX, *p, "--help"] for p in command_paths()})
    for cmd in commands.values():  # warm the page cache and the bytecode cache: cold starts are not the question
        timed(cmd)
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():  # interleaved: load on the machine hits every command alike
            seconds[name].append(timed(cmd))
    floor = seconds["python -c pass"]
    rows = [
        {
            "command": name,
            "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4),
            "ratio_to_python": round(statistics.median(t / f for t, f in zip(times, floor, strict=True)), 2),
        }
        for name, times in seconds.items()
    ]
    help_median = statistics.median(seconds["ddx --help"])
    return {
        "repeats": args.repeats,
        "rows": rows,
        "target_s": args.target,
        "met": help_median < args.target,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(r["command"]) for r in result["rows"]) + 2
        print(f"{'command':<{width}}{'median s':>10}{'min s':>10}{'x python':>10}")
        for r in result["rows"]:
            print(f"{r['command']:<{width}}{r['median_s']:>10.3f}{r['min_s']:>10.3f}{r['ratio_to_python']:>10.2f}")
        verdict = "met" if result["met"] else "NOT met"
        print(f"target: 'ddx --help' median under {result['target_s']:.2f} s: {verdict} ({result['repeats']} repeats)")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
