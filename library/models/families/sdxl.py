"""SDXL (Illustrious, NoobAI, Pony, ...): two text encoders whose penultimate states join to width
2048, the pooled bigG embedding and the size/crop time ids as extra UNet inputs, the SGM
single-file layout of library/models/sdxl_checkpoint.py, and kohya's SGM-named LoRA layers."""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.families.base import ModelFamily


def generation_time_ids(width: int, height: int) -> list[int]:
    """What SDXL pipelines condition on by default: an uncropped image of the requested size."""
    return [height, width, 0, 0, height, width]


class SDXLFamily(ModelFamily):
    name = "sdxl"
    base_model_version = "sdxl_base_v1-0"  # kohya's value: A1111 files a LoRA under SDXL when it starts with "sdxl_"
    lora_names_from_original_keys = True
    vae_overflows_in_fp16 = True

    def owns_unet_config(self, config) -> bool:
        return getattr(config, "addition_embed_type", None) == "text_time"

    def modelspec_architecture(self, v_prediction: bool) -> str:
        return "stable-diffusion-xl-v1-base"

    def prompt_encoder(self, model, max_token_length: int = 75, clip_skip: int = 1):
        from library.models.text_sdxl import SDXLPromptEncoder

        return SDXLPromptEncoder(model.tokenizer, model.text_encoder, model.tokenizer_2, model.text_encoder_2,
                                 max_token_length, clip_skip)

    def unet_conditions(self, pooled, time_ids, image_size, batch_size):
        """The pooled text embedding and the time ids; a batch made without the bucketer
        (evaluation) conditions on an uncropped image of its own size."""
        if time_ids is None:
            width, height = image_size
            time_ids = torch.tensor([generation_time_ids(width, height)] * batch_size)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, torch.float32)}

    def save_single_file(self, path, model, unet, dtype, metadata, scheduler) -> Path:
        from library.models.sdxl_checkpoint import save_sdxl_single_file

        return save_sdxl_single_file(path, unet, model.vae, model.text_encoder, model.text_encoder_2, dtype, metadata, scheduler)

    def save_diffusers(self, folder, model, unet, scheduler, dtype) -> Path:
        from library.models.sdxl_checkpoint import save_sdxl_diffusers

        return save_sdxl_diffusers(folder, unet, model.vae, model.text_encoder, model.text_encoder_2, model.tokenizer,
                                   model.tokenizer_2, scheduler, dtype)

    def pipeline(self, model, scheduler, img2img: bool):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        return cls(vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                   tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler,
                   add_watermarker=False)


SDXL = SDXLFamily()
