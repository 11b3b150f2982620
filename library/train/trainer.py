"""One PFG training step: the denoising loss of a batch, with the PFG tokens after the text states.

`call_unet` is where the PFG tokens join the text states; `training_target` is where epsilon
and v-prediction differ; the model family (library/models/families) supplies the text strategy
and any extra UNet inputs (SDXL's pooled embedding and size/crop time ids). Everything else
(data, saving, the loop) lives elsewhere.

A trainer is built once, over the modules that train as accelerate prepared them (the PFG head
and, in full and lora modes, the UNet inside the prepared TrainedModules), and never rebound.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

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
    def __init__(self, model: SDModel, adapter: PFGAdapter, prompt_encoder: PromptEncoder, options: StepOptions,
                 _text_cache: OrderedDict | None = None):
        self.model = model
        self.adapter = adapter
        self.prompt_encoder = prompt_encoder
        self.options = options
        self.noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self._alphas_cumprod = self.noise_scheduler.alphas_cumprod
        # caption -> (states, pooled or None); shared with the copies for_evaluation makes
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = (
            OrderedDict() if _text_cache is None else _text_cache)

    def for_evaluation(self) -> "PFGTrainer":
        """The same step over the same modules without the training choices (PFG dropout,
        Min-SNR weighting): the plain denoising loss the metrics compare (library/evaluation)."""
        options = replace(self.options, pfg_dropout=0.0, min_snr_gamma=0.0)
        return PFGTrainer(self.model, self.adapter, self.prompt_encoder, options, self._text_cache)

    # -- the pieces -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text states of the captions, and their pooled vectors where the family has them (SDXL).
        The text encoders are frozen, so both are remembered per caption: PFG usually trains on
        one fixed prompt, which is then encoded once. Each caption is encoded on its own so its
        states never depend on what else was in the batch."""
        for caption in dict.fromkeys(captions):
            if caption in self._text_cache:
                self._text_cache.move_to_end(caption)
            else:
                states, pooled = self.prompt_encoder.encode_pooled([caption])
                self._text_cache[caption] = (states[0], None if pooled is None else pooled[0])
                if len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
        entries = [self._text_cache[c] for c in captions]
        states = torch.stack([s for s, _ in entries])
        pooled = None if entries[0][1] is None else torch.stack([p for _, p in entries])
        return states, pooled

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

    def added_conditions(self, batch: dict, latents: torch.Tensor, pooled: torch.Tensor | None, features: torch.Tensor,
                         drop: torch.Tensor | None) -> dict | None:
        """The family's UNet inputs beside the context. With a pooled text embedding (SDXL), the
        PFG head's pooled output (`--pfg_pooled`) is added to it, except where PFG is dropped."""
        if pooled is not None:
            pooled = pooled.to(features.device)
            extra = getattr(self.adapter, "module", self.adapter).pooled(features)  # unwrapped from a wrapper
            if extra is not None:
                if drop is not None:  # the unconditional branch has no PFG addition
                    extra = torch.where(drop.to(extra.device)[:, None], torch.zeros_like(extra), extra)
                pooled = pooled + extra.to(pooled.dtype)
        size = tuple(side * self.model.vae_scale_factor for side in latents.shape[-1:-3:-1])  # (width, height)
        return self.model.family.unet_conditions(pooled, batch.get("time_ids"), size, latents.shape[0])

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
        text_states, pooled = self.encode_text(batch["captions"])
        features = batch["features"].to(device)
        drop = self.dropout_mask(features.shape[0], device)
        tokens = self.pfg_tokens(features, text_states, drop)
        prediction = self.call_unet(noisy, timesteps, text_states, tokens, self.added_conditions(batch, latents, pooled, features, drop))
        target = self.training_target(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        if "masks" in batch:  # kohya's masked loss: the alpha mask, scaled to the latents by area, weighs each element
            loss = loss * F.interpolate(batch["masks"].to(loss)[:, None], size=loss.shape[2:], mode="area")
        per_sample = loss.mean(dim=(1, 2, 3))
        if self.options.min_snr_gamma > 0:
            per_sample = per_sample * self.snr_weights(timesteps)
        return per_sample.mean()
