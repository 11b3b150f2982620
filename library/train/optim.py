"""Optimizers by the names kohya users type, plus any class by dotted path.

bitsandbytes provides Lion and the 8-bit states (AdamW8bit, Lion8bit); its CPU build runs them
too. `check_optimizer` resolves the class and its arguments without building anything, so
train_pfg.py reports a wrong name or argument before any model loads.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from typing import Any, Iterable

import torch

from library.errors import UserError

NAMES = ("AdamW8bit", "AdamW", "Lion", "Lion8bit", "Prodigy", "Adafactor")


def _bnb(name: str):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from None
    return getattr(bnb.optim, name)


def _transformers_adafactor():
    from transformers.optimization import Adafactor

    return Adafactor


def _prodigy():
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer_type Prodigy needs the prodigyopt package: pip install prodigyopt") from None
    return Prodigy


OPTIMIZERS = {
    "adamw8bit": lambda: _bnb("AdamW8bit"),
    "adamw": lambda: torch.optim.AdamW,
    "lion": lambda: _bnb("Lion"),
    "lion8bit": lambda: _bnb("Lion8bit"),
    "adafactor": _transformers_adafactor,
    "prodigy": _prodigy,
}


def parse_optimizer_args(pairs: Iterable[str]) -> dict[str, Any]:
    """`--optimizer_args weight_decay=0.01 betas=0.9,0.99` -> typed keyword arguments. Values are
    Python literals; a bare word (a mode name such as `max`) stays a string."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--optimizer_args {pair!r}: expected key=value with a Python name as key, e.g. weight_decay=0.01")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if not raw.isidentifier():
                raise UserError(
                    f"--optimizer_args {pair!r}: cannot read the value {raw!r}; use a Python literal "
                    "(0.01, True, 0.9,0.99, 'text') or a bare word"
                ) from None
            value = raw
        kwargs[key] = value
    return kwargs


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    key = name.lower()
    if key in OPTIMIZERS:
        cls = OPTIMIZERS[key]()
    elif "." in name.strip(".") and all(part.isidentifier() for part in name.split(".")):
        module_name, _, class_name = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--optimizer_type {name}: cannot import module {module_name!r} ({e})") from None
        if not hasattr(module, class_name):
            raise UserError(f"--optimizer_type {name}: module {module_name!r} has no {class_name!r}")
        cls = getattr(module, class_name)
    else:
        close = difflib.get_close_matches(key, [n.lower() for n in NAMES], n=1)
        hint = f" (did you mean {next(n for n in NAMES if n.lower() == close[0])}?)" if close else ""
        raise UserError(f"--optimizer_type {name!r} is unknown{hint}; choose one of {', '.join(NAMES)} or a dotted class path such as torch.optim.SGD")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"--optimizer_type {name}: {cls!r} is not a torch.optim.Optimizer class")
    return cls


def _defaults(name: str) -> dict[str, Any]:
    if name.lower() == "adafactor":
        # With explicit learning rates Adafactor must not pick its own.
        return {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    return {}


def check_optimizer(name: str, optimizer_args: Iterable[str] = ()) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class and its keyword arguments, with every name checked against the class."""
    cls = optimizer_class(name)
    kwargs = parse_optimizer_args(optimizer_args)
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # a class without a readable signature: let it judge its arguments
        return cls, {**_defaults(name), **kwargs}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = [p for p in parameters if p not in ("self", "params")]
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"--optimizer_args: {cls.__name__} has no argument {key!r}{hint}; it takes {', '.join(accepted)}")
    return cls, {**_defaults(name), **kwargs}


def build_optimizer(name: str, param_groups: list[dict], optimizer_args: Iterable[str] = ()) -> torch.optim.Optimizer:
    cls, kwargs = check_optimizer(name, optimizer_args)
    try:
        return cls(param_groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--optimizer_type {name} with --optimizer_args {' '.join(optimizer_args) or '(none)'}: {e}") from None
