"""What a training run writes: the PFG file, the UNet (full mode) or its LoRA (lora mode), the
training state, and the rotation of intermediate saves. Names follow kohya: `NAME-step00000500-pfg.safetensors`,
`NAME-000002-pfg.safetensors` (epoch 2), `NAME-pfg.safetensors` (the end)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from library.fileio import remove_stale_temporaries
from library.metadata import modelspec
from library.models.loading import SDModel
from library.models.pfg import PFGAdapter, pfg_metadata, save_pfg

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def epoch_tag(epoch: int) -> str:
    return f"{epoch:06d}"


@dataclass(frozen=True)
class OutputSettings:
    """What a run writes, and where: the train_pfg.py options that shape the outputs."""

    output_dir: Path
    output_name: str
    train_unet: str  # none | full | lora
    save_model_as: str  # safetensors | ckpt | diffusers
    save_precision: str  # float | fp16 | bf16
    save_pfg_pt: bool
    save_last_n: int

    @classmethod
    def from_settings(cls, settings, output_dir: Path) -> "OutputSettings":
        return cls(output_dir, settings.output_name, settings.train_unet, settings.save_model_as, settings.save_precision,
                   settings.save_pfg_pt, settings.save_last_n)


class OutputWriter:
    """Writes the save points of one run. `base_metadata` is the run's `ss_*` summary, the same in
    every file; each save adds its step and epoch."""

    def __init__(self, outputs: OutputSettings, model: SDModel, base_metadata: dict[str, str], encoder_id: str,
                 resolution: tuple[int, int]):
        self.outputs = outputs
        self.model = model
        self.base_metadata = base_metadata
        self.encoder_id = encoder_id
        self.resolution = resolution
        self._history: list[list[Path]] = []  # intermediate save points, oldest first
        remove_stale_temporaries(outputs.output_dir)  # what a save killed mid-write left

    @property
    def output_dir(self) -> Path:
        return self.outputs.output_dir

    def _name(self, tag: str | None) -> str:
        return f"{self.outputs.output_name}-{tag}" if tag else self.outputs.output_name

    def _spec(self, kind: str) -> dict[str, str]:
        architecture = self.model.family.modelspec_architecture(self.model.v_prediction)
        return modelspec(architecture, self.model.v_prediction, kind, self.outputs.output_name, self.resolution)

    def _metadata(self, kind: str, adapter: PFGAdapter, extra: dict[str, str]) -> dict[str, str]:
        return {**self.base_metadata, **extra, **self._spec(kind), **pfg_metadata(adapter.shape, self.encoder_id)}

    def save(self, adapter: PFGAdapter, unet: torch.nn.Module, tag: str | None, progress: dict[str, int]) -> list[Path]:
        """Write one save point: the PFG file, and the UNet in full mode or its LoRA in lora mode."""
        dtype = SAVE_DTYPES[self.outputs.save_precision]
        name = self._name(tag)
        extra = {f"ss_{k}": str(v) for k, v in progress.items()}
        pfg_path = self.output_dir / f"{name}-pfg.safetensors"
        written = save_pfg(adapter, pfg_path, self._metadata("pfg", adapter, extra), dtype=dtype, save_pt=self.outputs.save_pfg_pt,
                           hashes=True)
        if self.outputs.train_unet == "full":
            written.append(self._save_unet(unet, name, dtype, self._metadata("", adapter, extra)))
        elif self.outputs.train_unet == "lora":
            written.append(self._save_lora(unet, name, dtype, extra))
        return written

    def _save_lora(self, unet: torch.nn.Module, name: str, dtype: torch.dtype, extra: dict[str, str]) -> Path:
        """NAME-lora.safetensors in kohya's layout: it loads alone in A1111, ComfyUI and diffusers."""
        from library.models.lora import save_lora

        return save_lora(self.output_dir / f"{name}-lora.safetensors", unet, dtype, {**self.base_metadata, **extra, **self._spec("lora")})

    def _save_unet(self, unet: torch.nn.Module, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        import diffusers

        # The model's own scheduler class and config (it carries the prediction type).
        config = self.model.scheduler_config
        scheduler = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler).from_config(config)
        family = self.model.family
        if self.outputs.save_model_as == "diffusers":
            return family.save_diffusers(self.output_dir / name, self.model, unet, scheduler, dtype)
        return family.save_single_file(self.output_dir / f"{name}.{self.outputs.save_model_as}", self.model, unet, dtype,
                                       metadata, scheduler)

    def rotate(self, written: list[Path]) -> None:
        """Keep only the last --save_last_n intermediate save points (0 keeps all)."""
        self._history.append(written)
        while self.outputs.save_last_n > 0 and len(self._history) > self.outputs.save_last_n:
            for path in self._history.pop(0):
                remove_output(path)

    def state_dir(self, tag: str | None) -> Path:
        return self.output_dir / f"{self._name(tag)}-state"


def remove_output(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
