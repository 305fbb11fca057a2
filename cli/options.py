"""Shared CLI plumbing: options derived from the config dataclasses, config files (YAML/TOML) under flags, JSON
output, and clean errors.

Each option that sets a config field is built from that field (:func:`field_options`): its default, its help
(``field(metadata={"help": ...})``), its type and choices (the annotation, a ``Literal``, or ``metadata["choices"]``)
and its range (``metadata["min"]``/``["max"]``), so a default is written once, in the dataclass.

A config file gives defaults; flags given on the command line override it (click's ``default_map``).
Keys are option names with ``-`` or ``_``; a section named after the command (``train:``) is used
when present, so one file can configure every command of an experiment.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import click

__all__ = [
    "CommaList",
    "ConfigCommand",
    "config_field",
    "config_option",
    "echo_json",
    "field_choices",
    "field_default",
    "field_options",
    "library_errors",
    "load_config_file",
    "one_line",
    "os_error_line",
]

F = TypeVar("F", bound=Callable[..., Any])


# -- options from config fields -------------------------------------------------------------------------------------


class ConfigCommand(click.Command):
    """A command whose :func:`field_options` are built on first use of ``params`` (help, parsing).

    Building them imports the config class, and some (the router's) live in modules that import torch: deferred,
    ``ddx router --help`` lists the subcommands without loading them.
    """

    _params: list[click.Parameter]
    _pending: list[Any]  # click.Parameter, or a function that builds a list of them

    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        for p in self._pending:
            self._params += [p] if isinstance(p, click.Parameter) else p()
        self._pending = []
        return self._params

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._params, self._pending = [], list(value)


def field_options(config: str, *names: str, skip: Sequence[str] = (), **overrides: dict[str, Any]) -> Callable[[F], F]:
    """One click option per field of the dataclass ``config`` (``"module:Class"``), in field order: ``names``
    only when given, else every field but ``skip``. Use it on a :class:`ConfigCommand`.

    Each option's default, help, type, choices and range come from its field (``required`` when it has no default,
    repeatable for a tuple, ``--x`` for a bool defaulting to False, else ``--x/--no-x``); ``overrides[field]`` adds
    what belongs to the command line alone: click.Option's arguments, and ``decls`` for other flag spellings. The
    value reaches the command under the field's name.
    """

    def build() -> list[click.Parameter]:
        module, _, attr = config.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        chosen = names or [f.name for f in dataclasses.fields(cls) if f.name not in skip]
        if set(overrides) - set(chosen):
            raise TypeError(
                f"field_options({config!r}): overrides for no option: {sorted(set(overrides) - set(chosen))}"
            )
        return [_field_option(cls, name, dict(overrides.get(name, {}))) for name in chosen]

    def decorator(f: F) -> F:
        f.__dict__.setdefault("__click_params__", []).append(build)
        return f

    return decorator


def config_field(config: type, name: str) -> tuple[dataclasses.Field[Any], Any]:
    """The dataclass field ``name`` of ``config`` and its annotation, ``X | None`` read as ``X``."""
    found = {f.name: f for f in dataclasses.fields(config)}.get(name)
    if found is None:
        raise TypeError(f"{config.__name__} has no field {name!r}")
    hint = typing.get_type_hints(config)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return found, hint


def field_choices(field: dataclasses.Field[Any], hint: Any) -> tuple[Any, ...] | None:
    """The values a field allows: ``metadata["choices"]``, else its ``Literal``'s (None: any of its type)."""
    if "choices" in field.metadata:
        return tuple(field.metadata["choices"])
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def field_default(field: dataclasses.Field[Any]) -> Any:
    """The field's default (``dataclasses.MISSING`` when it has none)."""
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _field_option(config: type, name: str, attrs: dict[str, Any]) -> click.Option:
    field, hint = config_field(config, name)
    meta, default = field.metadata, field_default(field)
    decls = attrs.pop("decls", ["--" + name.replace("_", "-")])
    kw: dict[str, Any] = {"help": meta.get("help"), "show_default": True, "required": default is dataclasses.MISSING}
    choices = field_choices(field, hint)
    if isinstance(attrs.get("type"), CommaList):  # a tuple field as one value; its default shown as typed
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
    elif typing.get_origin(hint) is tuple:
        kw["multiple"] = True
    elif hint is bool:
        decls = decls if default is False or "/" in decls[0] else [f"{decls[0]}/--no-{decls[0][2:]}"]
        kw["is_flag"] = True
    elif choices is not None:
        kw["type"] = click.Choice(list(choices))
    elif "min" in meta or "max" in meta:
        kw["type"] = (click.FloatRange if hint is float else click.IntRange)(meta.get("min"), meta.get("max"))
    else:
        kw["type"] = hint
    if default is not dataclasses.MISSING and (default is not None or hint is bool):
        kw["default"] = default
    return click.Option([*decls, name], **(kw | attrs))


class CommaList(click.ParamType):
    """``"a,b"`` → ``("a", "b")``; items converted by ``item`` (``"10,100"`` → ``(10, 100)``), empty ones dropped.

    A list (from a config file) is taken as the items.
    """

    name = "text"

    def __init__(self, item: type = str) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        parts = value if isinstance(value, tuple | list) else str(value).split(",")
        try:
            return tuple(self.item(str(part).strip()) for part in parts if str(part).strip())
        except ValueError:
            what = "integers" if self.item is int else f"{self.item.__name__} values"
            self.fail(f"must be comma-separated {what}, got {value!r}.", param, ctx)


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
    if isinstance(values.get("storage_options"), Mapping):  # a mapping in the file, one JSON option on the line
        values["storage_options"] = [json.dumps(values["storage_options"])]
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


def store_access_options(func: F) -> F:
    """``--storage-options``, ``--stale-after`` and ``--remote-cache-dir`` for a command that opens a store.

    They set this process's defaults (``$DDX_STORAGE_OPTIONS``, ``$DDX_STALE_AFTER``, ``$DDX_REMOTE_CACHE_DIR``),
    which every store opened afterwards uses — DataLoader workers and other child processes included — so the
    library calls need no new arguments. A config file may give ``storage_options`` as a mapping.
    """
    func = click.option(
        "--storage-options",
        multiple=True,
        expose_value=False,
        callback=_set_storage_options,
        metavar="JSON|KEY=VALUE",
        help="fsspec options of an s3://, gs://, ... store (endpoint_url, key, secret, client_kwargs.region_name, "
        "...): a JSON object or key=value pairs, repeatable.",
    )(func)
    func = click.option(
        "--remote-cache-dir",
        type=click.Path(file_okay=False),
        expose_value=False,
        callback=_set_env("DDX_REMOTE_CACHE_DIR"),
        help="Local directory keeping whole chunk files of a remote store once read (checked against their CRC32C), "
        "so later gathers read them from disk; bound it with $DDX_REMOTE_CACHE_MAX_GB [default: none].",
    )(func)
    return click.option(
        "--stale-after",
        type=click.FloatRange(min=0, min_open=True),
        expose_value=False,
        callback=_set_env("DDX_STALE_AFTER"),
        help="Seconds of heartbeat silence after which a remote writer is presumed dead and salvaged [default: 60].",
    )(func)


def _set_storage_options(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    from storage.fs import STORAGE_OPTIONS_ENV, parse_storage_options

    if value:
        os.environ[STORAGE_OPTIONS_ENV] = json.dumps(parse_storage_options(list(value)))


def _set_env(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            os.environ[name] = str(value)

    return callback


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
