"""kohya's fine-tuning datasets: a subset whose `metadata_file` lists the images and their
captions, as kohya's `finetune/merge_captions_to_metadata.py` and `merge_dd_tags_to_metadata.py`
write it:

    {"img_001": {"caption": "a girl in a garden", "tags": "1girl, garden, smile"}, ...}

A key is the image's stem in `image_dir` (kohya's default), a path relative to it, or a full path
(`--full_path`); its file is found by trying the image extensions. The caption is the entry's
caption and tags joined by the subset's `caption_separator` (with `enable_wildcard`, the tags join
every caption line), as kohya builds it. JSON Lines (`.jsonl`: one {"image_path", "caption",
"tags"} object per line) works too, as in kohya."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from library.data.images import IMAGE_EXTENSIONS, ImageLoadError
from library.errors import UserError

Entries = dict[str, tuple[str | None, str | None]]  # key -> (caption, tags)


def read_metadata_file(path: str | os.PathLike) -> Entries:
    """The entries of a metadata file, validated: a UserError names the file and the entry."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise UserError(f"metadata_file {path} not found") from None
    return _read(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)  # read once when the config is checked, again when images are listed
def _read(path: str, mtime_ns: int, size: int) -> Entries:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"metadata_file {path}: not valid UTF-8 text") from None
    if path.lower().endswith(".jsonl"):
        records = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            record = _parse(line, f"{path}:{number}")
            if not isinstance(record, dict) or not isinstance(record.get("image_path"), str):
                raise UserError(f"metadata_file {path}:{number}: each line must be an object with an \"image_path\"")
            records[record["image_path"]] = record
    else:
        records = _parse(text, path)
        if not isinstance(records, dict):
            raise UserError(f"metadata_file {path}: must be a JSON object of image key -> {{\"caption\", \"tags\"}}")
    entries: Entries = {}
    for key, record in records.items():
        if not isinstance(record, dict):
            raise UserError(f"metadata_file {path}: entry {key!r} must be an object with \"caption\" and/or \"tags\"")
        for name in ("caption", "tags"):
            if record.get(name) is not None and not isinstance(record[name], str):
                raise UserError(f"metadata_file {path}: entry {key!r}: \"{name}\" must be a string")
        entries[key] = (record.get("caption"), record.get("tags"))
    return entries


def _parse(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"metadata_file {where}: JSON syntax error at line {e.lineno}: {e.msg}") from None


def entry_caption(caption: str | None, tags: str | None, separator: str, wildcard: bool) -> str | None:
    """kohya's fine-tuning caption; None when the entry has neither caption nor tags."""
    if caption is None and tags is None:
        return None
    caption = caption or ""
    if not tags:
        return caption
    if wildcard:  # the tags go with every line, one of which is picked per step
        tags = tags.replace("\n", separator)
        return "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip()) or tags
    return f"{caption}{separator}{tags}" if caption else tags


def entry_image(key: str, image_dir: Path | None) -> Path | None:
    """The image file of a key: the path itself, or the path plus an image extension."""
    base = Path(key) if os.path.isabs(key) or image_dir is None else image_dir / key
    if base.suffix.lower() in IMAGE_EXTENSIONS and base.is_file():
        return base
    for extension in IMAGE_EXTENSIONS:
        for candidate in (Path(f"{base}{extension}"), Path(f"{base}{extension.upper()}")):
            if candidate.is_file():
                return candidate
    return None


def metadata_images(metadata_file: Path, image_dir: Path | None, separator: str, wildcard: bool
                    ) -> tuple[list[tuple[Path, str | None]], list[ImageLoadError]]:
    """(image, caption or None) for every entry, in key order; entries without a file are failures."""
    found, missing = [], []
    for key, (caption, tags) in sorted(read_metadata_file(metadata_file).items()):
        image = entry_image(key, image_dir)
        if image is None:
            where = image_dir / key if image_dir is not None and not os.path.isabs(key) else Path(key)
            missing.append(ImageLoadError(where, f"listed in metadata_file {metadata_file}, but no image file found"))
        else:
            found.append((image, entry_caption(caption, tags, separator, wildcard)))
    return found, missing
