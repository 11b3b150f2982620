"""Typed settings from the command line and an optional TOML file.

A script describes its settings once, as a dataclass whose fields carry `help` (and optionally
`choices`, `flag` names) in their metadata. This module turns it into an argparse parser, lets a
`--config_file TRAIN.toml` supply any of the same keys (flat, or grouped in tables as kohya's
config files are), and returns a frozen instance. The command line wins over the TOML, the TOML
over the defaults. Unknown TOML keys are errors that suggest the closest valid key.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import toml

from library.errors import UserError

T = TypeVar("T")


def setting(default: Any, help: str, choices: tuple | None = None, flags: tuple[str, ...] = (), **kw) -> Any:
    """A dataclass field with its command-line help. `flags` adds aliases (e.g. `--sdpa`)."""
    metadata = {"help": help, "choices": choices, "flags": flags}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) from `int`, `float | None`, `list[str]` ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config_file", type=str, default=None, help="TOML file holding any of these options")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        kind, is_list = _base_type(hints[f.name])
        names = [f"--{f.name}", *f.metadata.get("flags", ())]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                *names,
                dest=f.name,
                type=kind,
                nargs="*" if is_list else None,
                action="extend" if is_list else "store",
                choices=f.metadata.get("choices"),
                default=argparse.SUPPRESS,
                help=help_text,
            )
    return parser


def _flatten_toml(data: dict, path: Path) -> dict[str, Any]:
    """kohya's config files group options in tables; the table names carry no meaning."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for inner_key, inner_value in _flatten_toml(value, path).items():
                flat[inner_key] = inner_value
        else:
            flat[key] = value
    return flat


def _check_value(cls, name: str, value: Any, source: str) -> Any:
    kind, is_list = _base_type(_field_types(cls)[name])
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(value, list) and not is_list:
        raise UserError(f"{source}: key '{name}' must be a single {kind.__name__}, got a list")
    values = value if isinstance(value, list) else [value]
    checked = []
    for v in values:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise UserError(f"{source}: key '{name}' must be {kind.__name__}, got {type(v).__name__} {v!r}")
        choices = field.metadata.get("choices")
        if choices and v not in choices:
            raise UserError(f"{source}: key '{name}' must be one of {', '.join(map(str, choices))}, got {v!r}")
        checked.append(v)
    return checked if is_list else checked[0]


def read_toml_settings(cls, path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = toml.load(path)
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}") from None
    names = [f.name for f in dataclasses.fields(cls)]
    settings = {}
    for key, value in _flatten_toml(data, path).items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{path}: unknown key '{key}'{hint}")
        settings[key] = _check_value(cls, key, value, str(path))
    return settings


def parse_settings(cls: type[T], argv: list[str] | None, description: str) -> tuple[T, str | None]:
    """Command line (+ optional TOML) -> a frozen settings object, and the TOML path if any."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config_file")
    values = read_toml_settings(cls, config_file) if config_file else {}
    values.update(args)
    try:
        return cls(**values), config_file
    except TypeError as e:
        raise UserError(f"missing required option: {e}") from None


def settings_to_toml(settings: Any) -> str:
    """The resolved settings, loadable again with --config_file."""
    data = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        data[f.name] = str(value) if isinstance(value, Path) else value
    return toml.dumps(data)
