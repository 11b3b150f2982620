"""One PFG training step, split into the few pieces a model family overrides.

`call_unet` is where the PFG tokens join the text states; `training_target` is where epsilon
and v-prediction differ. Everything else (data, saving, the loop) lives elsewhere.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.models.loading import SDModel
from library.models.pfg import PFGAdapter, append_tokens, uncond_tokens
from library.models.text import PromptEncoder

TEXT_CACHE_SIZE = 512  # captions; ~120 MB of SD1.x states in fp32


@dataclass(frozen=True)
class StepOptions:
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    pfg_dropout: float = 0.0
    uncond: str = "zeros"


class PFGTrainer:
    def __init__(self, model: SDModel, adapter: PFGAdapter, prompt_encoder: PromptEncoder, options: StepOptions):
        self.model = model
        self.adapter = adapter
        self.prompt_encoder = prompt_encoder
        self.options = options
        self.noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self._alphas_cumprod = self.noise_scheduler.alphas_cumprod
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- the pieces -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text states of the captions. The text encoder is frozen, so states are remembered per
        caption: PFG usually trains on one fixed prompt, which is then encoded once. Each caption
        is encoded on its own so its states never depend on what else was in the batch."""
        for caption in dict.fromkeys(captions):
            if caption in self._text_cache:
                self._text_cache.move_to_end(caption)
            else:
                self._text_cache[caption] = self.prompt_encoder.encode([caption])[0]
                if len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[c] for c in captions])

    def dropout_mask(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Which samples see the unconditional padding instead of their PFG tokens (--pfg_dropout)."""
        if self.options.pfg_dropout <= 0:
            return None
        return torch.rand(batch_size, device=device) < self.options.pfg_dropout

    def pfg_tokens(self, features: torch.Tensor, text_states: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.adapter(features)
        if drop is not None:
            # Teach the model the branch CFG uses at inference: some samples see the padding.
            padding = uncond_tokens(self.options.uncond, text_states, tokens.shape[1]).to(tokens)
            tokens = torch.where(drop.to(tokens.device)[:, None, None], padding, tokens)
        return tokens

    def added_conditions(self, batch: dict, features: torch.Tensor, drop: torch.Tensor | None) -> dict | None:
        """Extra UNet inputs beside the context (SDXL's pooled text and time ids); none for SD1/SD2."""
        return None

    def call_unet(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor, tokens: torch.Tensor,
                  added: dict | None = None) -> torch.Tensor:
        context = append_tokens(text_states, tokens)
        unet = self.model.unet
        dtype = next(unet.parameters()).dtype
        # SDXL's time ids stay fp32: bf16 would round sizes above 256 (1999 -> 2000) before the UNet embeds them.
        kwargs = {"added_cond_kwargs": {k: v if k == "time_ids" else v.to(dtype) for k, v in added.items()}} if added else {}
        return unet(noisy.to(dtype), timesteps, encoder_hidden_states=context.to(dtype), **kwargs).sample

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.model.v_prediction:
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ (Hang et al. 2023): weight = min(SNR, γ)/SNR, or /(SNR+1) for v-prediction."""
        alphas = self._alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.options.min_snr_gamma)
        return clipped / (snr + 1) if self.model.v_prediction else clipped / snr

    # -- the step ---------------------------------------------------------------------------

    def loss(self, batch: dict, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising loss of one batch. `timesteps`/`noise` may be fixed (validation)."""
        latents = batch["latents"] if "latents" in batch else self.encode_latents(batch["pixels"])
        device = latents.device
        if noise is None:
            noise = torch.randn_like(latents)
            if self.options.noise_offset > 0:
                noise = noise + self.options.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text_states = self.encode_text(batch["captions"])
        features = batch["features"].to(device)
        drop = self.dropout_mask(features.shape[0], device)
        tokens = self.pfg_tokens(features, text_states, drop)
        prediction = self.call_unet(noisy, timesteps, text_states, tokens, self.added_conditions(batch, features, drop))
        target = self.training_target(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.options.min_snr_gamma > 0:
            per_sample = per_sample * self.snr_weights(timesteps)
        return per_sample.mean()
