"""The PFG training step for SDXL: the UNet also takes the pooled bigG text embedding and the
size/crop time ids (`added_cond_kwargs`), and the PFG head may add a learned vector to the pooled
embedding (`--pfg_pooled`). The tokens themselves join the text states exactly as for SD1/SD2."""
from __future__ import annotations

import torch

from library.models.loading import SDModel
from library.models.pfg import PFGAdapter
from library.models.text import PromptEncoder
from library.models.text_sdxl import SDXLPromptEncoder, generation_time_ids
from library.train.trainer import TEXT_CACHE_SIZE, PFGTrainer, StepOptions


class SDXLTrainer(PFGTrainer):
    def __init__(self, model: SDModel, adapter: PFGAdapter, prompt_encoder: SDXLPromptEncoder, options: StepOptions):
        super().__init__(model, adapter, prompt_encoder, options)
        self._pooled_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """States as the base class; the pooled vector of each caption is remembered beside them."""
        for caption in dict.fromkeys(captions):
            if caption in self._text_cache:
                self._text_cache.move_to_end(caption)
            else:
                states, pooled = self.prompt_encoder.encode_pooled([caption])
                self._text_cache[caption], self._pooled_cache[caption] = states[0], pooled[0]
                if len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._pooled_cache.pop(self._text_cache.popitem(last=False)[0])
        return torch.stack([self._text_cache[c] for c in captions])

    def added_conditions(self, batch: dict, features: torch.Tensor, drop: torch.Tensor | None) -> dict:
        self.encode_text(batch["captions"])  # a no-op when loss() just encoded them
        pooled = torch.stack([self._pooled_cache[c] for c in batch["captions"]]).to(features.device)
        extra = getattr(self.adapter, "module", self.adapter).pooled(features)  # unwrapped from DDP
        if extra is not None:
            if drop is not None:  # the unconditional branch has no PFG addition
                extra = torch.where(drop.to(extra.device)[:, None], torch.zeros_like(extra), extra)
            pooled = pooled + extra.to(pooled.dtype)
        if "time_ids" in batch:
            ids = batch["time_ids"]
        else:  # batches made without the bucketer (evaluation): an uncropped image of the latents' size
            h, w = (side * self.model.vae_scale_factor for side in batch["latents"].shape[-2:])
            ids = torch.tensor([generation_time_ids(w, h)] * features.shape[0])
        return {"text_embeds": pooled, "time_ids": ids.to(features.device, torch.float32)}


def make_trainer(model: SDModel, adapter: PFGAdapter, prompt_encoder: PromptEncoder, options: StepOptions) -> PFGTrainer:
    """The training step for this model family."""
    if model.is_sdxl:
        return SDXLTrainer(model, adapter, prompt_encoder, options)
    return PFGTrainer(model, adapter, prompt_encoder, options)
