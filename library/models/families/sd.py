"""SD1.x (CLIP ViT-L text encoder, 768 wide) and SD2.x (OpenCLIP ViT-H, 1024 wide, "!" padding):
one text encoder, no extra UNet inputs, the LDM single-file layout of library/models/checkpoints.py."""
from __future__ import annotations

from pathlib import Path


from library.models.families.base import ModelFamily


class SDFamily(ModelFamily):
    linear_projection = False  # SD2's transformer blocks project in and out with Linear layers, SD1's with 1x1 convs

    def owns_unet_config(self, config) -> bool:
        return (getattr(config, "addition_embed_type", None) != "text_time"
                and bool(getattr(config, "use_linear_projection", False)) == self.linear_projection)

    def save_single_file(self, path, model, unet, dtype, metadata, scheduler) -> Path:
        from library.models.checkpoints import save_single_file

        return save_single_file(path, unet, model.vae, model.text_encoder, self.name, dtype, metadata, scheduler)

    def save_diffusers(self, folder, model, unet, scheduler, dtype) -> Path:
        from library.models.checkpoints import save_diffusers

        return save_diffusers(folder, unet, model.vae, model.text_encoder, model.tokenizer, scheduler, dtype)

    def pipeline(self, model, scheduler, img2img: bool):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
        return cls(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class SD1Family(SDFamily):
    name = "sd1"
    base_model_version = "sd1"

    def modelspec_architecture(self, v_prediction: bool) -> str:
        return "stable-diffusion-v1"


class SD2Family(SDFamily):
    name = "sd2"
    base_model_version = "sd2"
    linear_projection = True

    def modelspec_architecture(self, v_prediction: bool) -> str:
        return "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"


SD1 = SD1Family()
SD2 = SD2Family()
