"""Every command documents an Example; ``ddx --help`` is torch-free; config files; clean errors."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.main import COMMANDS, cli
from storage.store import TeacherStore
from tests.precompute.test_pipeline import (
    one_torch_thread,  # noqa: F401 - autouse fixture
    write_beir,
)
from tests.tiny_models import tiny_corpus

DDX = str(Path(sys.executable).with_name("ddx"))
EXPECTED = [
    (),
    ("precompute-teacher",),
    ("cache",),
    ("cache", "compact"),
    ("cache", "gc"),
    ("cache", "info"),
    ("cache", "ls"),
    ("cache", "verify"),
    ("train",),
    ("evaluate",),
    ("router",),
    ("router", "export"),
    ("router", "fit"),
    ("demo",),
]


def all_commands() -> list[tuple[str, ...]]:
    """Every command path below ``ddx``, found by walking the groups (so a new command is checked too)."""
    ctx = click.Context(cli, info_name="ddx")
    out: list[tuple[str, ...]] = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        out.append(path)
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), (*path, name))

    walk(cli, ())
    return out


def test_every_command_is_walked() -> None:
    assert sorted(all_commands()) == sorted(EXPECTED)
    assert set(COMMANDS) == {p[0] for p in EXPECTED if len(p) == 1}


@pytest.mark.parametrize("path", EXPECTED, ids=lambda p: " ".join(p) or "ddx")
def test_help_ends_with_an_example(path: tuple[str, ...]) -> None:
    """The description of every ``--help`` ends with an "Example:" section of ddx command lines."""
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="ddx")
    assert result.exit_code == 0, result.output
    description = result.stdout.split("\nOptions:")[0].rstrip()
    _, sep, example = description.rpartition("\n  Example:\n")
    assert sep, f"'ddx {' '.join(path)} --help' has no Example section:\n{result.stdout}"
    lines = [line.strip() for line in example.splitlines() if line.strip()]
    assert lines and all(line.startswith(("ddx ", "torchrun ", "--")) for line in lines), lines
    assert any(line.startswith(" ".join(("ddx", *path))) for line in lines)  # it shows this very command
    assert "\n\n" not in example.strip("\n")  # nothing after the example but Options (and Commands)


def test_help_imports_no_torch() -> None:
    """No ``--help`` page, nor ``import cli.main``, loads torch, transformers or sentence-transformers: they load
    when a command runs. (How fast that makes ``ddx --help`` is measured, not tested: bench/cli_startup.py.)"""
    code = (
        "import json, sys\n"
        "import cli.main\n"
        "heavy = ('torch', 'sentence_transformers', 'transformers')\n"
        "on_import = sorted(m for m in heavy if m in sys.modules)\n"
        "from click.testing import CliRunner\n"
        "paths = json.loads(sys.argv[1])\n"
        "codes = [CliRunner().invoke(cli.main.cli, [*p, '--help']).exit_code for p in paths]\n"
        "print(json.dumps([on_import, sorted(m for m in heavy if m in sys.modules), codes]))\n"
    )
    paths = [list(p) for p in all_commands()]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(paths)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    on_import, after_help, codes = json.loads(proc.stdout)
    assert codes == [0] * len(paths)
    assert on_import == [] and after_help == [], (on_import, after_help)
    entry_point = subprocess.run([DDX, "--help"], capture_output=True, text=True, timeout=60)  # the installed script
    assert entry_point.returncode == 0 and "Example:" in entry_point.stdout, entry_point.stderr


# -- config files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["yaml", "toml"])
def test_config_file_supplies_options_and_flags_win(kind: str, tiny_bert: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", tiny_corpus(12, seed=80))
    store = tmp_path / "store"
    if kind == "yaml":  # option names as on the command line, with - or _
        text = (
            f"teacher: {tiny_bert}\nstore: {store}\ndata:\n  - beir:{folder}\nlimit: 3\nflush-rows: 4\n"
            "progress: false\njson: true\n"
        )
    else:  # a section named after the command; other sections are ignored
        text = (
            f'[precompute-teacher]\nteacher = "{tiny_bert}"\nstore = "{store}"\ndata = ["beir:{folder}"]\n'
            "limit = 3\nflush_rows = 4\nprogress = false\njson = true\n\n[train]\nepochs = 2\n"
        )
    config = tmp_path / f"ddx.{kind}"
    config.write_text(text)
    from_file = CliRunner().invoke(cli, ["precompute-teacher", "--config", str(config)])
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.stdout)["encoded"] == 3  # limit from the file
    assert TeacherStore.open(store).segments[0].chunk_rows == 4

    flagged = CliRunner().invoke(cli, ["precompute-teacher", "--config", str(config), "--limit", "5"])
    assert flagged.exit_code == 0, flagged.output
    summary = json.loads(flagged.stdout)
    assert (summary["already_stored"], summary["encoded"]) == (3, 5)  # the flag overrode the file


def test_unknown_config_key_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "ddx.yaml"
    config.write_text("teacher: m\nstore: s\ndata: [beir:x]\nbogus: 1\nflush_rowz: 3\n")
    result = CliRunner().invoke(cli, ["precompute-teacher", "--config", str(config)])
    assert result.exit_code == 2
    assert f"{config}: unknown option(s) ['bogus', 'flush_rowz'] for 'ddx precompute-teacher'" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [("teacher: [unclosed\n", r"is not valid \.yaml"), ("- a\n- b\n", r"must hold a mapping of option names")],
)
def test_bad_config_files(content: str, message: str, tmp_path: Path) -> None:
    config = tmp_path / "ddx.yaml"
    config.write_text(content)
    result = CliRunner().invoke(cli, ["precompute-teacher", "--config", str(config)])
    assert result.exit_code == 2 and re.search(message, result.stderr), result.stderr
    missing = CliRunner().invoke(cli, ["precompute-teacher", "--config", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "cannot read config file" in missing.stderr


# -- library errors ------------------------------------------------------------------------------------------------


def test_library_errors_are_one_clean_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["cache", "info", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: No teacher store at ")
    proc = subprocess.run([DDX, "cache", "ls", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"Error: No teacher store at '{tmp_path / 'nope'}' (zarr.json missing). "
        f"Run 'ddx precompute-teacher --store {tmp_path / 'nope'} ...' first."
    ]
    (tmp_path / "file").write_text("x")
    as_file = CliRunner().invoke(cli, ["cache", "verify", str(tmp_path / "file")])
    assert as_file.exit_code == 1 and "is a file, not a teacher store directory" in as_file.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--infonce-space", "projected+hybird"], "InfoNCE space 'projected+hybird' is not valid: use one of"),
        (["--bf16", "--fp16"], "Choose one of --bf16 and --fp16."),
    ],
    ids=["infonce-space", "bf16-and-fp16"],
)
def test_bad_train_options_are_one_clean_line(args: list[str], message: str, tmp_path: Path) -> None:
    """Options the config rejects stop before anything is read or written, with one line and no traceback."""
    base = ["train", "--phase", "2", "--store", str(tmp_path / "store"), "--data", "beir:x", "--student", "m"]
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"Error: {message}")
    assert not (tmp_path / "run").exists()


def test_bad_precompute_option_is_one_clean_line(tmp_path: Path) -> None:
    base = ["precompute-teacher", "--store", str(tmp_path / "s"), "--data", "beir:x", "--teacher", "m"]
    result = CliRunner().invoke(cli, [*base, "--limit", "-1"])
    assert result.exit_code == 1 and result.stderr == "Error: --limit must be >= 0, got -1.\n"
    result = CliRunner().invoke(cli, [*base, "--rank", "3", "--world-size", "2"])
    assert result.exit_code == 1 and result.stderr == "Error: Rank 3 is outside world size 2.\n"
    assert not (tmp_path / "s").exists()


def test_version_is_the_package_metadata_version() -> None:
    """``ddx --version`` reads the installed distribution's version, which is pyproject.toml's (one source)."""
    version = importlib.metadata.version("ddx")
    assert CliRunner().invoke(cli, ["--version"]).stdout.strip() == f"ddx, version {version}"
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert version == pyproject["project"]["version"], "stale install: rerun 'pip install -e .'"


def test_unknown_command() -> None:
    unknown = CliRunner().invoke(cli, ["precompute"])
    assert unknown.exit_code == 2 and "No such command 'precompute'" in unknown.stderr
