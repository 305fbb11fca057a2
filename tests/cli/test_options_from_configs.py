"""One default per knob: every option that sets a config field has the field's default, choices, range and help.

The options are built from the fields (cli.options.field_option); these tests fail when an option is written by
hand again (its default, choices or help drifting from the dataclass), or when a command stops passing a field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
from click.core import UNSET
from click.testing import CliRunner

from cli.demo import DemoConfig
from cli.main import cli
from cli.options import ConfigCommand, config_field, field_choices, field_default
from distill.evaluate.config import EvalConfig
from distill.route.fit import RouterConfig
from distill.route.routed_model import RouterExportConfig
from distill.train.config import MSE_REDUCTION, TrainConfig
from precompute.config import RayConfig
from precompute.pipeline import PrecomputeConfig
from precompute.teacher import TeacherConfig

# command path -> the configs its options set (precompute-teacher: the teacher's options are TeacherConfig's, the
# --ray-* options RayConfig's)
CONFIGS: dict[tuple[str, ...], tuple[type, ...]] = {
    ("precompute-teacher",): (PrecomputeConfig, TeacherConfig, RayConfig),
    ("train",): (TrainConfig,),
    ("evaluate",): (EvalConfig,),
    ("router", "fit"): (RouterConfig,),
    ("router", "export"): (RouterExportConfig,),
    ("demo",): (DemoConfig,),
}
# Fields a command does not offer as an option (set by the library, or internal knobs of the fit).
NOT_OPTIONS = {
    PrecomputeConfig: {"teacher"},
    RouterConfig: {"temperature", "train_batch_size", "patience"},
    RouterExportConfig: {"router"},  # the command's ROUTER argument
}
# Options that accept more than the field's choices, converting them (``--roles both`` → ("query", "passage")).
ALIASES = {("precompute-teacher", "roles"): ("both",)}
# Fields without a default whose option may be left out: --hard-negatives may stand in for --data (the config checks).
OPTIONAL = {("train", "data"), ("router", "data")}


def _command(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group)
        found = cmd.get_command(click.Context(cmd, info_name=name), name)
        assert found is not None, path
        cmd = found
    return cmd


def _config_commands() -> list[tuple[str, ...]]:
    """Every command built from configs, found by walking the groups (so a new one must be listed in CONFIGS)."""
    out: list[tuple[str, ...]] = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(cmd, ConfigCommand):
            out.append(path)
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=path[-1] if path else "ddx")
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None
                walk(sub, (*path, name))

    walk(cli, ())
    return out


def test_every_config_command_is_checked() -> None:
    assert sorted(_config_commands()) == sorted(CONFIGS)


def _field_options(path: tuple[str, ...]) -> list[tuple[click.Option, type]]:
    cmd = _command(path)
    options = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    pairs = []
    for config in CONFIGS[path]:
        for f in dataclasses.fields(config):
            if f.name in NOT_OPTIONS.get(config, set()):
                continue
            if f.name == "model" and config is TeacherConfig:
                option = options["model"]  # --teacher
            else:
                assert f.name in options, f"'ddx {' '.join(path)}' has no option for {config.__name__}.{f.name}"
                option = options[f.name]
            pairs.append((option, config))
    return pairs


@pytest.mark.parametrize("path", list(CONFIGS), ids=" ".join)
def test_options_have_their_fields_default_choices_and_help(path: tuple[str, ...]) -> None:
    cmd = _command(path)
    ctx = click.Context(cmd, info_name=path[-1])
    for option, config in _field_options(path):
        assert option.name is not None
        field, hint = config_field(config, option.name)
        where = f"ddx {' '.join(path)} {option.opts[0]} ({config.__name__}.{field.name})"
        default = field_default(field)
        assert option.required == (default is dataclasses.MISSING and (path[0], field.name) not in OPTIONAL), where
        if default is not dataclasses.MISSING:  # the value the command passes when the flag is not given
            value = option.process_value(ctx, option.get_default(ctx))
            assert (None if value is UNSET else value) == default, where
        choices = field_choices(field, hint)
        if isinstance(option.type, click.Choice):
            alias = ALIASES.get((path[0], option.name), ())
            assert tuple(option.type.choices) == (*alias, *(choices or ())), where
        else:
            assert choices is None, where
        if isinstance(option.type, click.IntRange | click.FloatRange):
            assert (option.type.min, option.type.max) == (field.metadata.get("min"), field.metadata.get("max")), where
        assert option.help == field.metadata.get("help"), where


def test_bool_fields_are_flags_that_reach_every_state() -> None:
    """A bool field is a flag (``--bf16``); one defaulting to True or None is a ``--x/--no-x`` switch."""
    for path in CONFIGS:
        for option, config in _field_options(path):
            assert option.name is not None
            field, hint = config_field(config, option.name)
            if hint is bool:
                assert option.is_flag and (field.default is False or option.secondary_opts), option.opts


def test_train_defaults_reach_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``ddx train`` with only the required flags builds exactly ``TrainConfig``'s defaults."""
    import distill.train.run as run

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig) -> None:
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(run, "train", fake_train)
    required = {"phase": 1, "store": "s", "data": ("beir:x",), "out": str(tmp_path), "student": "m"}
    args = ["train", "--phase", "1", "--store", "s", "--data", "beir:x", "--out", str(tmp_path), "--student", "m"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert seen == [TrainConfig(**required)]
    assert seen[0].mse_reduction == MSE_REDUCTION == "vector"
