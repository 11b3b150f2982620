"""kohya's prompt-line syntax, shared by training samples and `gen_pfg.py --from_file`:

    illustration of * --n lowres, bad anatomy --w 512 --h 768 --d 42 --s 28 --l 7 --i guide.png:0.8 --ps 1.0

Options: --n negative prompt, --w/--h size, --d seed, --s steps, --l CFG scale, --i guide image
(repeatable, path:weight), --ni negative guide image (repeatable), --ps PFG scale, --sampler name
(kohya's `--ss` too, with its names such as k_euler_a). Option names ignore case, as in kohya.
Lines that are empty or start with `#` are skipped.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from library.errors import UserError
from library.sample.sampler import Guide, SampleRequest, canonical_sampler

_OPTION = re.compile(r"\s--(\w+)\s")


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
                changes["steps"] = int(value)
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
            else:
                raise UserError(f"{where}unknown option --{name} (known: --n --w --h --d --s --l --i --ni --ps --sampler --ss)")
        except ValueError:
            raise UserError(f"{where}option --{name} needs a number, got {value!r}") from None
    if guides:
        changes["guides"] = tuple(guides)
    if negative_guides:
        changes["negative_guides"] = tuple(negative_guides)
    request = replace(defaults, **changes)
    request.validate(where.rstrip(": "))
    return request


def read_prompt_file(path: str | Path, defaults: SampleRequest) -> list[SampleRequest]:
    """Every prompt line of a file; guide paths are resolved relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        request = parse_prompt_line(line, defaults, f"{path}:{number}: ")
        request = replace(
            request,
            guides=tuple(_relative_to(g, path.parent) for g in request.guides),
            negative_guides=tuple(_relative_to(g, path.parent) for g in request.negative_guides),
        )
        requests.append(request)
    if not requests:
        raise UserError(f"{path}: no prompts (only empty or # lines)")
    return requests


def _relative_to(guide: Guide, folder: Path) -> Guide:
    candidate = Path(guide.path)
    if not candidate.is_absolute() and not candidate.exists() and (folder / candidate).exists():
        return Guide(str(folder / candidate), guide.weight)
    return guide
