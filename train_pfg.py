"""Train a PFG head (and the UNet) on precomputed image vectors.

    accelerate launch train_pfg.py --pretrained_model_name_or_path SD --dataset_config DATASET.toml \
        --output_dir OUT --output_name NAME --train_unet full --max_train_steps 1000

Every option may also live in `--config_file TRAIN.toml`. The recipe: settings -> dataset ->
models -> adapter -> optimizer -> loop -> outputs.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

from library.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    from library.cli_config import parse_settings, settings_to_toml
    from library.data.dataset_config import dataset_config_from_settings
    from library.train.settings import TrainSettings

    # 1. Settings and dataset config: every mistake surfaces here, before any model loads.
    settings, _ = parse_settings(TrainSettings, argv, __doc__)
    settings.validate()
    dataset_config = dataset_config_from_settings(settings)
    sample_requests = read_samples(settings, dataset_config)

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from library.data.buckets import format_bucket_table
    from library.data.dataset import PFGDataset, bucket_counts, collect_items, load_features
    from library.metadata import training_metadata
    from library.models.loading import load_sd_model
    from library.train.optim import build_optimizer
    from library.train.saving import OutputWriter
    from library.models.text_sdxl import make_prompt_encoder
    from library.train.loop import LoopOptions, TrainLoop
    from library.train.setup import (
        build_adapter, check_output_dir, check_sharding, cpu_bf16_conv_warning, fill_deepspeed_config,
        parameter_groups, prepare_sd_model, prepare_trained,
    )
    from library.train.trainer import StepOptions
    from library.train.trainer_sdxl import make_trainer

    output_dir = check_output_dir(settings)
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        log_with=trackers(settings),
        project_dir=settings.logging_dir or None,
    )
    check_sharding(accelerator, settings)
    set_seed(settings.seed)

    # 2. Images, buckets, captions and PFG vectors.
    items, failures = collect_items(dataset_config, settings.pfg_prompt)
    for failure in failures:
        accelerator.print(f"skipped {failure.path}: {failure.reason}")
    if not items:
        raise UserError(f"{dataset_config.source}: no usable images found")
    ensure_features(items, settings, accelerator)
    features, encoder_id = load_features(items)
    (items, features), (held_out, held_out_features) = split_validation(items, features, settings)
    accelerator.print(f"{len(items)} images, PFG vectors of width {features.shape[1]} ({encoder_id})"
                      + (f"; {len(held_out)} held out for validation" if held_out else ""))
    accelerator.print(format_bucket_table(bucket_counts(items)))

    # 3. Models.
    model = load_sd_model(settings.pretrained_model_name_or_path, settings.v_parameterization)
    if settings.vae:
        from library.models.checkpoints import load_vae

        model.vae = load_vae(settings.vae)
    # Before the VAE is cast to the training precision: caches are made (and validated) with the
    # VAE's own fp32 weights, so prepare_features.py's caches match whatever precision.
    latents = cached_latents(items, model.vae, settings, accelerator)
    prepare_sd_model(model, settings, accelerator.device)
    warning = cpu_bf16_conv_warning(settings, model, bucket_counts(items), accelerator.device)
    if warning:
        accelerator.print(warning)
    if settings.pfg_pooled and not model.is_sdxl:
        raise UserError(f"--pfg_pooled needs an SDXL model; {settings.pretrained_model_name_or_path} is {model.variant}")
    prompt_encoder = make_prompt_encoder(model, settings.max_token_length, settings.clip_skip)
    pooled_dim = prompt_encoder.pooled_width if settings.pfg_pooled else 0
    adapter = build_adapter(settings, features.shape[1], model.cross_attention_dim, accelerator.device, pooled_dim)
    dataset = PFGDataset(items, features, latents)

    # 4. Optimizer, schedule, and accelerate's wrapping of what trains (one module: DeepSpeed
    # takes one, and DDP/FSDP sync gradients across its forward, which is the training step).
    optimizer = build_optimizer(settings.optimizer_type, parameter_groups(settings, adapter, model.unet), settings.optimizer_args)
    trainer = make_trainer(model, adapter, prompt_encoder, StepOptions(settings.noise_offset, settings.min_snr_gamma, settings.pfg_dropout, settings.uncond))
    batch_sizes = [d.batch_size for d in dataset_config.datasets]
    options = LoopOptions(
        settings.max_train_steps, settings.max_train_epochs, settings.seed, settings.max_grad_norm,
        settings.save_every_n_steps, settings.save_every_n_epochs, settings.save_state, settings.dataloader_workers,
    )
    writer = OutputWriter(
        output_dir, settings.output_name, model, settings.train_unet, settings.save_model_as, settings.save_precision,
        settings.save_pfg_pt, settings.save_last_n, {}, encoder_id, dataset_config.datasets[0].resolution,
    )
    hooks = build_hooks(settings, accelerator, trainer, sample_requests, held_out, held_out_features, output_dir)
    loop = TrainLoop(accelerator, dataset, items, batch_sizes, writer, options, hooks)
    total_steps = loop.total_steps()
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps, num_training_steps=total_steps)
    fill_deepspeed_config(accelerator, max(batch_sizes), settings.max_grad_norm)
    loop.attach(*prepare_trained(accelerator, trainer, settings.train_unet != "none", optimizer, lr_scheduler))
    if accelerator.num_processes > 1:
        # Each process draws its own noise, timesteps and dropouts from here on (with one seed every
        # GPU would pick the same timesteps at every step); the weights were made alike above, and
        # DDP starts every process from the main one's anyway. One process keeps its usual stream.
        set_seed(settings.seed, device_specific=True)
    if settings.resume:
        loop.load_state(Path(settings.resume))

    summary = run_summary(settings, items, dataset_config, total_steps, model, loop, accelerator.num_processes)
    writer.base_metadata = training_metadata(summary)
    if accelerator.log_with:
        accelerator.init_trackers(settings.output_name, config={k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
    if accelerator.is_main_process:
        (output_dir / f"{settings.output_name}-settings.toml").write_text(settings_to_toml(settings))
    accelerator.print(f"training {settings.train_unet!r} on {accelerator.num_processes} process(es): {total_steps} steps, {len(items)} images, "
                      f"{summary['ss_num_epochs']} epochs")
    left_out = loop.batches_left_out()
    if left_out:
        accelerator.print(f"each epoch leaves out {left_out} of its batches (a different draw each epoch), "
                          f"so that the {accelerator.num_processes} processes take equal shares")

    # 5. Train and save.
    started = time.time()
    written = loop.run()
    accelerator.print(f"done in {time.time() - started:.1f}s; wrote:")
    for path in written:
        accelerator.print(f"  {path}")
    return 0


def ensure_features(items, settings, accelerator) -> None:
    """With --tagger_model, bring the vector caches up to date with prepare_features.py's own job:
    it keeps the valid ones and recomputes missing ones, those of edited images and those of
    another encoder (each process takes its share, as when it runs alone)."""
    if not settings.tagger_model:
        return
    import torch

    from library.prepare.run import prepare_features
    from library.prepare.settings import PrepareSettings

    status = prepare_features(PrepareSettings(dataset_config=settings.dataset_config, train_data_dir=settings.train_data_dir,
                                              tagger_model=settings.tagger_model))
    # Every process learns of a failure in any share, or the others would wait for it forever.
    failed = accelerator.gather(torch.tensor([int(bool(status))], device=accelerator.device)).nonzero().flatten().tolist()
    if failed:
        where = "" if accelerator.num_processes == 1 else f" by process {', '.join(map(str, failed))}"
        raise UserError(f"some images could not be encoded (listed above{where}); fix or remove them, then train again")


def cached_latents(items, vae, settings, accelerator) -> dict | None:
    """With --cache_latents(_to_disk), every item's latents (valid disk caches read, the rest
    encoded); None when latents are encoded batch by batch during training."""
    if not (settings.cache_latents or settings.cache_latents_to_disk):
        return None
    from library.data.latents import cache_latents

    jobs = [item.latent_job() for item in items]
    vae = vae.to(accelerator.device)
    progress = accelerator.is_local_main_process
    if settings.cache_latents_to_disk and accelerator.num_processes > 1:
        # Each process encodes its share into the disk cache; then all read every cache.
        cache_latents(jobs[accelerator.process_index :: accelerator.num_processes], vae, to_disk=True, progress=progress)
        accelerator.wait_for_everyone()
    return cache_latents(jobs, vae, to_disk=settings.cache_latents_to_disk, progress=progress)


def split_validation(items, features, settings):
    """((training items, vectors), (held-out items, vectors)) for --validation_split."""
    from library.train.validation import split_validation as split

    train, held = split(list(range(len(items))), settings.validation_split, settings.seed)
    return ([items[i] for i in train], features[train]), ([items[i] for i in held], features[held])


def build_hooks(settings, accelerator, trainer, sample_requests, held_out, held_out_features, output_dir) -> list:
    """Training samples and validation, each over the weights as they are at that moment
    (unwrapped from DDP, so the main process can run them alone)."""
    from library.train.trainer_sdxl import make_trainer

    model = trainer.model

    def current_model():
        return dataclasses.replace(model, unet=accelerator.unwrap_model(model.unet))

    hooks = []
    if sample_requests:
        from library.models.image_encoders import load_encoder
        from library.sample.sampler import PFGSampler
        from library.train.samples import TrainingSamples

        encoder = load_encoder(settings.tagger_model, device=accelerator.device.type) if settings.tagger_model else None
        hooks.append(TrainingSamples(
            sample_requests, settings.sample_every_n_steps, settings.sample_every_n_epochs, output_dir, settings.output_name,
            accelerator, lambda: PFGSampler(current_model(), accelerator.unwrap_model(trainer.adapter), encoder,
                                            trainer.prompt_encoder, settings.uncond, accelerator.device),
        ))
    if held_out:
        from library.evaluation.metrics import load_eval_samples
        from library.train.validation import TrainingValidation

        samples = load_eval_samples(held_out, held_out_features, model.vae)
        hooks.append(TrainingValidation(
            samples, settings.validation_every_n_steps, accelerator,
            lambda: make_trainer(current_model(), accelerator.unwrap_model(trainer.adapter), trainer.prompt_encoder, trainer.options),
            settings.validation_timesteps, settings.validation_candidates, settings.seed,
        ))
    return hooks


def read_samples(settings, dataset_config) -> list:
    """The --sample_prompts requests, checked before any model loads."""
    if not settings.sample_prompts:
        return []
    from library.train.samples import read_sample_requests

    requests = read_sample_requests(settings.sample_prompts, dataset_config.datasets[0].resolution, settings.sample_sampler)
    needs_encoder = any(not g.path.endswith(".npz") for r in requests for g in r.guides)
    if needs_encoder and not settings.tagger_model:
        raise UserError(f"{settings.sample_prompts} uses guide images (--i): pass --tagger_model to encode them")
    return requests


def trackers(settings) -> list[str] | None:
    """tensorboard when --logging_dir is given (or --log_with names it), wandb on request."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    wanted = {"": ["tensorboard"] if settings.logging_dir else [], "all": ["tensorboard", "wandb"]}.get(settings.log_with, [settings.log_with])
    if "tensorboard" in wanted and not is_tensorboard_available():
        raise UserError("tensorboard logging needs tensorboardX or tensorboard: pip install tensorboardX")
    if "wandb" in wanted and not is_wandb_available():
        raise UserError("--log_with wandb needs the wandb package: pip install wandb (then wandb login)")
    return wanted or None


def run_summary(settings, items, dataset_config, total_steps: int, model, loop, num_processes: int) -> dict:
    """The `ss_*` metadata written into every output."""
    from library.data.dataset import bucket_counts

    return {
        "ss_output_name": settings.output_name,
        "ss_training_started_at": int(time.time()),
        "ss_sd_model_name": Path(settings.pretrained_model_name_or_path).name,
        # kohya's SDXL value: A1111 files a LoRA under SDXL when it starts with "sdxl_"
        "ss_base_model_version": "sdxl_base_v1-0" if model.is_sdxl else model.variant,
        "ss_v2": model.variant == "sd2",
        "ss_v_parameterization": model.v_prediction,
        "ss_train_unet": settings.train_unet,
        "ss_learning_rate": settings.learning_rate,
        "ss_pfg_learning_rate": settings.pfg_learning_rate,
        "ss_lr_scheduler": settings.lr_scheduler,
        "ss_lr_warmup_steps": settings.lr_warmup_steps,
        "ss_optimizer": settings.optimizer_type,
        "ss_max_train_steps": total_steps,
        "ss_gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "ss_gradient_checkpointing": settings.gradient_checkpointing,
        "ss_num_processes": num_processes,
        "ss_batch_size_per_device": max(d.batch_size for d in dataset_config.datasets),
        "ss_num_batches_per_epoch": len(loop.batches_for_epoch(0)),
        "ss_num_epochs": math.ceil(total_steps / max(1, loop.steps_per_epoch())),
        "ss_mixed_precision": settings.mixed_precision,
        "ss_full_bf16": settings.full_bf16,
        "ss_seed": settings.seed,
        "ss_clip_skip": settings.clip_skip,
        "ss_max_token_length": settings.max_token_length,
        "ss_noise_offset": settings.noise_offset,
        "ss_min_snr_gamma": settings.min_snr_gamma,
        "ss_pfg_num_tokens": settings.pfg_num_tokens,
        "ss_pfg_hidden_dim": settings.pfg_hidden_dim,
        "ss_pfg_dropout": settings.pfg_dropout,
        "ss_pfg_prompt": settings.pfg_prompt,
        "ss_num_train_images": len(items),
        "ss_dataset_dirs": {str(s.image_dir): {"n_repeats": s.num_repeats} for _, s in dataset_config.iter_subsets()},
        "ss_bucket_info": {f"{w}x{h}": n for (w, h), n in sorted(bucket_counts(items).items())},
    }


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
