"""SDXL's text conditioning: two text encoders and the pooled bigG vector (the size/crop time ids
come with each sample: library/data/dataset.py sdxl_time_ids).

Both encoders see the same 75-token chunks (one tokenization: the vocabularies are the same,
only the padding differs — CLIP-L pads with EOS, bigG with "!"). Each chunk's states are the
penultimate hidden layer of CLIP-L and of bigG, without the final layer norm, concatenated to
width C (768 + 1280 = 2048 on real SDXL), as SDXL was trained and as diffusers, kohya and A1111
compute them; chunks are concatenated along the sequence as for SD1/SD2. The pooled vector is
bigG's projected EOS state of the first chunk. `--clip_skip` 1 and 2 both mean that penultimate
layer (kohya ignores clip skip for SDXL); k > 2 takes hidden_states[-k] of both encoders.
"""
from __future__ import annotations

from typing import Any

import torch

from library.errors import UserError
from library.models.text import PromptEncoder, apply_emphasis


class SDXLPromptEncoder(PromptEncoder):
    """PromptEncoder for SDXL: `encode` gives the (B, 77*n, C) states; `encode_pooled` adds the
    (B, P) pooled vectors the UNet takes as `text_embeds`."""

    has_pooled = True

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, tokenizer_2: Any, text_encoder_2: torch.nn.Module,
                 max_token_length: int = 75, clip_skip: int = 1):
        super().__init__(tokenizer, text_encoder, max_token_length, 1)
        layers = min(text_encoder.config.num_hidden_layers, text_encoder_2.config.num_hidden_layers)
        if not 1 <= clip_skip <= layers:
            raise UserError(f"--clip_skip must be between 1 and {layers}, the text encoders' layer count (got {clip_skip})")
        self.clip_skip = clip_skip
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.pad_2 = tokenizer_2.pad_token_id if tokenizer_2.pad_token_id is not None else self.eos

    @property
    def width(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def pooled_width(self) -> int:
        return self.text_encoder_2.config.projection_dim

    def _ids_2(self, ids: torch.Tensor) -> torch.Tensor:
        """The same chunks padded as bigG's tokenizer pads: "!" after the first EOS."""
        is_eos = ids == self.eos
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
        return torch.where(after_eos, torch.full_like(ids, self.pad_2), ids)

    def encode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 77) ids -> states (N, 77, C) and pooled vectors (N, P)."""
        layer = -max(2, self.clip_skip)
        first = self.text_encoder(input_ids=ids.to(self.text_encoder.device), output_hidden_states=True)
        second = self.text_encoder_2(input_ids=self._ids_2(ids).to(self.text_encoder_2.device), output_hidden_states=True)
        h1, h2 = first.hidden_states[layer], second.hidden_states[layer]
        return torch.cat([h1, h2.to(h1)], dim=-1), second.text_embeds

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode_ids(ids)[0]

    def encode_pooled(self, prompts: list[str], weighted: bool = False, num_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (B, 77 * n_chunks, C) states and (B, P) pooled vectors (of the first chunk)."""
        chunks = self.tokenize(prompts, weighted, num_chunks)
        b, n, length = chunks.ids.shape
        z, pooled = self.encode_ids(chunks.ids.reshape(b * n, length))
        z = z.reshape(b, n, length, -1)
        if weighted:
            z = apply_emphasis(z, chunks.weights)
        return z.reshape(b, n * length, -1), pooled.reshape(b, n, -1)[:, 0]
