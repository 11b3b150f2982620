"""The dataset TOML: kohya sd-scripts' schema plus PFG's keys, validated up front.

    [general]                      # fallbacks for every dataset and subset
    [[datasets]]                   # resolution, batch size, bucketing, validation split
      [[datasets.subsets]]         # one image folder (or metadata_file): repeats, captions, augmentation, caches

Every value falls back subset -> dataset -> general -> command line (DatasetDefaults). A kohya
file loads unchanged and means what it means to kohya: its caption and augmentation keys are
implemented with kohya's semantics; the few kohya keys that do not apply to PFG are reported
with one warning per key saying why. kohya's lenient values load as kohya reads them, with a
warning each (a caption_extension without its dot, num_repeats = 0, bucket sizes off the
bucket_reso_steps grid, the same image_dir twice in a dataset). Unknown keys, wrong types (by
kohya's schema) and impossible values raise UserError naming the file, the table and the key,
all of them at once, before anything heavy is loaded.

Relative `image_dir`, `metadata_file` and `cache_dir` paths are resolved against the current
working directory, as kohya does, so a kohya file means the same folders here; the error for a
missing folder points out when the path would exist relative to the config file instead.

New keys: `cache_dir` (subset only: where `<stem>_pfg.npz` features and latent caches live;
default beside each image) and `encoder` (the encoder id the feature caches must carry).

Debug entry point: `python -m library.data.dataset_config FILE` prints the resolved config.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping

import toml

from library.data.captions import CaptionOptions
from library.data.dataset_schema import (
    DATASET_KEYS, GENERAL, GENERAL_ALLOWED, INTERPOLATIONS, NOT_APPLICABLE, SUBSET_KEYS, SUBSET_ONLY_KEYS, Problems,
    array_of_tables, check_table, dataset_name, describe, parse_resolution, subset_name,
)
from library.data.fine_tuning import read_metadata_file
from library.errors import Notice, UserError, run_cli


class DatasetConfigWarning(Notice):
    """Something about a dataset config that does not stop the run."""


class UnsupportedKeyWarning(DatasetConfigWarning):
    """A kohya dataset key that does not apply to PFG (or is_reg, which trains like any subset)."""


class AdjustedValueWarning(DatasetConfigWarning):
    """A lenient value read as kohya reads it (a dot added, a size rounded, a subset skipped)."""


COMMAND_LINE = "command line / default"  # the source label of a DatasetDefaults value


@dataclass(frozen=True)
class DatasetDefaults:
    """Command-line fallbacks, used where no TOML table sets a key. Defaults are kohya's."""

    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None  # None: the run's --seed
    num_repeats: int = 1
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    caption_separator: str = ","
    secondary_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    resize_interpolation: str | None = None  # None: lanczos
    alpha_mask: bool = False  # kohya's --alpha_mask: the default of the subset-only key
    encoder: str | None = None
    pfg_prompt: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> "DatasetDefaults":
        """Pick same-named attributes (None = not given) from a settings object or namespace.

        kohya's flag names `train_batch_size` and `dataset_repeats` count as `batch_size` and
        `num_repeats`; `resolution` may be kohya's "W" / "W,H" string.
        """
        aliases = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
        values: dict[str, Any] = {}
        for f in fields(cls):
            for name in (f.name, aliases.get(f.name)):
                v = getattr(settings, name, None) if name else None
                if v is not None:
                    values[f.name] = v
                    break
        if "resolution" in values:
            try:
                values["resolution"] = parse_resolution(values["resolution"])
            except ValueError as e:
                raise UserError(f"--resolution: {e}") from None
        return cls(**values)


@dataclass(frozen=True)
class SubsetConfig:
    """One image folder with every value resolved (subset -> dataset -> general -> command line)."""

    name: str  # the table, e.g. "[[datasets]] #1 > [[datasets.subsets]] #2", for messages
    image_dir: Path | None  # absolute; None only for a metadata_file subset with full-path keys
    metadata_file: Path | None  # kohya's fine-tuning subset: images and captions from this JSON
    num_repeats: int
    caption_extension: str
    class_tokens: str | None
    shuffle_caption: bool
    keep_tokens: int
    keep_tokens_separator: str | None
    caption_separator: str
    secondary_separator: str | None
    caption_prefix: str | None
    caption_suffix: str | None
    enable_wildcard: bool
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    token_warmup_min: int
    token_warmup_step: float
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    resize_interpolation: str | None
    alpha_mask: bool
    is_reg: bool
    cache_dir: Path | None  # None: caches beside each image
    encoder: str | None  # expected encoder id of the feature caches; None: accept the one in use
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)  # key -> where set

    @cached_property  # read for every sample: built once per subset
    def caption_options(self) -> CaptionOptions:
        return CaptionOptions(**{f.name: getattr(self, f.name) for f in fields(CaptionOptions)})

    @property
    def varies_pixels(self) -> bool:
        """random_crop and color_aug change a sample's pixels each time: no latent cache can hold them."""
        return self.random_crop or self.color_aug


@dataclass(frozen=True)
class DatasetBlueprint:
    """One [[datasets]] table: images of its subsets share resolution, batch size and buckets."""

    name: str
    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    validation_split: float  # fraction of each (non-reg) subset held out
    validation_seed: int | None  # None: the run's --seed
    subsets: tuple[SubsetConfig, ...]
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class DatasetConfig:
    source: str  # the config file, or the --train_data_dir it was built from
    datasets: tuple[DatasetBlueprint, ...]
    pfg_prompt: str | None
    notes: tuple[str, ...] = ()  # the warnings: keys that do not apply, is_reg subsets, adjusted values

    def iter_subsets(self) -> Iterator[tuple[DatasetBlueprint, SubsetConfig]]:
        for dataset in self.datasets:
            for subset in dataset.subsets:
                yield dataset, subset

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings), e.g. for safetensors metadata."""

        def plain(obj) -> dict[str, Any]:
            out = {}
            for f in fields(obj):
                if f.name in ("sources", "subsets"):
                    continue
                v = getattr(obj, f.name)
                out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            return out

        return {
            "source": self.source,
            "pfg_prompt": self.pfg_prompt,
            "datasets": [{**plain(d), "subsets": [plain(s) for s in d.subsets]} for d in self.datasets],
        }


# ---------------------------------------------------------------------------------------------
# loading


def load_dataset_config(path: str | os.PathLike, defaults: DatasetDefaults | None = None) -> DatasetConfig:
    """Read, validate and resolve a dataset TOML (or JSON, as kohya also accepts)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise UserError(f"dataset config {path} {what}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8 text; re-save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: JSON syntax error: {e.msg}\n    {_line(text, e.lineno)}") from None
    else:
        try:
            raw = toml.loads(text)  # the parser kohya uses, so files kohya reads parse the same
        except toml.TomlDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: TOML syntax error: {e.msg}\n    {_line(text, e.lineno)}") from None
    return _build(raw, str(path), defaults or DatasetDefaults(), config_dir=path.parent)


def config_from_train_data_dir(
    train_data_dir: str | os.PathLike, defaults: DatasetDefaults | None = None,
    reg_data_dir: str | os.PathLike | None = None, metadata_file: str | os.PathLike | None = None,
) -> DatasetConfig:
    """A one-dataset config without a TOML, from kohya's folder convention.

    Each `<repeats>_<class tokens>` subfolder is a subset with that num_repeats and class_tokens
    (as kohya's --train_data_dir / --reg_data_dir). When the folder has no such subfolders, the
    folder itself is the only subset. With `metadata_file` (kohya's --in_json) the folder is one
    fine-tuning subset: its images and captions are the file's entries.
    """
    subsets: list[dict[str, Any]] = []
    for folder, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if not folder:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{'--reg_data_dir' if is_reg else '--train_data_dir'} {folder} is not a folder")
        if metadata_file and not is_reg:
            subsets.append({"image_dir": str(folder), "metadata_file": str(metadata_file)})
            continue
        found = []
        with os.scandir(folder) as entries:  # the entry's own type: no stat per image of a flat 100k folder
            subfolders = sorted(Path(entry.path) for entry in entries if entry.is_dir())
        for sub in subfolders:
            repeats, _, tokens = sub.name.partition("_")
            if repeats.isdigit() and int(repeats) > 0:
                found.append({"image_dir": str(sub), "num_repeats": int(repeats), "is_reg": is_reg,
                              **({"class_tokens": tokens} if tokens else {})})
        subsets.extend(found or [{"image_dir": str(folder), "is_reg": is_reg}])
    return _build({"datasets": [{"subsets": subsets}]}, f"--train_data_dir {train_data_dir}",
                  defaults or DatasetDefaults(), config_dir=None)


def _line(text: str, lineno: int) -> str:
    lines = text.splitlines()
    return lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""


def _build(raw: Any, source: str, defaults: DatasetDefaults, config_dir: Path | None) -> DatasetConfig:
    problems = Problems(source)
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a table with [general] and [[datasets]]")
    for key in raw:
        if key not in ("general", "datasets"):
            where = "[general]" if key in GENERAL_ALLOWED else "its table"
            close = difflib.get_close_matches(key, ["general", "datasets"], n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close and key not in GENERAL_ALLOWED else f"; move it to {where}"
            problems.add("top level", f"unknown key '{key}' (only [general] and [[datasets]] go here){hint}")
    general_raw = raw.get("general", {})
    if not isinstance(general_raw, dict):
        problems.add("top level", f"'general' must be a table ([general]), got {describe(general_raw)}")
        general_raw = {}
    general = check_table(general_raw, GENERAL, "general", problems)
    datasets_raw = array_of_tables(raw.get("datasets", []), "datasets", "top level", problems)
    if not datasets_raw and isinstance(raw.get("datasets", []), list):
        problems.add("top level", "no [[datasets]] table; add one with at least one [[datasets.subsets]] image_dir")

    command_line = {f.name: getattr(defaults, f.name) for f in fields(defaults)}
    _validate_defaults(command_line, problems)
    blueprints = []
    for i, dataset_raw in enumerate(datasets_raw):
        dname = dataset_name(i)
        dataset = check_table(dataset_raw, dname, "dataset", problems)
        subsets_raw = array_of_tables(dataset_raw.get("subsets", []), "subsets", dname, problems)
        if not subsets_raw:
            problems.add(dname, "no [[datasets.subsets]] table; each dataset needs at least one image_dir")
        layers = [(dname, dataset), (GENERAL, general), (COMMAND_LINE, command_line)]
        dvalues, dsources = _resolve(DATASET_KEYS, layers)
        _validate_dataset(dname, dvalues, dsources, problems)
        subsets: list[SubsetConfig] = []
        for j, subset_raw in enumerate(subsets_raw):
            sname = subset_name(i, j)
            subset = check_table(subset_raw, sname, "subset", problems)
            svalues, ssources = _resolve(SUBSET_KEYS, [(sname, subset)] + layers)
            only_defaults = {"is_reg": False, "alpha_mask": command_line["alpha_mask"]}
            only, only_sources = _resolve(SUBSET_ONLY_KEYS, [(sname, subset), (COMMAND_LINE, only_defaults)])
            svalues.update(only)
            ssources.update(only_sources)
            made = _make_subset(sname, svalues, ssources, subset, config_dir, problems)
            if made is not None and _keep_subset(made, subsets, problems):
                subsets.append(made)
        blueprints.append(DatasetBlueprint(
            name=dname, subsets=tuple(subsets), sources=dsources, **{k: dvalues[k] for k in DATASET_KEYS},
        ))
    problems.raise_if_any()
    return DatasetConfig(source=source, datasets=tuple(blueprints), pfg_prompt=defaults.pfg_prompt,
                         notes=_warn(problems, blueprints))


def _keep_subset(subset: SubsetConfig, kept: list[SubsetConfig], problems: Problems) -> bool:
    """kohya skips subsets with num_repeats < 1, and a dataset's second subset of the same folder
    (or metadata file): said, not silently trained twice."""
    if subset.num_repeats == 0:
        problems.adjust(subset.name, f"num_repeats = 0: the subset ({subset.metadata_file or subset.image_dir}) is "
                                     "skipped, as kohya does")
        return False
    key = (subset.metadata_file, None if subset.metadata_file else subset.image_dir)
    first = next((s for s in kept if (s.metadata_file, None if s.metadata_file else s.image_dir) == key), None)
    if first is not None:
        what = f"metadata_file {subset.metadata_file}" if subset.metadata_file else f"image_dir {subset.image_dir}"
        problems.adjust(subset.name, f"{what} is already {first.name}: this subset is skipped and the first one "
                                     "used, as kohya does (to weight the images, raise the first one's num_repeats)")
        return False
    return True


def _warn(problems: Problems, blueprints: list[DatasetBlueprint]) -> tuple[str, ...]:
    """Every warning once, as it is also printed: keys that do not apply, is_reg, adjusted values."""
    notes: list[tuple[str, type]] = []
    for key, tables in problems.not_applicable.items():
        notes.append((f"{problems.source}: kohya key '{key}' ({', '.join(tables)}) does not apply to PFG: "
                      f"{NOT_APPLICABLE[key][1]}; it is ignored", UnsupportedKeyWarning))
    for subset in (s for blueprint in blueprints for s in blueprint.subsets if s.is_reg):
        # PFG has no prior-preservation loss: say what happens to kohya's regularisation images
        notes.append((f"{problems.source}: {subset.name} has is_reg = true, but PFG training has no prior-preservation "
                      f"loss: its images ({subset.image_dir}) train like the others; remove the subset to leave them out",
                      UnsupportedKeyWarning))
    notes += [(message, AdjustedValueWarning) for message in problems.adjusted]
    for message, category in notes:
        warnings.warn(message, category, stacklevel=4)
    return tuple(message for message, _ in notes)


def _resolve(keys: Mapping[str, str], layers: list[tuple[str, Mapping[str, Any]]]) -> tuple[dict, dict]:
    """First layer that sets each key wins; returns (values, key -> source table)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in keys:
        values[key], sources[key] = None, COMMAND_LINE
        for name, layer in layers:
            if layer.get(key) is not None:
                values[key], sources[key] = layer[key], name
                break
    return values, sources


def _validate_defaults(values: Mapping[str, Any], problems: Problems) -> None:
    try:
        parse_resolution(values["resolution"])
    except ValueError as e:
        problems.add(COMMAND_LINE, f"'resolution': {e}")


def _at(key: str, sources: Mapping[str, str], table: str) -> str:
    """`'key' = value` plus where it was set when that is another table."""
    return f"'{key}'" if sources[key] == table else f"'{key}' (set in {sources[key]})"


def _validate_dataset(name: str, v: dict[str, Any], src: dict[str, str], problems: Problems) -> None:
    split = v["validation_split"]
    if not 0.0 <= split < 1.0:
        problems.add(name, f"{_at('validation_split', src, name)} = {split} must be within [0, 1)")
    try:
        v["resolution"] = parse_resolution(v["resolution"])
    except ValueError:
        return  # reported with the command line values
    w, h = v["resolution"]
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        problems.add(name, f"{_at('resolution', src, name)} = {w}x{h}: width and height must be positive "
                           "multiples of 8 (the VAE works on 8x8 pixel blocks)")
    if v["batch_size"] < 1:
        problems.add(name, f"{_at('batch_size', src, name)} = {v['batch_size']} must be at least 1")
    if not v["enable_bucket"]:
        return
    steps = v["bucket_reso_steps"]
    if steps < 8 or steps % 8:
        problems.add(name, f"{_at('bucket_reso_steps', src, name)} = {steps} must be a positive multiple of 8")
        return
    if w % steps or h % steps:  # kohya's bucket table floors the area to the grid: say so, and do it
        v["resolution"] = (w - w % steps, h - h % steps)
        problems.adjust(name, f"{_at('resolution', src, name)} = {w}x{h} is not a multiple of bucket_reso_steps = {steps}: "
                              f"the buckets are built for {v['resolution'][0]}x{v['resolution'][1]} (rounded down, as "
                              "kohya's bucket table does)")
        w, h = v["resolution"]
    # kohya rounds the bucket limits onto the grid: the smallest down, the largest up
    for key, rounded, how in (("min_bucket_reso", v["min_bucket_reso"] - v["min_bucket_reso"] % steps, "down"),
                              ("max_bucket_reso", -(-v["max_bucket_reso"] // steps) * steps, "up")):
        if rounded != v[key] and rounded > 0:
            problems.adjust(name, f"{_at(key, src, name)} = {v[key]} is not a multiple of bucket_reso_steps = {steps}; "
                                  f"using {rounded} (rounded {how}, as kohya does)")
            v[key] = rounded
    lo, hi = v["min_bucket_reso"], v["max_bucket_reso"]
    if lo < steps:
        problems.add(name, f"{_at('min_bucket_reso', src, name)} = {lo} must be at least bucket_reso_steps = {steps}")
    if lo > hi:
        problems.add(name, f"{_at('min_bucket_reso', src, name)} = {lo} is larger than "
                           f"{_at('max_bucket_reso', src, name)} = {hi}")
    elif lo > min(w, h) or hi < max(w, h):
        problems.add(name, f"resolution {w}x{h} must lie within {_at('min_bucket_reso', src, name)} = {lo} and "
                           f"{_at('max_bucket_reso', src, name)} = {hi}")


def _make_subset(
    name: str, v: dict[str, Any], src: dict[str, str], table: Mapping[str, Any], config_dir: Path | None,
    problems: Problems,
) -> SubsetConfig | None:
    before = len(problems.messages)
    if v["num_repeats"] < 0:
        problems.add(name, f"{_at('num_repeats', src, name)} = {v['num_repeats']} must be at least 1 (0 skips the subset)")
    for key in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
        if v[key] < 0:
            problems.add(name, f"{_at(key, src, name)} = {v[key]} must be 0 or more")
    if v["token_warmup_step"] < 0:
        problems.add(name, f"{_at('token_warmup_step', src, name)} = {v['token_warmup_step']} must be 0 or more")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        v[key] = float(v[key])
        if not 0.0 <= v[key] <= 1.0:
            problems.add(name, f"{_at(key, src, name)} = {v[key]} must be between 0 and 1")
    ext = v["caption_extension"]
    if not ext:
        problems.add(name, f"{_at('caption_extension', src, name)} is empty; give the extension of the caption files, e.g. '.txt'")
    elif not ext.startswith("."):
        v["caption_extension"] = "." + ext
        problems.adjust(name, f"{_at('caption_extension', src, name)} = {ext!r} has no dot; using {'.' + ext!r}, as kohya does")
    if not v["caption_separator"]:
        problems.add(name, f"{_at('caption_separator', src, name)} is empty; the tags need a separator (kohya's is ',')")
    interpolation = v["resize_interpolation"]
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        problems.add(name, f"{_at('resize_interpolation', src, name)} = {interpolation!r} is not one of "
                           f"{', '.join(INTERPOLATIONS)}")
    if v["encoder"] is not None and not v["encoder"].strip():
        problems.add(name, f"{_at('encoder', src, name)} is empty; leave it out to accept any encoder")

    metadata_file = None
    if v["metadata_file"] is not None:
        metadata_file = _absolute(v["metadata_file"])
        for key in ("class_tokens", "caption_extension", "is_reg"):
            if key in table:  # kohya's fine-tuning subsets take neither: the JSON holds the captions
                problems.add(name, f"'{key}' does not go with metadata_file (kohya's fine-tuning subset: the images and "
                                   "their captions come from the JSON)")
        try:
            entries = read_metadata_file(metadata_file)
        except UserError as e:
            problems.add(name, f"'metadata_file' = {v['metadata_file']!r}: {e}")
        else:
            if not entries:
                problems.add(name, f"'metadata_file' = {v['metadata_file']!r} lists no images")
            elif v["image_dir"] is None and any(not os.path.isabs(key) for key in entries):
                problems.add(name, "missing key 'image_dir': the metadata_file's image keys are relative to it "
                                   "(kohya's merge_captions_to_metadata.py writes file stems unless --full_path)")
    image_dir = None
    if v["image_dir"] is None:
        if metadata_file is None:
            problems.add(name, "missing required key 'image_dir' (or a metadata_file, kohya's fine-tuning subset)")
    elif not v["image_dir"].strip():
        problems.add(name, "'image_dir' is empty")
    else:
        image_dir = _absolute(v["image_dir"])
        if not image_dir.is_dir():
            what = "is not a folder" if image_dir.exists() else "does not exist"
            problems.add(name, f"'image_dir' = {v['image_dir']!r} {what} ({image_dir})"
                               + _relative_hint(v["image_dir"], config_dir))
    cache_dir = None
    if v["cache_dir"] is not None:
        cache_dir = _absolute(v["cache_dir"])
        if not v["cache_dir"].strip() or (cache_dir.exists() and not cache_dir.is_dir()):
            problems.add(name, f"'cache_dir' = {v['cache_dir']!r} is not a folder ({cache_dir})")
    if len(problems.messages) > before:
        return None
    values = {k: v[k] for k in (*SUBSET_KEYS, *SUBSET_ONLY_KEYS)}
    values.update(image_dir=image_dir, metadata_file=metadata_file, cache_dir=cache_dir)
    return SubsetConfig(name=name, sources=src, **values)


def _absolute(path: str) -> Path:
    # relative to the working directory, exactly like kohya (see the module docstring)
    return Path(os.path.abspath(os.path.expanduser(path)))


def _relative_hint(path: str, config_dir: Path | None) -> str:
    if config_dir is None or os.path.isabs(os.path.expanduser(path)):
        return ""
    beside = (config_dir / path).resolve()
    if beside.is_dir():
        return (f"; relative paths are resolved against the working directory {os.getcwd()} (as kohya does), "
                f"but the folder exists relative to the config file: use {beside}")
    return ""


# ---------------------------------------------------------------------------------------------
# debug entry point


def format_config(config: DatasetConfig) -> str:
    """Every resolved value; `<- table` says where a value was inherited from."""
    lines = [f"dataset config: {config.source}", f"pfg_prompt: {config.pfg_prompt!r}"]

    def show(obj, keys, indent: str) -> None:
        for key in keys:
            value = getattr(obj, key)
            if key == "resolution":
                value = f"{value[0]}x{value[1]}"
            elif isinstance(value, (str, type(None))):
                value = repr(value)
            source = obj.sources.get(key, COMMAND_LINE)
            where = "" if source == obj.name else f"  <- {source}"
            lines.append(f"{indent}{key:<30} {value}{where}")

    for dataset in config.datasets:
        lines.append(dataset.name)
        show(dataset, DATASET_KEYS, "  ")
        for subset in dataset.subsets:
            lines.append(f"  {subset.name}")
            show(subset, [*SUBSET_ONLY_KEYS, *SUBSET_KEYS], "    ")
    if config.notes:
        lines.append(f"warnings: {len(config.notes)} (see above)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m library.data.dataset_config",
        description="Validate a dataset TOML and print every value after fallback "
                    "(subset -> dataset -> general -> command line / default).",
    )
    parser.add_argument("config", help="dataset TOML (or JSON) file")
    parser.add_argument("--json", action="store_true", help="print the resolved config as JSON")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetConfigWarning)
        config = load_dataset_config(args.config)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(config.to_dict(), indent=2) if args.json else format_config(config))
    return 0


if __name__ == "__main__":
    run_cli(main)


def dataset_config_from_settings(settings: Any) -> DatasetConfig:
    """The dataset of a script's settings: `--dataset_config FILE` or `--train_data_dir DIR`, with
    the command line's values (resolution, batch size, ...) as the lowest fallback."""
    defaults = DatasetDefaults.from_settings(settings)
    if getattr(settings, "dataset_config", None):
        return load_dataset_config(settings.dataset_config, defaults)
    return config_from_train_data_dir(settings.train_data_dir, defaults, getattr(settings, "reg_data_dir", None),
                                      getattr(settings, "in_json", None))
