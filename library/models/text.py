"""Prompts -> the UNet's text conditioning for SD1.x/SD2.x.

CLIP sees at most 77 positions, so long prompts are split into 75-token chunks, each wrapped in
BOS ... EOS and padded to 77, encoded separately and concatenated along the sequence axis (what
A1111 and kohya sd-scripts do). Generation may weight tokens with A1111's `(word:1.3)` syntax.

`PromptEncoder` is the small per-model strategy: `tokenize` (text -> token chunks) and
`encode_tokens` (chunks -> states) are separate so an SDXL variant can run one tokenization
through two encoders and join their states.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError

CHUNK_TOKENS = 75  # text tokens per chunk; with BOS and EOS that fills CLIP's 77 positions
CHUNK_LENGTH = CHUNK_TOKENS + 2
MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya's --max_token_length choices

# A1111 modules/prompt_parser.py: escapes, brackets, ":weight)" and runs of plain text.
_RE_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention emits for the BREAK keyword


def _number(text: str | None) -> float | None:
    """The weight in "(a:1.3)"; None when absent or malformed ("(a:.)" crashes A1111, is text here)."""
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs with A1111's emphasis syntax.

    `(a)` x1.1, `[a]` /1.1, `(a:1.3)` x1.3, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are
    literals, unclosed brackets apply to the rest of the prompt, stray closers are text, and a
    `BREAK` keyword becomes `("BREAK", -1.0)` (a forced chunk boundary). Adjacent fragments of
    equal weight are merged; an empty prompt gives `[("", 1.0)]`.
    """
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_range(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        piece, factor = m.group(0), _number(m.group(1))
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif factor is not None and round_open:
            multiply_range(round_open.pop(), factor)
        elif piece == ")" and round_open:
            multiply_range(round_open.pop(), 1.1)
        elif piece == "]" and square_open:
            multiply_range(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])

    for start in round_open:  # unclosed brackets reach to the end, as in A1111
        multiply_range(start, 1.1)
    for start in square_open:
        multiply_range(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]

    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, float(w)) for t, w in merged]


@dataclass(frozen=True)
class TokenChunks:
    """Token ids and per-token weights, (B, n_chunks, 77) each; specials and padding weigh 1.0."""

    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return self.ids.shape[1]


class PromptEncoder:
    """Tokenizer + CLIP text encoder for SD1.x/SD2.x with chunking, clip skip and weighting.

    `max_token_length` (75/150/225) fixes the training chunk count (max_token_length / 75) so
    every batch has the same length; longer captions are truncated, as kohya does.
    """

    has_pooled = False  # whether encode_pooled gives pooled vectors (SDXL's encoder does)

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, max_token_length: int = 75, clip_skip: int = 1):
        if max_token_length not in MAX_TOKEN_LENGTHS:
            raise UserError(f"--max_token_length must be one of 75, 150, 225 (got {max_token_length})")
        layers = text_encoder.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise UserError(
                f"--clip_skip must be between 1 and {layers}, the text encoder's layer count (got {clip_skip})"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_token_length = max_token_length
        self.clip_skip = clip_skip
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # SD1 pads with EOS; SD2's tokenizer pads with "!" (id 0) after the first EOS.
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    @property
    def num_chunks(self) -> int:
        """Chunks per prompt in training: max_token_length / 75."""
        return self.max_token_length // CHUNK_TOKENS

    @property
    def width(self) -> int:
        """C, the width of each state (the UNet's cross-attention width)."""
        return self.text_encoder.config.hidden_size

    def _segments(self, prompt: str, weighted: bool) -> list[list[tuple[int, float]]]:
        """(token id, weight) runs of one prompt; BREAK separates runs that start new chunks."""
        if not weighted:  # training captions: brackets are literal text, as in kohya
            return [[(t, 1.0) for t in self._token_ids([prompt])[0]]]
        parsed = parse_prompt_attention(prompt)
        segments: list[list[tuple[int, float]]] = [[]]
        for (text, weight), ids in zip(parsed, self._token_ids([t for t, _ in parsed])):
            if (text, weight) == BREAK:
                segments.append([])
            else:
                segments[-1].extend((t, weight) for t in ids)
        return segments

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        # No truncation here: we chunk ourselves (verbose=False silences the >77 warning).
        return self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def _chunks(self, prompt: str, weighted: bool) -> list[list[tuple[int, float]]]:
        """75-token pieces of a prompt. Like A1111, BREAK always closes the current chunk
        (even an empty one), and a trailing empty segment adds nothing unless it is the only one."""
        segments = self._segments(prompt, weighted)
        chunks: list[list[tuple[int, float]]] = []
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            n = math.ceil(len(seg) / CHUNK_TOKENS)
            if not last or not chunks:
                n = max(n, 1)
            chunks += [seg[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS] for k in range(n)]
        return chunks

    def chunks_needed(self, prompts: list[str], weighted: bool = False) -> int:
        """Chunks the longest prompt needs (at least 1): pass it as `num_chunks` in generation,
        counting the negative prompts too so both CFG branches have equal length."""
        return max([len(self._chunks(p, weighted)) for p in prompts] + [1])

    def tokenize(self, prompts: list[str], weighted: bool = False, num_chunks: int | None = None) -> TokenChunks:
        """Token chunks for `prompts`: BOS + up to 75 tokens + EOS + pad to 77, per chunk.

        `num_chunks=None` uses the training count (max_token_length / 75). Prompts needing fewer
        chunks get empty ones (BOS EOS pad...); prompts needing more are truncated.
        """
        n = self.num_chunks if num_chunks is None else num_chunks
        if n < 1:
            raise ValueError(f"num_chunks must be at least 1 (got {n})")
        ids = torch.full((len(prompts), n, CHUNK_LENGTH), self.pad, dtype=torch.long)
        weights = torch.ones((len(prompts), n, CHUNK_LENGTH), dtype=torch.float32)
        for b, prompt in enumerate(prompts):
            chunks = self._chunks(prompt, weighted)[:n]
            chunks += [[]] * (n - len(chunks))
            for c, chunk in enumerate(chunks):
                ids[b, c, 0] = self.bos
                ids[b, c, len(chunk) + 1] = self.eos
                if chunk:
                    ids[b, c, 1 : len(chunk) + 1] = torch.tensor([t for t, _ in chunk])
                    weights[b, c, 1 : len(chunk) + 1] = torch.tensor([w for _, w in chunk])
        return TokenChunks(ids, weights)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, 77) ids -> (N, 77, C). clip_skip k>1 takes hidden_states[-k] through the final
        layer norm, as NovelAI/A1111/kohya do (the UNet was trained on normalized states)."""
        ids = ids.to(next(self.text_encoder.parameters()).device)
        if self.clip_skip == 1:
            return self.text_encoder(input_ids=ids).last_hidden_state
        out = self.text_encoder(input_ids=ids, output_hidden_states=True)
        # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under .text_model
        final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_norm(out.hidden_states[-self.clip_skip])

    def encode_tokens(self, chunks: TokenChunks, weighted: bool = False) -> torch.Tensor:
        """Encode every chunk in one batched pass and concatenate: (B, 77 * n_chunks, C)."""
        b, n, length = chunks.ids.shape
        z = self.hidden_states(chunks.ids.reshape(b * n, length)).reshape(b, n, length, -1)
        if weighted:
            z = apply_emphasis(z, chunks.weights)
        return z.reshape(b, n * length, -1)

    def encode_pooled(self, prompts: list[str], weighted: bool = False, num_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(states, pooled vectors): SD1/SD2 have no pooled text embedding, so None; SDXL's
        encoder gives bigG's (B, P) vectors. Callers that need both use this one method."""
        return self.encode(prompts, weighted, num_chunks), None

    def encode(self, prompts: list[str], weighted: bool = False, num_chunks: int | None = None) -> torch.Tensor:
        """Prompts -> (B, 77 * n_chunks, C) states in the text encoder's dtype and device.

        `weighted=True` parses A1111 emphasis and BREAK (generation); `False` treats the prompt
        as plain text (training captions). `num_chunks` as in `tokenize`.
        """
        return self.encode_tokens(self.tokenize(prompts, weighted, num_chunks), weighted)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis on (B, n, 77, C) states: scale each token's state by its weight,
    then restore each chunk's mean. Per prompt (not per batch) so batch mates do not interact."""
    zf = z.float()
    w = weights.to(zf.device)[..., None]
    before = zf.mean(dim=(-2, -1), keepdim=True)
    zf = zf * w
    after = zf.mean(dim=(-2, -1), keepdim=True)
    # A mean of ~0 (e.g. a final layer norm without bias) makes the ratio meaningless:
    # keep the weighted states as they are rather than divide by zero.
    ratio = torch.where(after.abs() > 1e-6, before / after, torch.ones_like(after))
    return (zf * ratio).to(z.dtype)


def last_token_states(states: torch.Tensor) -> torch.Tensor:
    """The state at the final sequence position, (B, 1, C): what `--uncond eos` repeats."""
    return states[:, -1:, :]
