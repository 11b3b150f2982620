"""SDXL through every stage, on the tiny SDXL-architecture model (issue 8)."""
from __future__ import annotations

import json

import torch


def test_tiny_sdxl_kit_is_an_sdxl_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert len(pipe.vae.config.block_out_channels) == 4
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
