"""Downloads from the Hugging Face hub: SD pipeline repos, WD taggers and CLIP vision models.

Each downloads only what its loader reads into the Hugging Face cache, which serves it again
offline. Only the hub's and the network's own errors (`HUB_ERRORS`) become user messages; any
other exception is a bug and shows as one.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from library.errors import UserError


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a download may raise for reasons outside the program: no connection, a proxy, a
    timeout or an HTTP status (huggingface_hub's HTTPError is its HTTP client's base error, all
    transport failures included), offline mode or a cache miss (OSError), a missing file, an
    invalid repo id."""
    from huggingface_hub import errors

    return (OSError, errors.HTTPError, errors.EntryNotFoundError, errors.HFValidationError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


# ------------------------------------------------------------------------ SD pipeline repos
# What the loader reads from a pipeline repo; a safety checker, feature extractor or image encoder
# in model_index.json is never downloaded.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
REQUIRED_PARTS = PIPELINE_PARTS[:5]
# Weight files inside a component folder: `diffusion_pytorch_model[.VARIANT][-00001-of-00002].safetensors`
# (diffusers), `model[.VARIANT].safetensors` / `pytorch_model[.VARIANT].bin` (transformers).
_WEIGHT_FILE = re.compile(
    r"^(?:diffusion_pytorch_model|pytorch_model|model)(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?\.(?P<format>safetensors|bin)$"
)
# One variant per component: the plain (fp32, non-EMA) weights first, half precision next, EMA last.
_VARIANT_ORDER = (None, "non_ema", "fp16", "bf16")


def _weight_rank(key: tuple[str, str | None]) -> tuple:
    file_format, variant = key
    if variant in _VARIANT_ORDER:
        order = _VARIANT_ORDER.index(variant)
    else:
        order = len(_VARIANT_ORDER) + (1 if "ema" in variant.split("_") else 0)
    return (file_format != "safetensors", order, variant or "")


def select_pipeline_files(repo_id: str, names: list[str], model_index: dict) -> tuple[list[str], dict[str, str | None]]:
    """The files of a diffusers pipeline repo the loader needs, and the weights variant chosen per
    component (None: the plain files). Configs and tokenizer files of the used components, and one
    set of weights each; other variants, EMA copies, single files at the root and unused
    components (safety checker, ...) are left on the hub."""
    parts = [p for p in PIPELINE_PARTS if isinstance(model_index.get(p), list) and model_index[p][:1] != [None]]
    missing = [p for p in REQUIRED_PARTS if p not in parts]
    if missing:
        kind = model_index.get("_class_name", "pipeline")
        raise UserError(f"{repo_id}: model_index.json describes a {kind} without {', '.join(missing)}; "
                        "expected a Stable Diffusion 1.x/2.x/XL pipeline")
    chosen: list[str] = []
    variants: dict[str, str | None] = {}
    for part in parts:
        inside = sorted(n for n in names if n.startswith(part + "/") and n.count("/") == 1)
        chosen += [n for n in inside if n.endswith((".json", ".txt"))]
        if part.startswith(("tokenizer", "scheduler")):
            continue
        groups: dict[tuple[str, str | None], list[str]] = {}
        for name in inside:
            match = _WEIGHT_FILE.match(name.split("/", 1)[1])
            if match:
                groups.setdefault((match["format"], match["variant"]), []).append(name)
        if not groups:
            raise UserError(f"{repo_id}: {part}/ holds no weights (diffusion_pytorch_model/model .safetensors or .bin)")
        best = min(groups, key=_weight_rank)
        chosen += groups[best]
        variants[part] = best[1]
    return chosen, variants


def _cached_pipeline(repo_id: str, reason: str) -> tuple[Path, dict[str, str | None]]:
    """The copy of `repo_id` in the local Hugging Face cache (what an earlier download left)."""
    import huggingface_hub

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except hub_errors():  # LocalEntryNotFoundError (not cached), or a cache it cannot read
        raise UserError(f"{repo_id!r} is neither a local path nor in the local Hugging Face cache, and {reason}") from None
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    if "model_index.json" not in names:
        raise UserError(f"{repo_id}: the cached copy in {folder} has no model_index.json ({reason})")
    _, variants = select_pipeline_files(f"{repo_id} (cached in {folder})", names, json.loads((folder / "model_index.json").read_text()))
    print(f"{repo_id}: using the cached copy in {folder} ({reason})")
    return folder, variants


def download_pipeline(repo_id: str) -> tuple[Path, dict[str, str | None]]:
    """Download what `select_pipeline_files` picks from a hub pipeline repo into the Hugging Face
    cache; offline (HF_HUB_OFFLINE=1) or with the hub unreachable, use the cached copy if any.
    Returns the snapshot folder and the weights variant per component."""
    if hub_offline():
        return _cached_pipeline(repo_id, "the hub is offline (HF_HUB_OFFLINE=1)")
    import huggingface_hub
    from huggingface_hub import errors

    try:
        info = huggingface_hub.model_info(repo_id, files_metadata=True)
    except errors.GatedRepoError:
        raise UserError(f"{repo_id}: the model is gated; accept its terms on the hub and log in (hf auth login)") from None
    except (errors.RepositoryNotFoundError, errors.HFValidationError):
        raise UserError(f"model not found: {repo_id} (no such file or folder, and no such model on the hub, "
                        "or it is private: log in with hf auth login)") from None
    except hub_errors() as e:  # no connection, proxy, timeout: an earlier download may still be cached
        return _cached_pipeline(repo_id, f"the hub cannot be reached ({type(e).__name__}: {_first_line(e)})")
    siblings = {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}
    if "model_index.json" not in siblings:
        raise UserError(f"{repo_id}: not a diffusers pipeline repo (no model_index.json); for a single-file checkpoint, "
                        "download its .safetensors and pass that path")
    root = _fetch(repo_id, "model_index.json")
    files, variants = select_pipeline_files(repo_id, list(siblings), json.loads((root / "model_index.json").read_text()))
    total = sum(siblings[f] or 0 for f in files)
    print(f"{repo_id}: {len(files)} files ({total / 2**30:.2f} GiB) into the Hugging Face cache")
    for name in files:
        if _fetch(repo_id, name) != root:
            raise UserError(f"{repo_id} changed on the hub during the download; run again")
    return root, variants


def _fetch(repo_id: str, name: str) -> Path:
    """One file into the cache; the snapshot folder it lies in."""
    import huggingface_hub

    try:
        local = Path(huggingface_hub.hf_hub_download(repo_id, name))
    except hub_errors() as e:
        raise UserError(f"{repo_id}: downloading {name} failed ({type(e).__name__}: {_first_line(e)}); run again to resume") from None
    return local.parents[len(name.split("/")) - 1]


# ------------------------------------------------------------------------------ WD taggers
def download_tagger(repo_id: str) -> Path:
    """model.onnx (+ selected_tags.csv) of a WD tagger repo into the cache; the model path."""
    from huggingface_hub import hf_hub_download

    try:
        model = Path(hf_hub_download(repo_id, "model.onnx"))
        hf_hub_download(repo_id, "selected_tags.csv")
    except hub_errors() as e:  # offline, unknown repo, missing file: all end the same way for the user
        raise UserError(
            f"tagger model {repo_id!r} is not a local file or folder and could not be downloaded from the "
            f"Hugging Face hub ({type(e).__name__}: {_first_line(e)})"
        ) from None
    return model


# ------------------------------------------------------------------------ CLIP vision models
def download_clip(spec: str, weight_files: tuple[str, ...]) -> Path:
    """config.json, preprocessor_config.json (when the repo has one) and the first of
    `weight_files` the repo holds (with its shards) of a CLIP repo, or of its subfolder
    (`owner/repo/sub/folder`), into the cache; the snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

    owner, repo, *sub = spec.split("/")
    repo_id, subfolder = f"{owner}/{repo}", "/".join(sub) or None

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, subfolder=subfolder))

    try:
        folder = fetch("config.json").parent
        try:
            fetch("preprocessor_config.json")
        except RemoteEntryNotFoundError:
            pass  # optional: the encoder falls back to CLIP's stock recipe
        not_found: list[Exception] = []
        for name in weight_files:
            try:
                path = fetch(name)
            except EntryNotFoundError as e:  # remote: not in the repo; local: not in the offline cache
                not_found.append(e)
                continue
            if name.endswith(".index.json"):
                for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                    fetch(shard)
            return folder
    except hub_errors() as e:  # offline, unknown repo, no connection: all end the same way for the user
        raise UserError(
            f"CLIP model {spec!r} is not a local folder and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    if all(isinstance(e, RemoteEntryNotFoundError) for e in not_found):
        raise UserError(f"CLIP model {spec!r}: the hub repo has none of {', '.join(weight_files)}")
    raise UserError(f"CLIP model {spec!r}: its weights are not in the local Hugging Face cache and could not be "
                    f"downloaded ({type(not_found[-1]).__name__}: {_first_line(not_found[-1])})")
