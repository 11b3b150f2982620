"""`prepare_features.py --cache_latents`: the trainer's latent caches (`<stem>_WWWWxHHHH_sd.npz`),
for the same items, buckets and flip settings train_pfg.py builds, through the same
`library.data.latents` functions, so `--cache_latents_to_disk` finds them valid. Caches the
folder index vouches for are not opened; nothing is kept in memory."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from library.data.dataset import collect_items
from library.data.dataset_config import DatasetConfig
from library.data.index import DatasetIndex
from library.data.latents import valid_latent_caches, vae_id, write_latent_caches
from library.models.loading import load_sd_vae


def cache_latent_files(config: DatasetConfig, model: str, device: str, vae_batch_size: int, skip: set[Path], share,
                       index: DatasetIndex) -> tuple[int, int]:
    """Write the latent caches of this process's `share` (a function picking it from a list) of
    the dataset's images, leaving out `skip` (images that already failed). Returns (images with
    valid caches, failed images)."""
    items, failures = collect_items(config, pfg_prompt="", index=index)
    failed = 0
    for error in failures:
        if error.path not in skip:  # already reported by the feature pass
            print(f"failed: {error.path}: {error.reason}")
            failed += 1
    jobs = share([item.latent_job() for item in items if item.image_path not in skip])
    if not jobs:
        return 0, failed
    vae = load_sd_vae(model).to(device)
    identity = vae_id(vae)
    missing = [job for job, valid in zip(jobs, valid_latent_caches(jobs, identity, index)) if not valid]
    bad: list[int] = []

    def report(i: int, error) -> None:  # decoded fine for the header read, fails in full: drop it, go on
        tqdm.write(f"failed: {error.path}: {error.reason}")
        bad.append(i)

    write_latent_caches(missing, vae, identity, vae_batch_size, on_error=report)
    dropped = set(bad)
    written = [job for i, job in enumerate(missing) if i not in dropped]
    valid_latent_caches(written, identity, index)  # recorded in the index: the next start opens none of them
    index.save()
    return len(jobs) - len(bad), failed + len(bad)
