"""`prepare_features.py --cache_latents`: the trainer's latent caches (`<stem>_WWWWxHHHH_sd.npz`),
for the same items, buckets and flip settings train_pfg.py builds, through the same
`library.data.latents.cache_latents`, so `--cache_latents_to_disk` finds them valid."""
from __future__ import annotations

from pathlib import Path

from library.data.dataset import collect_items
from library.data.dataset_config import DatasetConfig
from library.data.images import ImageLoadError
from library.data.latents import cache_latents
from library.models.loading import load_sd_vae

CHUNK = 512  # images per cache_latents call: it keeps its results in memory until it returns


def cache_latent_files(config: DatasetConfig, model: str, device: str, cache_dir: Path | None, vae_batch_size: int,
                       skip: set[Path], share) -> tuple[int, int]:
    """Write the latent caches of this process's `share` (a function picking it from a list) of
    the dataset's images, leaving out `skip` (images that already failed). Returns (images with
    valid caches, failed images)."""
    items, failures = collect_items(config, pfg_prompt="")
    failed = 0
    for error in failures:
        if error.path not in skip:  # already reported by the feature pass
            print(f"failed: {error.path}: {error.reason}")
            failed += 1
    jobs = share([item.latent_job(cache_dir) for item in items if item.image_path not in skip])
    if not jobs:
        return 0, failed
    vae = load_sd_vae(model).to(device)
    start = 0
    while start < len(jobs):
        part = jobs[start : start + CHUNK]
        try:
            cache_latents(part, vae, to_disk=True, batch_size=vae_batch_size)
        except ImageLoadError as e:  # decoded fine for the encoder's header read, fails in full: drop it, go on
            print(f"failed: {e.path}: {e.reason}")
            failed += 1
            jobs = [job for job in jobs if job.image_path != e.path]
            continue  # the valid caches just written are reused on the retry
        start += CHUNK
    return len(jobs), failed
