"""Optimizers by the names kohya users type, plus any class by dotted path.

bitsandbytes provides the 8-bit states (AdamW8bit, Lion8bit); its CPU build runs them too.
"""
from __future__ import annotations

import ast
import importlib
from typing import Any, Iterable

import torch

from library.errors import UserError


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
    """`--optimizer_args weight_decay=0.01 betas=0.9,0.99` -> typed keyword arguments."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--optimizer_args: expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as a mode name
        kwargs[key.strip()] = value
    return kwargs


def optimizer_class(name: str):
    key = name.lower()
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]()
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--optimizer_type {name}: cannot import ({e})") from None
    raise UserError(f"--optimizer_type {name!r} is unknown; choose one of AdamW8bit, AdamW, Lion, Lion8bit, Prodigy, Adafactor or a dotted class path")


def build_optimizer(name: str, param_groups: list[dict], optimizer_args: Iterable[str] = ()) -> torch.optim.Optimizer:
    cls = optimizer_class(name)
    kwargs = parse_optimizer_args(optimizer_args)
    if name.lower() == "adafactor":
        # With explicit learning rates Adafactor must not pick its own.
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
    try:
        return cls(param_groups, **kwargs)
    except TypeError as e:
        raise UserError(f"--optimizer_args for {name}: {e}") from None
