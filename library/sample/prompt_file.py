"""Prompt files, shared by training samples (`--sample_prompts`) and `gen_pfg.py --from_file`, in
kohya's three forms:

- `.txt` (any other suffix too): one prompt per line, kohya's line syntax; empty and `#` lines skipped:

      illustration of * --n lowres, bad anatomy --w 512 --h 768 --d 42 --s 28 --l 7 --i guide.png:0.8 --ps 1.0

  --n negative prompt, --w/--h size, --d seed, --s steps, --l CFG scale, --ss sampler (kohya's
  names such as k_euler_a work; --sampler too); ours: --i guide image (repeatable, path:weight),
  --ni negative guide image (repeatable), --ps PFG scale. Option names ignore case, as in kohya.
- `.toml`: a `[prompt]` table of defaults and one `[[prompt.subset]]` table per prompt.
- `.json`: a list of prompt tables, or of strings in the line syntax.

The tables use kohya's keys (prompt, negative_prompt, width, height, scale, sample_steps, seed,
sample_sampler) and ours (guides, negative_guides: a path[:weight] or a list of them; pfg_scale).
kohya's options for other model families are errors that say why; steps above 1000 are clamped
to 1000 with a warning, as kohya's line parser clamps them.
"""
from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import toml

from library.errors import Notice, UserError
from library.sample.sampler import Guide, SampleRequest, canonical_sampler

_OPTION = re.compile(r"\s--(\w+)\s")
MAX_STEPS = 1000  # kohya's line parser: max(1, min(1000, steps))

# kohya's options (line and table spellings) for other model families, and why they do not apply.
NOT_FOR_SD = {
    "g": "--g is the embedded guidance scale of FLUX-style models; Stable Diffusion has none (its CFG scale is --l)",
    "guidance_scale": "guidance_scale is the embedded guidance of FLUX-style models; Stable Diffusion has none (its CFG scale is scale)",
    "ctr": "--ctr (CFG truncation) belongs to kohya's Lumina sampler; PFG's Stable Diffusion samplers do not truncate CFG",
    "cfg_trunc_ratio": "cfg_trunc_ratio belongs to kohya's Lumina sampler; PFG's Stable Diffusion samplers do not truncate CFG",
    "rcfg": "--rcfg (renormalised CFG) belongs to kohya's Lumina sampler; PFG's Stable Diffusion samplers do not renormalise",
    "renorm_cfg": "renorm_cfg belongs to kohya's Lumina sampler; PFG's Stable Diffusion samplers do not renormalise",
    "fs": "--fs (flow shift) applies to flow-matching models (SD3, FLUX); Stable Diffusion's schedulers have no shift",
    "flow_shift": "flow_shift applies to flow-matching models (SD3, FLUX); Stable Diffusion's schedulers have no shift",
    "cn": "--cn (a ControlNet image) is not supported: PFG guides with images through --i",
    "controlnet_image": "controlnet_image is not supported: PFG guides with images through guides",
}
LINE_OPTIONS = "--n --w --h --d --s --l --ss --sampler --i --ni --ps"
# table key -> (SampleRequest field, type)
TABLE_KEYS = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "width": ("width", int),
    "height": ("height", int), "scale": ("scale", float), "sample_steps": ("steps", int), "seed": ("seed", int),
    "sample_sampler": ("sampler", str), "pfg_scale": ("pfg_scale", float),
    "guides": ("guides", list), "negative_guides": ("negative_guides", list),
}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a path or a list of paths"}


def _steps(value: int, where: str) -> int:
    if value > MAX_STEPS:
        warnings.warn(f"{where}{value} steps are clamped to {MAX_STEPS}, as kohya does", Notice, stacklevel=3)
        return MAX_STEPS
    return value


def parse_prompt_line(line: str, defaults: SampleRequest, where: str = "") -> SampleRequest:
    parts = _OPTION.split(f" {line.strip()} ")
    prompt = parts[0].strip()
    changes: dict = {"prompt": prompt}
    guides: list[Guide] = []
    negative_guides: list[Guide] = []
    for name, value in zip(parts[1::2], parts[2::2]):
        name, value = name.lower(), value.strip()
        try:
            if name == "n":
                changes["negative_prompt"] = value
            elif name == "w":
                changes["width"] = int(value)
            elif name == "h":
                changes["height"] = int(value)
            elif name == "d":
                changes["seed"] = int(value)
            elif name == "s":
                changes["steps"] = _steps(int(value), where)
            elif name == "l":
                changes["scale"] = float(value)
            elif name == "ps":
                changes["pfg_scale"] = float(value)
            elif name == "i":
                guides.append(Guide.parse(value))
            elif name == "ni":
                negative_guides.append(Guide.parse(value))
            elif name in ("sampler", "ss"):
                changes["sampler"] = canonical_sampler(value)
            elif name in NOT_FOR_SD:
                raise UserError(f"{where}{NOT_FOR_SD[name]}")
            else:
                raise UserError(f"{where}unknown option --{name} (known: {LINE_OPTIONS})")
        except ValueError:
            raise UserError(f"{where}option --{name} needs a number, got {value!r}") from None
    if guides:
        changes["guides"] = tuple(guides)
    if negative_guides:
        changes["negative_guides"] = tuple(negative_guides)
    request = replace(defaults, **changes)
    request.validate(where.rstrip(": "))
    return request


def parse_prompt_table(table: Any, defaults: SampleRequest, where: str) -> SampleRequest:
    """One prompt of a TOML or JSON file: kohya's keys, plus guides, negative_guides, pfg_scale."""
    if isinstance(table, str):
        return parse_prompt_line(table, defaults, where)
    if not isinstance(table, dict):
        raise UserError(f"{where}a prompt must be a table of kohya's keys or a prompt line, got {json.dumps(table)}")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key in NOT_FOR_SD:
            raise UserError(f"{where}{NOT_FOR_SD[key]}")
        if key == "enum":  # kohya numbers its prompts under this key; the order is ours too
            continue
        if key not in TABLE_KEYS:
            close = difflib.get_close_matches(key, list(TABLE_KEYS), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(TABLE_KEYS)})"
            raise UserError(f"{where}unknown key '{key}'{hint}")
        field, kind = TABLE_KEYS[key]
        changes[field] = _typed(key, value, kind, where)
    if "steps" in changes:
        changes["steps"] = _steps(changes["steps"], where)
    if "sampler" in changes:
        changes["sampler"] = canonical_sampler(changes["sampler"])
    for field in ("guides", "negative_guides"):
        if field in changes:
            changes[field] = tuple(Guide.parse(text) for text in changes[field])
    request = replace(defaults, **changes)
    request.validate(where.rstrip(": "))
    return request


def _typed(key: str, value: Any, kind: type, where: str) -> Any:
    if kind is list:
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            return values
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise UserError(f"{where}'{key}' must be {TYPE_NAMES[kind]}, got {json.dumps(value)}")


def read_prompt_file(path: str | Path, defaults: SampleRequest) -> list[SampleRequest]:
    """Every prompt of a file (form by suffix); guide paths are resolved relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8 text; re-save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        requests = _toml_prompts(text, path, defaults)
    elif suffix == ".json":
        requests = _json_prompts(text, path, defaults)
    else:
        requests = _line_prompts(text, path, defaults)
    if not requests:
        raise UserError(f"{path}: no prompts" + (" (only empty or # lines)" if suffix not in (".toml", ".json") else ""))
    return [replace(r, guides=tuple(_relative_to(g, path.parent) for g in r.guides),
                    negative_guides=tuple(_relative_to(g, path.parent) for g in r.negative_guides)) for r in requests]


def _line_prompts(text: str, path: Path, defaults: SampleRequest) -> list[SampleRequest]:
    return [parse_prompt_line(line, defaults, f"{path}:{number}: ")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")]


def _toml_prompts(text: str, path: Path, defaults: SampleRequest) -> list[SampleRequest]:
    """kohya's form: `[prompt]` holds the defaults, each `[[prompt.subset]]` one prompt (its keys win)."""
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: TOML syntax error: {e.msg}") from None
    prompt = data.get("prompt")
    others = [key for key in data if key != "prompt"]
    if not isinstance(prompt, dict) or others:
        raise UserError(f"{path}: a TOML prompt file holds one [prompt] table of defaults and [[prompt.subset]] "
                        f"tables, one per prompt" + (f"; found {', '.join(others)}" if others else ""))
    subsets = prompt.get("subset", [])
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise UserError(f"{path}: [prompt]: 'subset' must be [[prompt.subset]] tables")
    shared = {k: v for k, v in prompt.items() if k != "subset"}
    base = parse_prompt_table(shared, defaults, f"{path}: [prompt]: ") if shared else defaults
    return [parse_prompt_table(subset, base, f"{path}: [[prompt.subset]] #{i}: ") for i, subset in enumerate(subsets, start=1)]


def _json_prompts(text: str, path: Path, defaults: SampleRequest) -> list[SampleRequest]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: JSON syntax error: {e.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: a JSON prompt file is a list of prompts (tables or prompt lines), got {type(data).__name__}")
    return [parse_prompt_table(entry, defaults, f"{path}: entry #{i}: ") for i, entry in enumerate(data, start=1)]


def _relative_to(guide: Guide, folder: Path) -> Guide:
    candidate = Path(guide.path)
    if not candidate.is_absolute() and not candidate.exists() and (folder / candidate).exists():
        return Guide(str(folder / candidate), guide.weight)
    return guide
