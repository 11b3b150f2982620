"""The dataset TOML's schema: which keys go in which table, their types, and the checks that
turn a wrong key or value into a message naming the file, the table and the key (with the
closest valid key). library/data/dataset_config.py builds the resolved config on top of it."""
from __future__ import annotations

import difflib
import json
from typing import Any, Mapping

from library.errors import UserError

# Keys we implement, with their TOML type, by where they may appear (as in kohya's schema).
DATASET_KEYS = {  # [general] and [[datasets]]
    "resolution": "resolution",
    "batch_size": "int",
    "enable_bucket": "bool",
    "min_bucket_reso": "int",
    "max_bucket_reso": "int",
    "bucket_reso_steps": "int",
    "bucket_no_upscale": "bool",
}
SUBSET_KEYS = {  # [general], [[datasets]] and [[datasets.subsets]]
    "num_repeats": "int",
    "caption_extension": "str",
    "class_tokens": "str",
    "shuffle_caption": "bool",
    "keep_tokens": "int",
    "caption_dropout_rate": "float",
    "flip_aug": "bool",
    "encoder": "str",
}
SUBSET_ONLY_KEYS = {  # [[datasets.subsets]] only
    "image_dir": "str",
    "is_reg": "bool",
    "cache_dir": "str",  # subset only: a shared cache folder would mix up equal file names
}

# kohya keys accepted with a warning, by the same placement rules.
KOHYA_UNSUPPORTED_DATASET_KEYS = ("network_multiplier", "validation_seed", "validation_split")
KOHYA_UNSUPPORTED_SUBSET_KEYS = (
    "color_aug", "face_crop_aug_range", "random_crop", "keep_tokens_separator", "secondary_separator",
    "caption_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step", "caption_prefix",
    "caption_suffix", "custom_attributes", "resize_interpolation", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "cache_info",
)
KOHYA_UNSUPPORTED_SUBSET_ONLY_KEYS = ("alpha_mask", "metadata_file", "conditioning_data_dir")

GENERAL_ALLOWED = {*DATASET_KEYS, *SUBSET_KEYS, *KOHYA_UNSUPPORTED_DATASET_KEYS, *KOHYA_UNSUPPORTED_SUBSET_KEYS}
DATASET_ALLOWED = GENERAL_ALLOWED | {"subsets"}
SUBSET_ALLOWED = {*SUBSET_KEYS, *SUBSET_ONLY_KEYS, *KOHYA_UNSUPPORTED_SUBSET_KEYS, *KOHYA_UNSUPPORTED_SUBSET_ONLY_KEYS}
UNSUPPORTED = {*KOHYA_UNSUPPORTED_DATASET_KEYS, *KOHYA_UNSUPPORTED_SUBSET_KEYS, *KOHYA_UNSUPPORTED_SUBSET_ONLY_KEYS}
TYPE_NAMES = {"int": "an integer", "bool": "true or false", "float": "a number", "str": "a string",
               "resolution": "an integer or [width, height]"}


def parse_resolution(value: Any) -> tuple[int, int]:
    """512, "512", "512,768", "512x768", [512, 768] -> (width, height). ValueError otherwise."""
    if isinstance(value, str):
        parts = value.replace("x", ",").split(",")
        try:
            value = [int(p) for p in parts] if len(parts) > 1 else int(parts[0])
        except ValueError:
            raise ValueError(f"resolution {value!r} is not W or W,H") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (value[0], value[1])
    raise ValueError(f"resolution must be an integer or [width, height], got {value!r}")


GENERAL = "[general]"


def dataset_name(i: int) -> str:
    return f"[[datasets]] #{i + 1}"


def subset_name(i: int, j: int) -> str:
    return f"{dataset_name(i)} > [[datasets.subsets]] #{j + 1}"


class Problems:
    """Collects every problem so one run reports them all, each naming file, table and key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: list[str] = []
        self.unsupported: dict[str, list[str]] = {}

    def add(self, table: str, message: str) -> None:
        self.messages.append(f"{self.source}: {table}: {message}")

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise UserError(self.messages[0])
        if self.messages:
            raise UserError(f"{len(self.messages)} problems in the dataset config:\n" + "\n".join(self.messages))


def check_type(kind: str, value: Any) -> tuple[bool, Any]:
    """(ok, normalized value)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1
    if kind == "int":
        return is_int, value
    if kind == "float":
        ok = is_int or isinstance(value, float)
        return ok, float(value) if ok else value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    if isinstance(value, str):  # kohya's schema takes numbers only; "512" is a typo here
        return False, value
    try:
        return True, parse_resolution(value)
    except ValueError:
        return False, value


def describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {json.dumps(value, default=str)}"


def check_table(table: Mapping[str, Any], name: str, level: str, problems: Problems) -> dict[str, Any]:
    """Validate one table's keys and types; return its implemented keys with normalized values."""
    allowed = {"general": GENERAL_ALLOWED, "dataset": DATASET_ALLOWED, "subset": SUBSET_ALLOWED}[level]
    types = {**DATASET_KEYS, **SUBSET_KEYS, **SUBSET_ONLY_KEYS}
    checked: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            problems.add(name, misplaced_or_unknown(key, allowed))
        elif key in UNSUPPORTED:
            problems.unsupported.setdefault(key, []).append(name)
        elif key == "subsets":
            continue
        else:
            ok, normalized = check_type(types[key], value)
            if ok:
                checked[key] = normalized
            else:
                problems.add(name, f"'{key}' must be {TYPE_NAMES[types[key]]}, got {describe(value)}")
    return checked


def misplaced_or_unknown(key: str, allowed: set[str]) -> str:
    if key in DATASET_KEYS or key in KOHYA_UNSUPPORTED_DATASET_KEYS:
        return f"'{key}' is a dataset setting: move it to the [[datasets]] table or to [general]"
    if key == "cache_dir":
        return ("'cache_dir' belongs in a [[datasets.subsets]] table: one per subset, as caches of images "
                "with equal file names would collide")
    if key in SUBSET_ONLY_KEYS or key in KOHYA_UNSUPPORTED_SUBSET_ONLY_KEYS:
        return f"'{key}' belongs in a [[datasets.subsets]] table"
    if key == "subsets":
        return "'subsets' belongs under a [[datasets]] table ([[datasets.subsets]])"
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    valid = ", ".join(sorted(allowed - UNSUPPORTED))
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {valid}"
    return f"unknown key '{key}'{hint}"


def array_of_tables(value: Any, key: str, where: str, problems: Problems) -> list[dict[str, Any]]:
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return value
    problems.add(where, f"'{key}' must be an array of tables ([[{key}]] headers), got {describe(value)}")
    return []
