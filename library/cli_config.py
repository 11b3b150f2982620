"""Typed settings from the command line and an optional TOML file.

A script describes its settings once, as a dataclass whose fields carry `help` (and optionally
`choices`, `flags` aliases, a `default_note`) in their metadata. This module turns it into an
argparse parser, lets a `--config_file TRAIN.toml` supply any of the same keys (flat, or grouped
in tables as kohya's config files are), and returns a frozen instance. The command line wins over
the TOML, the TOML over the defaults.

Mistakes are reported the way a kohya user expects, but all at once: every unknown flag gets the
closest valid one ("did you mean"), a kohya flag with no equivalent gets a one-line hint naming
ours (the settings class's `FLAG_HINTS`), and a TOML file's unknown keys and wrong types are
listed together. `--output_config` writes the given settings to the `--config_file` path, as
kohya's scripts do. A settings class may fold kohya's spellings into its own fields with a
`combine_given(values)` classmethod (it sees only the values actually given).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import toml

from library.errors import UserError
from library.fileio import atomic_path

T = TypeVar("T")


def setting(default: Any, help: str, choices: tuple | None = None, flags: tuple[str, ...] = (),
            default_note: str | None = None, **kw) -> Any:
    """A dataclass field with its command-line help. `flags` adds aliases (e.g. kohya's names);
    `default_note` replaces the "(default: ...)" text where the plain value would mislead."""
    metadata = {"help": help, "choices": choices, "flags": flags, "default_note": default_note}
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the description (the usage examples); option help is wrapped."""


def _default_text(field: dataclasses.Field) -> str:
    """" (default: X)" for a value worth stating; nothing for empty, unset and off values."""
    note = field.metadata.get("default_note")
    if note is not None:
        return f" (default: {note})" if note else ""
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if default in ("", None, [], False):
        return ""
    return f" (default: {'on' if default is True else default})"


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config_file", type=str, default=None, help="TOML file holding any of these options")
    parser.add_argument("--output_config", action="store_true", default=False,
                        help="write the options given here to the --config_file path (.toml added) and exit, as kohya does")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        kind, is_list = _base_type(hints[f.name])
        names = [f"--{f.name}", *f.metadata.get("flags", ())]
        help_text = f"{f.metadata.get('help', '')}{_default_text(f)}".replace("%", "%%")  # argparse %-formats help
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


def _flatten_toml(data: dict) -> list[tuple[str, Any]]:
    """kohya's config files group options in tables; the table names carry no meaning."""
    flat: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            flat += _flatten_toml(value)
        else:
            flat.append((key, value))
    return flat


def _check_value(cls, name: str, value: Any) -> Any:
    """The value converted to the field's type; ValueError (the reason) when it does not fit."""
    kind, is_list = _base_type(_field_types(cls)[name])
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(value, list) and not is_list:
        raise ValueError(f"must be a single {kind.__name__}, got a list")
    values = value if isinstance(value, list) else [value]
    checked = []
    for v in values:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ValueError(f"must be {kind.__name__}, got {type(v).__name__} {v!r}")
        choices = field.metadata.get("choices")
        if choices and v not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}, got {v!r}")
        checked.append(v)
    return checked if is_list else checked[0]


def _names(cls) -> dict[str, str]:
    """Every spelling a key may have (field names and flag aliases, without dashes) -> field."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        for flag in f.metadata.get("flags", ()):
            names[flag.lstrip("-")] = f.name
    return names


def _flag_hints(cls) -> dict[str, str]:
    return getattr(cls, "FLAG_HINTS", {})


def _did_you_mean(name: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def read_toml_settings(cls, path: str | Path) -> dict[str, Any]:
    """The file's values by field name. Every unknown key and wrong value is reported together."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = toml.load(path)
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}: TOML syntax error: {e}") from None
    names, hints = _names(cls), _flag_hints(cls)
    settings: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in _flatten_toml(data):
        if key in hints:
            problems.append(f"key '{key}': {hints[key]}")
        elif key not in names:
            problems.append(f"unknown key '{key}'{_did_you_mean(key, sorted(names))}")
        else:
            try:
                settings[names[key]] = _check_value(cls, names[key], value)
            except ValueError as e:
                problems.append(f"key '{key}' {e}")
    if len(problems) == 1:
        raise UserError(f"{path}: {problems[0]}")
    if problems:
        raise UserError(f"{len(problems)} problems in {path}:\n" + "\n".join(f"  {path}: {p}" for p in problems))
    return settings


def _unknown_arguments(cls, parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """One line per unrecognised flag: kohya's hint for it, or the closest valid flag."""
    options = sorted(s for action in parser._actions for s in action.option_strings if s.startswith("--"))
    hints = _flag_hints(cls)
    lines = []
    for token in extras:
        if not token.startswith("-"):
            if not lines:  # a stray value, not the value of an unknown flag reported above
                lines.append(f"unrecognized argument {token!r}")
            continue
        flag = token.split("=", 1)[0]
        name = flag.lstrip("-")
        if name in hints:
            lines.append(f"{flag}: {hints[name]}")
        else:
            lines.append(f"unrecognized argument {flag}{_did_you_mean(flag, options)}")
    return "\n".join(lines)


def _write_output_config(cls, values: dict[str, Any], config_file: str | None) -> None:
    """kohya's --output_config: the given options as TOML at the --config_file path (never over a file)."""
    if not config_file:
        raise UserError("--output_config needs --config_file: the TOML file to write")
    path = Path(config_file if config_file.endswith(".toml") else config_file + ".toml")
    if path.exists():
        raise UserError(f"--output_config: {path} already exists; choose a new --config_file path")
    data = {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}
    with atomic_path(path) as tmp:
        tmp.write_text(toml.dumps(data), encoding="utf-8")
    print(f"wrote {path}: {len(data)} settings; run again with --config_file {path}")
    sys.exit(0)


def parse_settings(cls: type[T], argv: list[str] | None, description: str) -> tuple[T, str | None]:
    """Command line (+ optional TOML) -> a frozen settings object, and the TOML path if any."""
    parser = build_parser(cls, description)
    namespace, extras = parser.parse_known_args(argv)
    if extras:
        message = _unknown_arguments(cls, parser, extras)
        count = message.count("\n") + 1
        raise UserError(message if count == 1 else f"{count} problems with the command line:\n{message}")
    args = vars(namespace)
    config_file = args.pop("config_file")
    output_config = args.pop("output_config")
    if output_config:
        _write_output_config(cls, args, config_file)
    values = read_toml_settings(cls, config_file) if config_file else {}
    values.update(args)
    combine = getattr(cls, "combine_given", None)
    if combine is not None:
        values = combine(values)
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
