"""Train a PFG head (and the UNet) on precomputed image vectors.

    accelerate launch train_pfg.py --pretrained_model_name_or_path SD --dataset_config DATASET.toml \
        --output_dir OUT --output_name NAME --train_unet full --max_train_steps 1000

Every option may also live in `--config_file TRAIN.toml`. The recipe: settings -> dataset ->
models -> adapter -> optimizer -> loop -> outputs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from library.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    from library.cli_config import parse_settings, settings_to_toml
    from library.data.dataset_config import dataset_config_from_settings
    from library.train.settings import TrainSettings

    # 1. Settings and dataset config: every mistake surfaces here, before any model loads.
    settings, _ = parse_settings(TrainSettings, argv, __doc__)
    settings.validate()
    for note in settings.notes():
        print(f"note: {note}")
    dataset_config = dataset_config_from_settings(settings)
    check_dataset_options(settings, dataset_config)
    if settings.debug_dataset:
        return debug_dataset(settings, dataset_config)
    sample_requests = read_samples(settings, dataset_config)

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from library.data.buckets import format_bucket_table
    from library.data.dataset import PFGDataset, bucket_counts, collect_items, load_feature_table
    from library.data.index import DatasetIndex
    from library.metadata import training_metadata
    from library.models.loading import load_sd_model
    from library.train.loop import LoopOptions, TrainLoop
    from library.train.optim import build_optimizer
    from library.train.plan import EpochPlan
    from library.train.saving import OutputSettings, OutputWriter
    from library.fileio import write_text
    from library.train.interrupt import StopRequest
    from library.train.setup import (
        TrainedModules, build_adapter, check_output_dir, check_sharding, cpu_bf16_conv_warning, fill_deepspeed_config,
        parameter_groups, prepare_sd_model, prepare_trained, process_group_kwargs, resume_point, trained_modules,
    )
    from library.train.latents import training_latents
    from library.train.summary import run_summary
    from library.train.trainer import PFGTrainer, StepOptions

    output_dir = check_output_dir(settings)
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step (library/train/loop.py)
        log_with=trackers(settings),
        project_dir=settings.logging_dir or None,
        kwargs_handlers=process_group_kwargs(settings),
    )
    # the datasets' validation_split: the dataset TOML's, else --validation_split (its fallback)
    check_sharding(accelerator, replace(settings, validation_split=max(d.validation_split for d in dataset_config.datasets)))
    resume = resume_point(accelerator, settings, output_dir)
    if settings.full_fp16:
        from library.train.fp16 import allow_fp16_gradients

        allow_fp16_gradients(accelerator)
    set_seed(settings.seed)

    # 2. Images, buckets, captions and PFG vectors, checked against each folder's index (one
    # directory scan and one stat per cache; only what changed is opened).
    data_index = DatasetIndex(main=accelerator.is_local_main_process, say=accelerator.print)
    items, failures = collect_items(dataset_config, settings.pfg_prompt, data_index)
    for failure in failures:
        accelerator.print(f"skipped {failure.path}: {failure.reason}")
    if not items:
        raise UserError(f"{dataset_config.source}: no usable images found")
    ensure_features(dataset_config, settings, accelerator, data_index)
    features, encoder_id = load_feature_table(items, data_index)
    (items, features), (held_out, held_out_features) = split_validation(items, features, dataset_config, settings)
    accelerator.print(f"{len(items)} images, PFG vectors of width {features.shape[1]} ({encoder_id})"
                      + (f"; {len(held_out)} held out for validation" if held_out else ""))
    accelerator.print(format_bucket_table(bucket_counts(items)))
    plan = EpochPlan.for_run(items, [d.batch_size for d in dataset_config.datasets], settings, accelerator)

    # 3. Models.
    model = load_sd_model(settings.pretrained_model_name_or_path, settings.v_parameterization)
    if settings.vae:
        from library.models.checkpoints import load_vae

        model.vae = load_vae(settings.vae)
    # Before the VAE is cast to the training precision: caches are made (and validated) with the
    # VAE's own fp32 weights, so prepare_features.py's caches match whatever precision.
    latents = training_latents(items, model.vae, settings, accelerator, data_index)
    prepare_sd_model(model, settings, accelerator.device)
    warning = cpu_bf16_conv_warning(settings, model, bucket_counts(items), accelerator.device)
    if warning:
        accelerator.print(warning)
    prompt_encoder = model.prompt_encoder(settings.max_token_length, settings.clip_skip)
    if settings.pfg_pooled and not prompt_encoder.has_pooled:
        raise UserError(f"--pfg_pooled needs an SDXL model (a pooled text embedding); {settings.pretrained_model_name_or_path} is {model.variant}")
    pooled_dim = prompt_encoder.pooled_width if settings.pfg_pooled else 0
    adapter = build_adapter(settings, features.shape[1], model.cross_attention_dim, accelerator.device, pooled_dim)
    dataset = PFGDataset(items, features, latents, plan.total_steps())

    # 4. Optimizer, schedule, and accelerate's wrapping of what trains (one module: DeepSpeed
    # takes one, and DDP/FSDP sync gradients across its forward, which is the training step).
    optimizer = build_optimizer(settings.optimizer_type, parameter_groups(settings, adapter, model.unet), settings.optimizer_args)
    total_steps = plan.total_steps()
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps, num_training_steps=total_steps)
    fill_deepspeed_config(accelerator, max(plan.batch_sizes), settings.max_grad_norm)
    trained = TrainedModules(adapter, model.unet if settings.train_unet != "none" else None)
    prepared = prepare_trained(accelerator, trained, optimizer, lr_scheduler)
    live_model, live_adapter = trained_modules(accelerator, prepared, model)
    trainer = PFGTrainer(live_model, live_adapter, prompt_encoder,
                         StepOptions(settings.noise_offset, settings.min_snr_gamma, settings.pfg_dropout, settings.uncond))

    # 5. What the run writes, what it does between steps, and the loop.
    summary = run_summary(settings, items, dataset_config, plan, model, accelerator.num_processes)
    writer = OutputWriter(OutputSettings.from_settings(settings, output_dir), model, training_metadata(summary), encoder_id,
                          dataset_config.datasets[0].resolution)
    hooks = build_hooks(settings, accelerator, trainer, sample_requests, held_out, held_out_features, output_dir)
    if accelerator.num_processes > 1:
        # Each process draws its own noise, timesteps and dropouts from here on (with one seed every
        # GPU would pick the same timesteps at every step); the weights were made alike above, and
        # DDP starts every process from the main one's anyway. One process keeps its usual stream.
        set_seed(settings.seed, device_specific=True)
    stop = StopRequest(sys.argv[1:] if argv is None else list(argv), settings.save_on_signal_timeout, accelerator.print)
    loop = TrainLoop(accelerator, prepared, trainer, plan, dataset, writer, LoopOptions.from_settings(settings), hooks, stop)
    if resume is not None:
        loop.load_state(resume)
    if settings.sample_at_first:
        from library.train.samples import TrainingSamples

        next(hook for hook in hooks if isinstance(hook, TrainingSamples)).sample(f"{loop.progress.global_step:06d}")
    if accelerator.log_with:
        accelerator.init_trackers(settings.output_name, config={k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
    if accelerator.is_main_process:
        write_text(output_dir / f"{settings.output_name}-settings.toml", settings_to_toml(settings))
    accelerator.print(f"training {settings.train_unet!r} on {accelerator.num_processes} process(es): {total_steps} steps, {len(items)} images, "
                      f"{summary['ss_num_epochs']} epochs")
    left_out = plan.batches_left_out()
    if left_out:
        accelerator.print(f"each epoch leaves out {left_out} of its batches (a different draw each epoch), "
                          f"so that the {accelerator.num_processes} processes take equal shares")

    # 6. Train and save.
    started = time.time()
    written = loop.run()
    accelerator.print(f"done in {time.time() - started:.1f}s; wrote:")
    for path in written:
        accelerator.print(f"  {path}")
    return 0


def ensure_features(dataset_config, settings, accelerator, index) -> None:
    """With --tagger_model, bring the vector caches up to date with prepare_features.py's own job
    over the same dataset: it keeps the valid ones and recomputes missing ones, those of edited
    images and those of another encoder (each process takes its share, as when it runs alone)."""
    if not settings.tagger_model:
        return
    import torch

    from library.prepare.run import prepare_features
    from library.prepare.settings import PrepareSettings

    status = prepare_features(PrepareSettings(dataset_config=settings.dataset_config, train_data_dir=settings.train_data_dir,
                                              tagger_model=settings.tagger_model), dataset_config, index)
    # Every process learns of a failure in any share, or the others would wait for it forever.
    failed = accelerator.gather(torch.tensor([int(bool(status))], device=accelerator.device)).nonzero().flatten().tolist()
    if failed:
        where = "" if accelerator.num_processes == 1 else f" by process {', '.join(map(str, failed))}"
        raise UserError(f"some images could not be encoded (listed above{where}); fix or remove them, then train again")


def split_validation(items, features, dataset_config, settings):
    """((training items, vectors), (held-out items, vectors)) of the datasets' validation_split
    (the dataset TOML's, else --validation_split)."""
    from library.data.dataset import split_validation as split

    train, held = split(items, dataset_config, settings.seed)
    if held and len(held) < 2:
        raise UserError(f"validation_split holds out {len(held)} image of {len(items)}; the validation metrics compare at "
                        "least 2: raise validation_split")
    if held and not train:
        raise UserError(f"validation_split holds out all {len(items)} images; lower it")
    return ([items[i] for i in train], features[train]), ([items[i] for i in held], features[held])


def check_dataset_options(settings, dataset_config) -> None:
    """Dataset keys that need (or exclude) a training flag, said before any model loads."""
    subsets = [subset for _, subset in dataset_config.iter_subsets()]
    if settings.masked_loss and not any(s.alpha_mask for s in subsets):
        raise UserError("--masked_loss weighs the loss by the images' alpha channel: set alpha_mask = true in the subsets "
                        "whose images carry one, or pass --alpha_mask (kohya's conditioning_data_dir mask folders are "
                        "not supported)")
    varying = [s.name for s in subsets if s.varies_pixels]
    if (settings.cache_latents or settings.cache_latents_to_disk) and varying:
        raise UserError(f"random_crop and color_aug give each sample new pixels, which no latent cache can hold "
                        f"({', '.join(varying)}): drop --cache_latents/--cache_latents_to_disk or those keys, as kohya requires")


def debug_dataset(settings, dataset_config) -> int:
    """--debug_dataset: the first epoch's samples and their captions, then exit; no model loads."""
    from library.data.dataset import collect_items, split_validation as split
    from library.train.dataset_debug import debug_lines
    from library.train.plan import EpochPlan

    items, failures = collect_items(dataset_config, settings.pfg_prompt)
    for failure in failures:
        print(f"skipped {failure.path}: {failure.reason}")
    train, held = split(items, dataset_config, settings.seed)
    if held:
        print(f"{len(held)} images held out for validation are not listed")
    items = [items[i] for i in train]
    if not items:
        raise UserError(f"{dataset_config.source}: no usable images found")
    plan = EpochPlan(items, [d.batch_size for d in dataset_config.datasets], settings.seed, 1, 0,
                     settings.gradient_accumulation_steps, settings.max_train_steps, settings.max_train_epochs)
    for line in debug_lines(plan):
        print(line)
    return 0


def build_hooks(settings, accelerator, trainer, sample_requests, held_out, held_out_features, output_dir) -> list:
    """Training samples and validation, each over the weights as they are at that moment: the
    trainer's own modules, the prepared ones unwrapped, which the main process can run alone."""
    hooks = []
    if sample_requests:
        from library.models.image_encoders import load_encoder
        from library.sample.sampler import PFGSampler
        from library.train.samples import TrainingSamples

        encoder = load_encoder(settings.tagger_model, device=accelerator.device.type) if settings.tagger_model else None
        sampler = PFGSampler(trainer.model, trainer.adapter, encoder, trainer.prompt_encoder, settings.uncond, accelerator.device)
        hooks.append(TrainingSamples(sample_requests, settings.sample_every_n_steps, settings.sample_every_n_epochs,
                                     output_dir, settings.output_name, accelerator, sampler))
    if held_out:
        from library.evaluation.metrics import load_eval_samples
        from library.train.validation import TrainingValidation

        samples = load_eval_samples(held_out, held_out_features, trainer.model.vae)
        hooks.append(TrainingValidation(samples, settings.validation_every_n_steps, accelerator, trainer,
                                        settings.validation_timesteps, settings.validation_candidates, settings.seed))
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


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
