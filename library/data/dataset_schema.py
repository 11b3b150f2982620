"""The dataset TOML's schema: which keys go in which table, their types (kohya's schema), and the
checks that turn a wrong key or value into a message naming the file, the table and the key (with
the closest valid key). library/data/dataset_config.py builds the resolved config on top of it."""
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
    "validation_split": "float",
    "validation_seed": "int",
}
SUBSET_KEYS = {  # [general], [[datasets]] and [[datasets.subsets]]
    "num_repeats": "int",
    "caption_extension": "str",
    "class_tokens": "str",
    "shuffle_caption": "bool",
    "keep_tokens": "int",
    "keep_tokens_separator": "str",
    "caption_separator": "str",
    "secondary_separator": "str",
    "caption_prefix": "str",
    "caption_suffix": "str",
    "enable_wildcard": "bool",
    "caption_dropout_rate": "number",
    "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "number",
    "token_warmup_min": "int",
    "token_warmup_step": "number",
    "flip_aug": "bool",
    "color_aug": "bool",
    "random_crop": "bool",
    "resize_interpolation": "str",
    "encoder": "str",
}
SUBSET_ONLY_KEYS = {  # [[datasets.subsets]] only
    "image_dir": "str",
    "metadata_file": "str",
    "is_reg": "bool",
    "alpha_mask": "bool",
    "cache_dir": "str",  # subset only: a shared cache folder would mix up equal file names
}

# kohya keys that do not apply to PFG: accepted (type-checked) with a warning saying why.
NOT_APPLICABLE_DATASET_KEYS = {
    "network_multiplier": ("float", "it scales a kohya network module per dataset; PFG's LoRA trains at "
                                    "multiplier 1 (set the strength when generating: gen_pfg.py --network_mul)"),
}
NOT_APPLICABLE_SUBSET_KEYS = {
    "face_crop_aug_range": ("pair", "kohya's face crop reads face positions from the file names, which PFG's bucketing "
                                    "does not; random_crop works"),
    "custom_attributes": ("table", "only custom kohya network modules read it; PFG has none"),
    "cache_info": ("bool", "PFG scripts read image sizes from the file headers and captions from their files on every "
                           "run, so there is nothing to cache"),
}
NOT_APPLICABLE_SUBSET_ONLY_KEYS = {
    "conditioning_data_dir": ("str", "it holds ControlNet conditioning (or mask) images; PFG conditions on the encoder's "
                                     "image vectors, and masked loss reads the images' alpha channel (alpha_mask)"),
}
NOT_APPLICABLE = {**NOT_APPLICABLE_DATASET_KEYS, **NOT_APPLICABLE_SUBSET_KEYS, **NOT_APPLICABLE_SUBSET_ONLY_KEYS}

GENERAL_ALLOWED = {*DATASET_KEYS, *SUBSET_KEYS, *NOT_APPLICABLE_DATASET_KEYS, *NOT_APPLICABLE_SUBSET_KEYS}
DATASET_ALLOWED = GENERAL_ALLOWED | {"subsets"}
SUBSET_ALLOWED = {*SUBSET_KEYS, *SUBSET_ONLY_KEYS, *NOT_APPLICABLE_SUBSET_KEYS, *NOT_APPLICABLE_SUBSET_ONLY_KEYS}
TYPES = {**DATASET_KEYS, **SUBSET_KEYS, **SUBSET_ONLY_KEYS, **{k: kind for k, (kind, _) in NOT_APPLICABLE.items()}}
TYPE_NAMES = {"int": "an integer", "bool": "true or false", "number": "a number", "str": "a string",
              "float": "a number with a decimal point (kohya's schema takes a float here, e.g. 1.0)",
              "resolution": "an integer or [width, height]", "pair": "two numbers with a decimal point, e.g. [2.0, 4.0]",
              "table": "a table"}
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")  # kohya's names


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
    """Collects every problem so one run reports them all, each naming file, table and key; and
    the warnings: keys that do not apply (by key, with their tables) and adjusted values."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: list[str] = []
        self.not_applicable: dict[str, list[str]] = {}
        self.adjusted: list[str] = []

    def add(self, table: str, message: str) -> None:
        self.messages.append(f"{self.source}: {table}: {message}")

    def adjust(self, table: str, message: str) -> None:
        self.adjusted.append(f"{self.source}: {table}: {message}")

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise UserError(self.messages[0])
        if self.messages:
            raise UserError(f"{len(self.messages)} problems in the dataset config:\n" + "\n".join(self.messages))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def check_type(kind: str, value: Any) -> tuple[bool, Any]:
    """(ok, normalized value), by kohya's schema: `float` keys take only floats, `number` keys both."""
    if kind == "int":
        return _is_int(value), value
    if kind == "number":
        ok = _is_int(value) or isinstance(value, float)
        return ok, float(value) if ok else value
    if kind == "float":
        return isinstance(value, float), value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    if kind == "pair":
        ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value)
        return ok, tuple(value) if ok else value
    if kind == "table":
        return isinstance(value, dict), value
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
    checked: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            problems.add(name, misplaced_or_unknown(key, allowed))
            continue
        if key == "subsets":
            continue
        ok, normalized = check_type(TYPES[key], value)
        if not ok:
            problems.add(name, f"'{key}' must be {TYPE_NAMES[TYPES[key]]}, got {describe(value)}")
        elif key in NOT_APPLICABLE:
            problems.not_applicable.setdefault(key, []).append(name)
        else:
            checked[key] = normalized
    return checked


def misplaced_or_unknown(key: str, allowed: set[str]) -> str:
    if key in DATASET_KEYS or key in NOT_APPLICABLE_DATASET_KEYS:
        return f"'{key}' is a dataset setting: move it to the [[datasets]] table or to [general]"
    if key == "cache_dir":
        return ("'cache_dir' belongs in a [[datasets.subsets]] table: one per subset, as caches of images "
                "with equal file names would collide")
    if key in SUBSET_ONLY_KEYS or key in NOT_APPLICABLE_SUBSET_ONLY_KEYS:
        return f"'{key}' belongs in a [[datasets.subsets]] table"
    if key == "subsets":
        return "'subsets' belongs under a [[datasets]] table ([[datasets.subsets]])"
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    valid = ", ".join(sorted(allowed - set(NOT_APPLICABLE)))
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {valid}"
    return f"unknown key '{key}'{hint}"


def array_of_tables(value: Any, key: str, where: str, problems: Problems) -> list[dict[str, Any]]:
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return value
    problems.add(where, f"'{key}' must be an array of tables ([[{key}]] headers), got {describe(value)}")
    return []
