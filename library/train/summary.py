"""What a run records about itself: the kohya-style `ss_*` values written into every output's
metadata (and logged to the trackers)."""
from __future__ import annotations

import math
import time
from pathlib import Path

from library.data.dataset import TrainItem, bucket_counts
from library.data.dataset_config import DatasetConfig
from library.models.loading import SDModel
from library.train.plan import EpochPlan


def run_summary(settings, items: list[TrainItem], dataset_config: DatasetConfig, plan: EpochPlan, model: SDModel,
                num_processes: int) -> dict:
    """The `ss_*` metadata written into every output."""
    total_steps = plan.total_steps()
    return {
        "ss_output_name": settings.output_name,
        "ss_training_started_at": int(time.time()),
        "ss_sd_model_name": Path(settings.pretrained_model_name_or_path).name,
        "ss_base_model_version": model.family.base_model_version,
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
        "ss_num_batches_per_epoch": len(plan.batches_for_epoch(0)),
        "ss_num_epochs": math.ceil(total_steps / max(1, plan.steps_per_epoch())),
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
        "ss_dataset_dirs": {str(s.metadata_file or s.image_dir): {"n_repeats": s.num_repeats} for _, s in dataset_config.iter_subsets()},
        "ss_bucket_info": {f"{w}x{h}": n for (w, h), n in sorted(bucket_counts(items).items())},
    }
