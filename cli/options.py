"""Shared CLI plumbing: config files (YAML/TOML) under flags, JSON output, and clean errors.

A config file gives defaults; flags given on the command line override it (click's ``default_map``).
Keys are option names with ``-`` or ``_``; a section named after the command (``train:``) is used
when present, so one file can configure every command of an experiment.
"""

from __future__ import annotations

import errno
import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

__all__ = ["config_option", "echo_json", "library_errors", "load_config_file", "one_line", "os_error_line"]

F = TypeVar("F", bound=Callable[..., Any])


def load_config_file(path: str | Path, command: str) -> dict[str, Any]:
    """Options for ``command`` from a YAML or TOML file, keys normalised to click's parameter names.

    Raises:
        click.BadParameter: the file is missing, unparsable, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.BadParameter(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:
        raise click.BadParameter(f"config file {path} is not valid {path.suffix or 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"config file {path} must hold a mapping of option names to values.")
    section = data.get(command, data)
    if not isinstance(section, dict):
        raise click.BadParameter(f"section {command!r} of {path} must be a mapping.")
    return {str(k).replace("-", "_"): v for k, v in section.items() if not isinstance(v, dict) or k == "columns"}


def _apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    values = load_config_file(value, ctx.info_name or "")
    names = _config_names(ctx.command)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise click.BadParameter(f"{value}: unknown option(s) {unknown} for 'ddx {ctx.info_name}'.", param=param)
    ctx.default_map = {**(ctx.default_map or {}), **{names[k]: v for k, v in values.items()}}
    return value


def _config_names(command: click.Command) -> dict[str, str]:
    """Config key -> parameter name: each long option's name (``teacher`` for ``--teacher``) and the parameter's own."""
    names: dict[str, str] = {}
    for p in command.params:
        if p.name is None:
            continue
        names[p.name] = p.name
        names.update({o[2:].replace("-", "_"): p.name for o in getattr(p, "opts", []) if o.startswith("--")})
    return names


def config_option(func: F) -> F:
    """``--config FILE``: YAML/TOML defaults for every other option (flags still win)."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_apply_config,
        help="YAML or TOML file of option values; flags given here override it.",
    )(func)


def echo_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (the machine-readable channel; progress goes to stderr)."""
    click.echo(json.dumps(data, indent=2, default=str))


def library_errors(func: F) -> F:
    """Turn ddx's own errors and OS errors (missing file, disk full, read-only) into one clean line, exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from storage.errors import DdxError

        try:
            return func(*args, **kwargs)
        except DdxError as exc:
            raise click.ClickException(one_line(str(exc))) from exc
        except OSError as exc:
            raise click.ClickException(os_error_line(exc)) from exc
        except KeyboardInterrupt:
            click.echo("Interrupted. Rerun the same command to resume; finished work is kept.", err=True)
            sys.exit(130)

    return cast(F, wrapper)


_OS_HINTS = {
    errno.ENOSPC: "Free space and rerun the same command; finished work is kept.",
    errno.EROFS: "The file system is mounted read-only; run this where the path is writable.",
    errno.EACCES: "Check the owner and permissions of that path (or run as a user who may write it).",
    errno.EPERM: "Check the owner and permissions of that path (or run as a user who may write it).",
}
_WRAPPED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?:\w+Error|\w+Exception): ")


def os_error_line(exc: OSError) -> str:
    """``<strerror>: <path>. <what to do>`` for an OS error, on one line."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    hint = _OS_HINTS.get(exc.errno or 0, "")
    return one_line(f"{what}{where}. {hint}".strip())


def one_line(message: str) -> str:
    """The message as one line. An error re-raised from a DataLoader worker carries the worker's traceback
    ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last line is the message."""
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = _WRAPPED.sub("", last.strip())
    return " ".join(part.strip() for part in message.splitlines() if part.strip())
