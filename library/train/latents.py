"""Which latents a run trains on: encoded batch by batch (the default), all in memory
(`--cache_latents`), or read from validated disk caches when their batch comes
(`--cache_latents_to_disk`, kohya's meaning: host memory stays flat however large the dataset)."""
from __future__ import annotations

from library.data.index import DatasetIndex
from library.data.latents import DiskLatents, cache_latents, valid_latent_caches, vae_id, write_latent_caches
from library.errors import UserError


def training_latents(items, vae, settings, accelerator, index: DatasetIndex):
    """The PFGDataset's latents: None (encode per batch), a dict in memory, or DiskLatents. Each
    process encodes its share of the missing disk caches; then all of them are checked, through the
    folder indexes (a cache whose stat matches its record is not opened)."""
    if not (settings.cache_latents or settings.cache_latents_to_disk):
        return None
    jobs = [item.latent_job() for item in items]
    vae = vae.to(accelerator.device)
    progress = accelerator.is_local_main_process
    if not settings.cache_latents_to_disk:
        latents = cache_latents(jobs, vae, to_disk=False, progress=progress, index=index)
        index.save()
        return latents
    identity = vae_id(vae)
    # Shares of the whole list, not of what looks missing: the processes do not look at the same
    # moment, and one must not miss a cache another is writing.
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = jobs[rank::world]
    missing = [job for job, valid in zip(mine, valid_latent_caches(mine, identity, index)) if not valid]
    write_latent_caches(missing, vae, identity, progress=progress)
    accelerator.wait_for_everyone()
    others = [job for k, job in enumerate(jobs) if k % world != rank] + missing
    unwritten = [job for job, valid in zip(others, valid_latent_caches(others, identity, index)) if not valid]
    if unwritten:
        raise UserError(f"{len(unwritten)} latent caches were not written, e.g. {unwritten[0].cache_path}; is the cache folder shared by every process?")
    index.save()
    return DiskLatents(items, identity)
