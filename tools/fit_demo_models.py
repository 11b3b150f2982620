"""Make the demo world knowable: split the demo images, fit the tiny tagger to their tags and the
tiny VAE to their pixels, so PFG vectors carry identity and decoded images are recognisable.

    python -m tools.fit_demo_models --data demo_output/data --base_model demo_output/models/tiny-sd1 \
        --out demo_output/models

Writes (each folder atomically, rebuilt only when its inputs or settings change):
  DATA/train/, DATA/heldout/   the demo images split by ground truth: image k = HELDOUT_INDEX of
                               every character is held out for evaluation, the trainer never sees it
  OUT/demo-sd1/                the base model with a VAE fitted to the training images and a
                               latent scaling factor measured on them (as SD's 0.18215 was)
  OUT/demo-tagger/             a WD-style ONNX tagger (the interface of tools/make_tiny_tagger.py,
                               224 px) whose tags are the demo tags of characters.json, fitted on
                               the training split plus fresh drawings of the characters, each as
                               drawn and as the fitted VAE decodes it
Deterministic on CPU from --seed and the thread count; about two and a half minutes with demo.sh's two
threads (the VAE is most of it: a weaker VAE blurs the characters past recognition, see
docs/BENCHMARKS.md). No held-out image is fitted on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: make `library` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import UserError, run_cli  # noqa: E402
from library.fileio import atomic_dir  # noqa: E402
from tools.make_tiny_tagger import (  # noqa: E402
    MARKER, RATING_TAGS, TaggerConfig, build_model, write_tagger_folder,
)

HELDOUT_INDEX = 5  # the 6th image of each character: a PNG without caption file
TAGGER_NAME = "demo-tagger"
TAGGER_SIZE = 224  # the WD interface (NHWC, BGR 0-255) at a quarter of the pixels: fitting takes seconds
TAGGER_BATCH = 32
TAGGER_RENDERS = 30  # fresh drawings per character for fitting the tagger (10 left held-out identity to chance)
MODEL_NAME = "demo-sd1"
VAE_CROP = 64  # the VAE is convolutional: fitting on crops is 4x cheaper than whole 128 px images
VAE_SIZE = 128  # the demo's training resolution
VAE_BATCH = 8
VAE_LR = 2e-3  # the peak of a cosine schedule: 600 steps decaying to zero fit as well as 1200
VAE_WARMUP = 20  # at a constant rate, in half the time


# -- the split --------------------------------------------------------------------------------


def read_ground_truth(data: Path) -> dict:
    path = data / "characters.json"
    if not path.is_file():
        raise UserError(f"{path} not found: build the demo dataset first (python -m tools.make_demo_dataset --out {data})")
    return json.loads(path.read_text(encoding="utf-8"))


def split_demo_images(data: Path, truth: dict) -> tuple[Path, Path]:
    """Copy every image (without its caption) into DATA/train or DATA/heldout by its index per character."""
    source = data / truth["image_dir"]
    train, heldout = data / "train", data / "heldout"
    wanted = {"train": [], "heldout": []}
    for entry in truth["images"]:
        name = Path(entry["file"]).name
        k = int(Path(name).stem.rsplit("_", 1)[1])
        wanted["heldout" if k == HELDOUT_INDEX else "train"].append(name)
    for folder, names in ((train, wanted["train"]), (heldout, wanted["heldout"])):
        # Images only: PFG trains with one fixed prompt, so the guide image, not a caption
        # naming the character, has to carry identity.
        files = [source / n for n in names]
        fingerprint = _hash_files(files)
        if (folder / MARKER).is_file() and (folder / MARKER).read_text() == fingerprint:
            continue
        with atomic_dir(folder) as tmp:
            for f in files:
                shutil.copy2(f, tmp / f.name)  # same mtime: feature caches stay valid across reruns
            (tmp / MARKER).write_text(fingerprint)
    return train, heldout


def _hash_files(files: list[Path], extra: dict | None = None) -> str:
    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for f in sorted(files):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def _labelled_images(folder: Path, truth: dict) -> list[tuple[Path, dict]]:
    by_name = {Path(e["file"]).name: e for e in truth["images"]}
    from library.data.images import list_images

    return [(p, by_name[p.name]) for p in list_images(folder) if p.name in by_name]


# -- the tagger -------------------------------------------------------------------------------


def demo_tag_names(truth: dict) -> tuple[list[str], list[str]]:
    """(general tags, character tags) of the demo, in a stable order."""
    general: list[str] = []
    for entry in truth["images"]:
        general += [t for t in entry["tags"] if t not in general]
    return general, [f"{c['name']}_(demo)" for c in truth["characters"]]


def _render_extra(truth: dict, per_character: int, seed: int) -> list[tuple[object, dict]]:
    """Fresh drawings of every character (new poses, sizes, backgrounds; never a held-out image):
    the "pretraining" data of the demo tagger, as Danbooru is for the real WD taggers."""
    import random

    from tools.make_demo_dataset import BACKGROUNDS, CHARACTERS, SIZES, draw_image

    rendered = []
    for ch in CHARACTERS:
        for k in range(per_character):
            rng = random.Random(f"fit-tagger/{seed}/{ch.name}/{k}")
            background = rng.choice(BACKGROUNDS)
            image = draw_image(ch, rng.choice(SIZES), background, rng)
            rendered.append((image, {"character": ch.name, "tags": ch.tags + [f"{background}_background"]}))
    return rendered


@torch.no_grad()
def _vae_round_trips(examples: list[tuple[object, dict]], model: Path) -> list[tuple[object, dict]]:
    """The drawings as the demo model's VAE renders them (encode, decode at about VAE_SIZE² pixels).
    Generated images only ever exist as VAE decodes: a real WD tagger has seen countless SD outputs,
    the demo tagger learns what this VAE's blur and colour shifts look like the same way."""
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    decoded = []
    for image, entry in tqdm(examples, desc="VAE round trips for the tagger", unit="img", leave=False):
        scale = VAE_SIZE / (image.width * image.height) ** 0.5
        size = (max(8, round(image.width * scale / 8) * 8), max(8, round(image.height * scale / 8) * 8))
        pixels = np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
        x = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].clamp(-1, 1)
        decoded.append((Image.fromarray(((y.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)), entry))
    return decoded


def fit_tagger(train: list[tuple[Path, dict]], heldout: list[tuple[Path, dict]], truth: dict, out: Path, steps: int,
               seed: int, vae_model: Path) -> Path:
    """Fit the tiny ViT tagger to the demo tags (multi-label BCE) and export it as a WD tagger.
    It sees every drawing twice: as drawn, and after a round trip through `vae_model`'s VAE."""
    from library.models.image_encoders.wd_tagger import wd_preprocess
    from library.data.images import load_image

    general, characters = demo_tag_names(truth)
    names = RATING_TAGS + general + characters
    cfg = TaggerConfig(image_size=TAGGER_SIZE, num_tags=len(names), seed=seed)
    settings = {"config": asdict(cfg), "steps": steps, "tags": names, "rendered": TAGGER_RENDERS, "batch": TAGGER_BATCH,
                "vae": (vae_model / MARKER).read_text()}
    fingerprint = _hash_files([p for p, _ in train], settings)
    if (out / MARKER).is_file() and (out / MARKER).read_text() == fingerprint:
        return out

    index = {n: i for i, n in enumerate(names)}

    def tensors(examples):
        targets = torch.zeros(len(examples), len(names))
        for row, (_, entry) in enumerate(examples):
            for tag in ["general", *entry["tags"], f"{entry['character']}_(demo)"]:
                targets[row, index[tag]] = 1.0
        images = [load_image(x) if isinstance(x, Path) else x for x, _ in examples]
        return torch.from_numpy(np.stack([wd_preprocess(im, cfg.image_size, cfg.layout) for im in images])), targets

    drawn = [(load_image(x) if isinstance(x, Path) else x, entry) for x, entry in train + _render_extra(truth, TAGGER_RENDERS, seed)]
    inputs, targets = tensors(drawn + _vae_round_trips(drawn, vae_model))
    model = build_model(cfg)
    character = targets[:, -len(characters):].argmax(dim=1)
    prototypes = torch.nn.Parameter(torch.randn(len(characters), cfg.embed_dim) * 0.02)
    optimizer = torch.optim.AdamW([*model.parameters(), prototypes], lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="fitting the tagger", unit="step")  # the latest loss beside it, as in training
    for _ in bar:
        pick = torch.randint(0, len(inputs), (TAGGER_BATCH,), generator=generator)
        pooled = model.pooled(inputs[pick])
        # Tags through the classifier, as a WD tagger; plus identity in the vector's direction
        # (cosine to a prototype per character), so cosine similarity between vectors is
        # dominated by who is drawn, not by the background.
        cosine = F.normalize(pooled, dim=1) @ F.normalize(prototypes, dim=1).T
        loss = F.binary_cross_entropy_with_logits(model.classifier(pooled), targets[pick]) + F.cross_entropy(cosine * 10.0, character[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    print(f"tagger: {steps} steps on {len(inputs)} images ({len(train)} training + rendered, each also VAE-decoded), final loss {loss.item():.4f}")
    if heldout:
        train_inputs = inputs[: len(train)]  # `drawn` starts with the training images
        _report_identity(model, tensors(heldout), train_inputs, heldout, train)
        decoded = _vae_round_trips([(load_image(p), entry) for p, entry in heldout], vae_model)
        _report_identity(model, tensors(decoded), train_inputs, heldout, train, "VAE-decoded held-out")

    categories = [9] * len(RATING_TAGS) + [0] * len(general) + [4] * len(characters)
    rows = [(9999999 - i, n, c, 1000) for i, (n, c) in enumerate(zip(names, categories))]
    write_tagger_folder(out, model, rows, fingerprint)
    return out


@torch.no_grad()
def _report_identity(model, heldout_tensors, train_inputs, heldout, train, what: str = "held-out") -> None:
    """The evidence that vectors carry identity: held-out tag accuracy, and how often a held-out
    image's nearest training vector (cosine) shows the same character."""
    inputs, targets = heldout_tensors
    accuracy = ((model(inputs) > 0.5).float() == targets).float().mean().item()
    query = F.normalize(model.pooled(inputs), dim=1)
    keys = F.normalize(model.pooled(train_inputs), dim=1)
    nearest = (query @ keys.T).argmax(dim=1).tolist()
    same = sum(train[j][1]["character"] == entry["character"] for j, (_, entry) in zip(nearest, heldout))
    print(f"tagger: {what} tag accuracy {accuracy:.3f}; nearest training vector shows the same character for {same}/{len(heldout)} {what} images")


# -- the VAE ----------------------------------------------------------------------------------


def _square_pixels(path: Path, size: int) -> torch.Tensor:
    """Resize to cover a size x size square and center-crop; (3, size, size) in [-1, 1]."""
    from PIL import Image

    from library.data.images import load_image

    image = load_image(path)
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _make_deterministic(vae) -> None:
    """Fitted on posterior means, the VAE gets a near-zero posterior variance (log-variance
    -30, the floor diffusers clamps to): latent caches `sample()` the posterior, and the random
    log-variance of the untrained head would otherwise add noise of its own scale."""
    with torch.no_grad():
        channels = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -30.0


def fit_vae(base: Path, train: list[tuple[Path, dict]], heldout: list[tuple[Path, dict]], out: Path, steps: int, seed: int) -> Path:
    """Copy the base model folder with its VAE fitted to the training images (reconstruction MSE
    on posterior means) and `scaling_factor` set so the scaled latents have unit variance."""
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_scheduler

    settings = {"steps": steps, "seed": seed, "crop": VAE_CROP, "size": VAE_SIZE, "batch": VAE_BATCH, "lr": VAE_LR,
                "warmup": VAE_WARMUP}
    fingerprint = _hash_files([p for p, _ in train] + sorted((base / "vae").iterdir()), settings)
    if (out / MARKER).is_file() and (out / MARKER).read_text() == fingerprint:
        return out

    vae = AutoencoderKL.from_pretrained(base / "vae")
    images = torch.stack([_square_pixels(p, VAE_SIZE) for p, _ in train])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=min(VAE_WARMUP, steps // 10), num_training_steps=steps)
    vae.train()
    bar = tqdm(range(steps), desc="fitting the VAE", unit="step")
    for _ in bar:
        pick = torch.randint(0, len(images), (VAE_BATCH,), generator=generator)
        x0, y0 = torch.randint(0, VAE_SIZE - VAE_CROP + 1, (2,), generator=generator).tolist()
        x = images[pick][:, :, y0 : y0 + VAE_CROP, x0 : x0 + VAE_CROP]
        latents = vae.encode(x).latent_dist.mode()
        recon = vae.decode(latents).sample
        # Reconstruction, plus a hint that speeds up a cold start: the first three latent
        # channels follow the image's colours at latent resolution (SD's latents are
        # colour-like too). Without it a minute of fitting loses the hues.
        loss = F.mse_loss(recon, x) + F.mse_loss(latents[:, :3], F.avg_pool2d(x, 8))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    _make_deterministic(vae)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample()
        scaling = float(1.0 / latents.std())
        test = torch.stack([_square_pixels(p, VAE_SIZE) for p, _ in heldout]) if heldout else images
        recon = vae.decode(vae.encode(test).latent_dist.sample()).sample.clamp(-1, 1)
        psnr = 10 * torch.log10(4.0 / F.mse_loss(recon, test)).item()
    print(f"vae: {steps} steps, final loss {loss.item():.4f}, held-out PSNR {psnr:.1f} dB, scaling_factor {scaling:.4f}")

    vae.register_to_config(scaling_factor=scaling)
    with atomic_dir(out) as tmp:
        for item in base.iterdir():
            if item.name == "vae":
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / MARKER).write_text(fingerprint)
    return out


# -- the command ------------------------------------------------------------------------------


def fit_demo_models(data: Path, base_model: Path, out: Path, tagger_steps: int = 300, vae_steps: int = 500, seed: int = 0) -> dict[str, Path]:
    """The whole demo world; returns the paths of what it wrote."""
    truth = read_ground_truth(data)
    if not (base_model / "vae").is_dir():
        raise UserError(f"{base_model} is not a diffusers model folder (no vae/): build it with tools/make_tiny_sd.py")
    train_dir, heldout_dir = split_demo_images(data, truth)
    train, heldout = _labelled_images(train_dir, truth), _labelled_images(heldout_dir, truth)
    started = time.time()
    model = fit_vae(base_model, train, heldout, out / MODEL_NAME, vae_steps, seed)
    tagger = fit_tagger(train, heldout, truth, out / TAGGER_NAME, tagger_steps, seed, model)
    print(f"demo models ready in {time.time() - started:.0f} s: {len(train)} training and {len(heldout)} held-out images")
    return {"train": train_dir, "heldout": heldout_dir, "tagger": tagger, "model": model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="demo dataset folder (with characters.json)")
    p.add_argument("--base_model", type=Path, required=True, help="tiny SD diffusers folder whose VAE is fitted")
    p.add_argument("--out", type=Path, required=True, help="folder receiving demo-tagger/ and demo-sd1/")
    p.add_argument("--tagger_steps", type=int, default=300)
    p.add_argument("--vae_steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = fit_demo_models(args.data, args.base_model, args.out, args.tagger_steps, args.vae_steps, args.seed)
    for name, path in paths.items():
        print(f"  {name + ':':9s} {path}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
