"""Captions: which text goes with an image, and what becomes of it at each training step — kohya's
`process_caption`, key by key: prefix/suffix, caption dropout (by rate and every n epochs),
wildcards `{a|b}` and multi-line caption files, tags split by `caption_separator` with the kept
ones (`keep_tokens`, or the parts around `keep_tokens_separator`) in place, token warmup, shuffle,
tag dropout, and `secondary_separator`.

The rng is drawn from only for the features that are on, in kohya's order, so a run without them
keeps the same random stream."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from library.errors import UserError


class CaptionRng(Protocol):
    """random.Random and numpy.random.Generator both qualify."""

    def random(self) -> float: ...

    def shuffle(self, x: list) -> None: ...


@dataclass(frozen=True)
class CaptionOptions:
    """A subset's caption keys, with kohya's defaults."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    enable_wildcard: bool = False
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    caption_separator: str = ","
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    token_warmup_min: int = 1
    token_warmup_step: float = 0  # the step at which every tag is used; below 1: a fraction of the run's steps


def caption_path(image_path: str | os.PathLike, caption_extension: str) -> Path:
    """`dir/img.png` + `.txt` -> `dir/img.txt` (kohya replaces the image suffix)."""
    stem, _ = os.path.splitext(os.fspath(image_path))
    return Path(stem + caption_extension)


def read_caption_file(path: Path, all_lines: bool = False) -> str:
    """The first non-blank line, stripped ("" for an empty file); kohya reads only the first line.
    With `all_lines` (kohya's enable_wildcard) every non-blank line, joined by newlines: one of
    them is picked at each step."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: editors on Windows prepend a BOM
    except UnicodeDecodeError as e:
        raise UserError(
            f"caption file {path} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read caption file {path}: {e.strerror or e}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if all_lines:
        return "\n".join(lines)
    return lines[0] if lines else ""


def resolve_caption(
    image_path: str | os.PathLike, caption_extension: str, class_tokens: str | None, pfg_prompt: str | None,
    all_lines: bool = False,
) -> str:
    """The caption file beside the image if present, else the subset's class_tokens, else --pfg_prompt.

    With none of them the caption is "" (the image is conditioned by its PFG tokens alone).
    """
    path = caption_path(image_path, caption_extension)
    if path.is_file():
        return read_caption_file(path, all_lines)
    if class_tokens:
        return class_tokens
    return pfg_prompt or ""


def process_caption(caption: str, options: CaptionOptions, rng: CaptionRng, epoch: int = 1, step: int = 0,
                    total_steps: int = 0) -> str:
    """The caption the text encoder gets at one training step (`epoch` counts from 1, `step` is the
    number of optimizer steps done before it, `total_steps` the run's; both for token warmup).

    Dropout returns "" (the unconditional text), as kohya does; without shuffle, warmup and tag
    dropout the tags are left as they are (only wildcards and secondary_separator apply)."""
    o = options
    if o.caption_prefix:
        caption = f"{o.caption_prefix} {caption}"
    if o.caption_suffix:
        caption = f"{caption} {o.caption_suffix}"
    dropped = o.caption_dropout_rate > 0 and rng.random() < o.caption_dropout_rate
    if dropped or (o.caption_dropout_every_n_epochs > 0 and epoch % o.caption_dropout_every_n_epochs == 0):
        return ""
    caption = expand_wildcards(caption, rng) if o.enable_wildcard else caption.split("\n")[0]
    warmup = _warmup_steps(o.token_warmup_step, total_steps)
    if o.shuffle_caption or warmup > 0 or o.caption_tag_dropout_rate > 0:
        fixed, flexible, fixed_suffix = split_tags(caption, o)
        if warmup and step < warmup:
            # kohya's token warmup: from token_warmup_min tags at step 0 to all of them at `warmup`
            flexible = flexible[:math.floor(step * (len(flexible) - o.token_warmup_min) / warmup) + o.token_warmup_min]
        if o.shuffle_caption:
            rng.shuffle(flexible)
        if o.caption_tag_dropout_rate > 0:
            flexible = [tag for tag in flexible if rng.random() >= o.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flexible + fixed_suffix)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, o.caption_separator)
    return caption


def _warmup_steps(token_warmup_step: float, total_steps: int) -> int:
    """kohya: a value below 1 is that fraction of the run's steps."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * total_steps)
    return int(token_warmup_step)


def split_tags(caption: str, o: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, flexible, kept at the end): around keep_tokens_separator when the caption
    has it (`fixed ||| flexible ||| fixed suffix`), else the first keep_tokens tags are kept."""
    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(o.caption_separator) if t.strip()]

    sep = o.keep_tokens_separator
    if sep and sep in caption:
        fixed, flexible = caption.split(sep, 1)
        fixed_suffix = ""
        if sep in flexible:
            flexible, fixed_suffix = flexible.split(sep, 1)
        return tags(fixed), tags(flexible), tags(fixed_suffix)
    all_tags = tags(caption)
    keep = max(0, o.keep_tokens)
    return all_tags[:keep], all_tags[keep:], []


_WILDCARD = re.compile(r"\{([^}]+)\}")


def expand_wildcards(caption: str, rng: CaptionRng) -> str:
    """kohya's enable_wildcard: one line of a multi-line caption, then each `{a|b|c}` replaced by
    one of its options; `{{` and `}}` stand for literal braces."""
    if "\n" in caption:
        lines = caption.split("\n")
        caption = lines[_pick(len(lines), rng)]
    open_mark, close_mark = "\x00(", "\x00)"  # stand-ins no caption contains
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[_pick(len(options), rng)]

    caption = _WILDCARD.sub(choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _pick(count: int, rng: CaptionRng) -> int:
    return min(count - 1, int(rng.random() * count))
