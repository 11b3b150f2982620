"""Preparing models for a training run: what is frozen, in which dtype, on which device, and
the optimizer's parameter groups. One function per decision, called in order by train_pfg.py."""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from library.errors import UserError
from library.models.lora import LoraShape, add_unet_lora
from library.models.attention import set_attention_backend
from library.models.loading import SDModel, move
from library.models.pfg import PFGAdapter, PFGShape, check_compatible, load_pfg
from library.train.settings import TrainSettings

PRECISION_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_sd_model(model: SDModel, settings: TrainSettings, device: torch.device) -> None:
    """Freeze the VAE and text encoder (kept in the autocast dtype to save memory); the UNet
    trains in fp32 (or bf16/fp16 with --full_bf16/--full_fp16), or is frozen too with --train_unet none. With
    --train_unet lora the UNet is frozen in the autocast dtype and only its LoRA layers train."""
    frozen_dtype = PRECISION_DTYPES[settings.mixed_precision]
    for module in (model.vae, model.text_encoder, model.text_encoder_2):
        if module is None:  # text_encoder_2 exists only for SDXL
            continue
        module.requires_grad_(False)
        module.eval()
        # SDXL's VAE overflows in fp16 (its config says force_upcast): it encodes in fp32, unless
        # --vae gave a fixed (fp16-safe) one, which follows the training precision; --no_half_vae keeps any VAE in fp32.
        fp32_vae = module is model.vae and (settings.no_half_vae or (getattr(module.config, "force_upcast", False)
                                                                     and not settings.vae and frozen_dtype == torch.float16))
        move(module, device, torch.float32 if fp32_vae else frozen_dtype)
    train_unet = settings.train_unet == "full"
    model.unet.requires_grad_(train_unet)
    trained_dtype = PRECISION_DTYPES[settings.trained_precision]  # fp32, or bf16/fp16 with --full_bf16/--full_fp16
    unet_dtype = trained_dtype if train_unet else frozen_dtype
    move(model.unet, device, unet_dtype)
    if settings.train_unet == "lora":
        add_unet_lora(model.unet, lora_shape(settings), trained_dtype, settings.network_weights)
    set_attention_backend(model.unet, settings.attention)
    if settings.gradient_checkpointing:
        # Also useful with a frozen UNet: gradients still flow through it to the PFG tokens.
        model.unet.enable_gradient_checkpointing()
    model.unet.train(settings.train_unet != "none" or settings.gradient_checkpointing)


def cpu_bf16_conv_warning(settings: TrainSettings, model: SDModel, buckets, device: torch.device) -> str | None:
    """A warning, or None. On the CPU, oneDNN's bf16 weight gradient of a stride-2 conv whose
    input is 1 pixel wide reads uninitialised memory (torch 2.13): the gradient is garbage, NaN
    when that memory held NaNs. The UNet's last downsampler gets such an input from buckets whose
    latent width is at most 2^(downsamplers - 1); it matters only when that conv's weights train."""
    if device.type != "cpu" or settings.mixed_precision != "bf16":
        return None
    if not (settings.train_unet == "full" or (settings.train_unet == "lora" and settings.network_conv_dim > 0)):
        return None
    downsamplers = sum(1 for block in model.unet.down_blocks if getattr(block, "downsamplers", None))
    if downsamplers == 0:
        return None
    limit = model.vae_scale_factor * 2 ** (downsamplers - 1)  # image pixels
    narrow = [f"{w}x{h}" for w, h in buckets if w <= limit]
    if not narrow:
        return None
    return (f"warning: bf16 training on the CPU with buckets {limit} px wide or narrower (here {', '.join(narrow)}): "
            "PyTorch's CPU bf16 kernel computes a wrong weight gradient for the UNet's last downsampler at that "
            "width, which can turn the loss into NaN; use --mixed_precision no on the CPU, or raise min_bucket_reso")


def lora_shape(settings: TrainSettings) -> LoraShape:
    return LoraShape(settings.network_dim, settings.network_alpha, settings.network_conv_dim, settings.network_conv_alpha)


def build_adapter(settings: TrainSettings, input_dim: int, cross_attention_dim: int, device: torch.device,
                  pooled_dim: int = 0) -> PFGAdapter:
    """A fresh PFG head, or the one in --resume_pfg (checked against the encoder and the UNet).
    `pooled_dim` > 0 (SDXL with --pfg_pooled) adds the pooled-embedding output."""
    if settings.resume_pfg:
        adapter, _ = load_pfg(settings.resume_pfg, cross_attention_dim)
        check_compatible(adapter, settings.resume_pfg, input_dim, cross_attention_dim)
        if adapter.shape.num_tokens != settings.pfg_num_tokens:
            print(f"--resume_pfg has {adapter.shape.num_tokens} tokens; using that instead of --pfg_num_tokens {settings.pfg_num_tokens}")
    else:
        adapter = PFGAdapter(PFGShape(settings.pfg_num_tokens, input_dim, cross_attention_dim, settings.pfg_hidden_dim, pooled_dim))
    return adapter.to(device, dtype=PRECISION_DTYPES[settings.trained_precision])


def parameter_groups(settings: TrainSettings, adapter: PFGAdapter, unet: torch.nn.Module) -> list[dict]:
    """Separate learning rates: the small PFG head learns faster than the UNet."""
    groups = [{"params": list(adapter.parameters()), "lr": settings.pfg_learning_rate, "name": "pfg"}]
    if settings.train_unet != "none":  # the whole UNet, or only its LoRA layers (the rest is frozen)
        groups.append({"params": [p for p in unet.parameters() if p.requires_grad], "lr": settings.learning_rate, "name": settings.train_unet})
    return groups


def process_group_kwargs(settings: TrainSettings) -> list:
    """--ddp_timeout: how long a process waits for the others in a collective (a process that died
    or hangs) before the run stops with torch.distributed's timeout error, instead of forever."""
    if not settings.ddp_timeout:
        return []
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(minutes=settings.ddp_timeout))]


def resume_point(accelerator, settings: TrainSettings, output_dir: Path) -> Path | None:
    """Tidy what an interrupted save of this run left in the output folder (main process), then the
    state --resume names (`latest`: the newest complete one), the same on every process."""
    from library.train.state import clean_interrupted_saves, resolve_resume

    if accelerator.is_main_process:
        for line in clean_interrupted_saves(output_dir, settings.output_name):
            print(line)
    accelerator.wait_for_everyone()
    return resolve_resume(settings.resume, output_dir, settings.output_name)


def check_output_dir(settings: TrainSettings) -> Path:
    """The output folder, made if needed and proven writable before any model loads."""
    import tempfile

    from library.fileio import WriteFailed, failures_said

    out = Path(settings.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    try:
        with failures_said(out / ".write-check"):
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=f".{settings.output_name}-write-check."):
                pass
    except WriteFailed as e:
        reason = str(e).split(": ", 1)[1]  # "cannot write PATH: REASON (SPACE)"
        raise UserError(f"--output_dir {out}: cannot write there: {reason}") from None
    return out


class TrainedModules(torch.nn.Module):
    """What trains, as the one module accelerate prepares: the PFG head (`adapter`) and, in full
    and lora modes, the UNet (`unet`); state dict keys are `adapter.*` and `unet.*`.

    One module because DeepSpeed takes a single model, and because DDP and FSDP synchronise
    gradients only across a forward through their wrapper: `forward(batch, loss)` is the whole
    training step, the trainer's loss (library/train/trainer.py), built over these very children
    as accelerate left them (see `trained_modules`)."""

    def __init__(self, adapter: PFGAdapter, unet: torch.nn.Module | None):
        super().__init__()
        self.adapter = adapter
        if unet is not None:
            self.unet = unet

    @property
    def trains_unet(self) -> bool:
        return "unet" in self._modules

    def forward(self, batch: dict, loss: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        return loss(batch)

    def meta_copy(self) -> "TrainedModules":
        """The same modules with weightless (meta) tensors: a template that `load_state_dict(...,
        assign=True)` fills with gathered full weights for saving, at no memory cost until then."""
        memo = {}
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else empty
        return TrainedModules(copy.deepcopy(self.adapter, memo), copy.deepcopy(self.unet, memo) if self.trains_unet else None)


@dataclass(frozen=True)
class PreparedTraining:
    """What accelerate.prepare returned for a run, and the weightless copy saving fills."""

    model: torch.nn.Module  # the TrainedModules, wrapped for DDP/FSDP/DeepSpeed
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    save_template: TrainedModules | None  # main process only: a weightless copy (see meta_copy)


def check_sharding(accelerator, settings: TrainSettings) -> None:
    """What sharded training cannot do with these settings, said before models load.

    Training samples and validation run the UNet on the main process alone. Under FSDP or
    DeepSpeed ZeRO-3 each process holds only a shard of the weights, and a forward pass gathers
    them from every process: alone, the main process would wait forever. And FSDP1 flattens the
    wrapped module's weights into one tensor that must be all trainable or all frozen, unless
    use_orig_params: a LoRA beside the frozen UNet needs it."""
    from accelerate.utils import DistributedType

    sharded = None
    if accelerator.distributed_type == DistributedType.FSDP:
        sharded = "FSDP"
        plugin = accelerator.state.fsdp_plugin if settings.train_unet == "lora" else None
        if plugin is not None and plugin.fsdp_version == 1 and not plugin.use_orig_params:
            raise UserError("--train_unet lora under FSDP trains LoRA weights beside the frozen UNet in one wrapped module, "
                            "which FSDP1 allows only with use_orig_params: set fsdp_use_orig_params: true in the "
                            "accelerate config, or use FSDP2 (fsdp_version: 2)")
    elif accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        sharded = "DeepSpeed ZeRO-3"
    hooks = [flag for flag, on in (("--sample_prompts", settings.sample_prompts), ("--validation_split", settings.validation_split)) if on]
    if sharded and hooks:
        raise UserError(
            f"{' and '.join(hooks)} run the model on the main process alone, which {sharded} (weights sharded across "
            "processes) cannot do; train with DDP or DeepSpeed ZeRO-1/2 for them, or sample the saved checkpoints "
            "with gen_pfg.py and measure them with eval_pfg.py"
        )


def fill_deepspeed_config(accelerator, batch_size: int, max_grad_norm: float) -> None:
    """accelerate reads DeepSpeed's micro batch size from the dataloaders it prepares; ours are
    built per epoch (bucketed), so where the DeepSpeed config says "auto" the batch size and the
    clipping norm (DeepSpeed clips by itself) are given here."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    if plugin.is_auto("gradient_clipping"):
        plugin.deepspeed_config["gradient_clipping"] = max_grad_norm


def prepare_trained(accelerator, trained: TrainedModules, optimizer, lr_scheduler) -> PreparedTraining:
    """accelerate.prepare over one TrainedModules (DDP, FSDP or DeepSpeed wrap it as a whole), the
    optimizer and the schedule. The template (main process only) is the weightless copy saving
    fills, taken before any wrapper can shard the weights."""
    template = trained.meta_copy() if accelerator.is_main_process else None
    model, optimizer, lr_scheduler = accelerator.prepare(trained, optimizer, lr_scheduler)
    return PreparedTraining(model, optimizer, lr_scheduler, template)


def trained_modules(accelerator, prepared: PreparedTraining, model: SDModel) -> tuple[SDModel, PFGAdapter]:
    """The model and PFG head as they train: the prepared module's own children (FSDP may have
    replaced them by its wrappers), unwrapped from DDP/DeepSpeed, so that the trainer, training
    samples and validation all run the live weights. `model` itself is left as it was."""
    inner = accelerator.unwrap_model(prepared.model)
    return (dataclasses.replace(model, unet=inner.unet) if inner.trains_unet else model), inner.adapter
