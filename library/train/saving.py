"""What a training run writes: the PFG file, the UNet (full mode) or its LoRA (lora mode), the
training state, and the rotation of intermediate saves. Names follow kohya: `NAME-step00000500-pfg.safetensors`,
`NAME-000002-pfg.safetensors` (epoch 2), `NAME-pfg.safetensors` (the end)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.metadata import modelspec, with_hashes
from library.models.loading import SDModel
from library.models.pfg import PFGAdapter, pfg_metadata, save_pfg

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def epoch_tag(epoch: int) -> str:
    return f"{epoch:06d}"


@dataclass
class OutputWriter:
    output_dir: Path
    output_name: str
    model: SDModel
    train_unet: str
    save_model_as: str
    save_precision: str
    save_pfg_pt: bool
    save_last_n: int
    base_metadata: dict[str, str]  # ss_* training settings
    encoder_id: str
    resolution: tuple[int, int]
    _history: list[list[Path]] = field(default_factory=list)

    def _name(self, tag: str | None) -> str:
        return f"{self.output_name}-{tag}" if tag else self.output_name

    def _metadata(self, kind: str, adapter: PFGAdapter, extra: dict[str, str]) -> dict[str, str]:
        spec = modelspec(self.model.variant, self.model.v_prediction, kind, self.output_name, self.resolution)
        return {**self.base_metadata, **extra, **spec, **pfg_metadata(adapter.shape, self.encoder_id)}

    def save(self, adapter: PFGAdapter, unet: torch.nn.Module, tag: str | None, progress: dict[str, int]) -> list[Path]:
        """Write one save point: the PFG file, and the UNet in full mode."""
        dtype = SAVE_DTYPES[self.save_precision]
        name = self._name(tag)
        extra = {f"ss_{k}": str(v) for k, v in progress.items()}
        pfg_path = self.output_dir / f"{name}-pfg.safetensors"
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter.state_dict().items()}
        meta = with_hashes(tensors, self._metadata("pfg", adapter, extra))
        written = save_pfg(adapter, pfg_path, meta, dtype=dtype, save_pt=self.save_pfg_pt)
        if self.train_unet == "full":
            written.append(self._save_unet(unet, name, dtype, self._metadata("", adapter, extra)))
        elif self.train_unet == "lora":
            written.append(self._save_lora(unet, name, dtype, extra))
        return written

    def _save_lora(self, unet: torch.nn.Module, name: str, dtype: torch.dtype, extra: dict[str, str]) -> Path:
        """NAME-lora.safetensors in kohya's layout: it loads alone in A1111, ComfyUI and diffusers."""
        from library.models.lora import save_lora

        spec = modelspec(self.model.variant, self.model.v_prediction, "lora", self.output_name, self.resolution)
        return save_lora(self.output_dir / f"{name}-lora.safetensors", unet, dtype, {**self.base_metadata, **extra, **spec})

    def _save_unet(self, unet: torch.nn.Module, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        import diffusers

        from library.models.checkpoints import save_diffusers, save_single_file

        # The model's own scheduler class and config (it carries the prediction type).
        config = self.model.scheduler_config
        scheduler = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler).from_config(config)
        path = self.output_dir / f"{name}.{self.save_model_as}"
        if self.model.is_sdxl:
            from library.models.sdxl_checkpoint import save_sdxl_diffusers, save_sdxl_single_file

            m = self.model
            if self.save_model_as == "diffusers":
                return save_sdxl_diffusers(self.output_dir / name, unet, m.vae, m.text_encoder, m.text_encoder_2,
                                           m.tokenizer, m.tokenizer_2, scheduler, dtype)
            return save_sdxl_single_file(path, unet, m.vae, m.text_encoder, m.text_encoder_2, dtype, metadata, scheduler)
        if self.save_model_as == "diffusers":
            return save_diffusers(self.output_dir / name, unet, self.model.vae, self.model.text_encoder,
                                  self.model.tokenizer, scheduler, dtype)
        return save_single_file(path, unet, self.model.vae, self.model.text_encoder, self.model.variant, dtype, metadata, scheduler)

    def rotate(self, written: list[Path]) -> None:
        """Keep only the last --save_last_n intermediate save points (0 keeps all)."""
        self._history.append(written)
        while self.save_last_n > 0 and len(self._history) > self.save_last_n:
            for path in self._history.pop(0):
                remove_output(path)

    def state_dir(self, tag: str | None) -> Path:
        return self.output_dir / f"{self._name(tag)}-state"


def remove_output(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
