"""The questions every stage asks a model family, answered for the SD1.x shape by default."""
from __future__ import annotations

from pathlib import Path

import torch


class ModelFamily:
    name = ""  # "sd1" | "sd2" | "sdxl": SDModel.variant, metadata, messages
    base_model_version = ""  # kohya's ss_base_model_version
    # LoRA layer names: kohya names SD1/SD2 layers by their diffusers module paths, SDXL layers by
    # the original (SGM) checkpoint keys.
    lora_names_from_original_keys = False
    vae_overflows_in_fp16 = False  # SDXL's VAE: decode NaNs in fp16 unless a fixed VAE is given

    def owns_unet_config(self, config) -> bool:
        raise NotImplementedError

    def modelspec_architecture(self, v_prediction: bool) -> str:
        """Stability's modelspec architecture id of this family's checkpoints."""
        raise NotImplementedError

    # -- conditioning ----------------------------------------------------------------------
    def prompt_encoder(self, model, max_token_length: int = 75, clip_skip: int = 1):
        """The text strategy: prompts -> (states, pooled or None), chunked, clip-skipped, weighted."""
        from library.models.text import PromptEncoder

        return PromptEncoder(model.tokenizer, model.text_encoder, max_token_length, clip_skip)

    def unet_conditions(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None,
                        image_size: tuple[int, int], batch_size: int) -> dict | None:
        """The UNet's inputs beside the context (diffusers' added_cond_kwargs), or None."""
        return None

    # -- files -------------------------------------------------------------------------------
    def save_single_file(self, path: Path, model, unet: torch.nn.Module, dtype: torch.dtype, metadata: dict[str, str],
                         scheduler) -> Path:
        """A full checkpoint in the original layout A1111 and ComfyUI load."""
        raise NotImplementedError

    def save_diffusers(self, folder: Path, model, unet: torch.nn.Module, scheduler, dtype: torch.dtype) -> Path:
        raise NotImplementedError

    # -- generation --------------------------------------------------------------------------
    def pipeline(self, model, scheduler, img2img: bool):
        """The diffusers pipeline around the model's modules (no safety checker, no watermark)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} family>"
