"""Build tiny WD-style taggers: a real ViT architecture with random weights, exported to ONNX
with the interface of SmilingWolf's WD taggers, so feature extraction is tested offline.

Two families with different interfaces:
- "vit-v2" (default): like wd-v1-4-vit-tagger-v2 — input `input_1:0`, NHWC, 448x448,
  pooled D=768, output `predictions_sigmoid`.
- "nchw-1024": another interface on purpose — input `input`, NCHW, 384x384, pooled D=1024,
  output `output`.
- "v3-matmul": like the timm-exported v3 taggers — input `input`, NHWC 448, pooled D=1024,
  output `output`, and a classifier head of MatMul + Add + Sigmoid instead of Gemm + Sigmoid
  (`head="matmul"`, also available to any family through build_tiny_tagger).
All take BGR float32 0–255 (the WD convention) and convert internally. The pooled vector
exists only inside the graph, as the data input of the final classifier MatMul/Gemm.

    python -m tools.make_tiny_tagger --out models/tiny-tagger [--family nchw-1024]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make `library` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library import quiet  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.fileio import atomic_dir  # noqa: E402

MARKER = ".complete"
CONFIG_FILE = "tagger_config.json"
WEIGHTS_FILE = "torch_model.pt"


@dataclass(frozen=True)
class TaggerConfig:
    image_size: int = 448
    embed_dim: int = 768  # pooled vector size D
    layout: str = "NHWC"
    input_name: str = "input_1:0"
    output_name: str = "predictions_sigmoid"
    num_tags: int = 64  # 4 rating tags, then general tags, then character tags
    patch_size: int = 32
    width: int = 64  # transformer width; kept small so export and inference take milliseconds
    depth: int = 2
    heads: int = 4
    head: str = "gemm"  # classifier op in the ONNX: "gemm" (Gemm) or "matmul" (MatMul + Add)
    seed: int = 0


FAMILIES: dict[str, dict] = {
    "vit-v2": {},
    "nchw-1024": dict(image_size=384, embed_dim=1024, layout="NCHW", input_name="input", output_name="output"),
    "v3-matmul": dict(embed_dim=1024, input_name="input", output_name="output", head="matmul"),
    # wd-v1-4-vit-tagger-v2's size (ViT-B/16 at 448, random weights): for benchmarks, not tests
    "vit-b-v2": dict(patch_size=16, width=768, depth=12, heads=12, num_tags=9083),
}

RATING_TAGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL_TAGS = [
    "1girl", "solo", "long_hair", "short_hair", "smile", "looking_at_viewer", "blush", "open_mouth",
    "blue_eyes", "red_eyes", "brown_hair", "black_hair", "blonde_hair", "white_background",
    "simple_background", "outdoors", "sky", "shirt", "dress", "hat", "school_uniform", "bow",
    "closed_eyes", "upper_body", "full_body", "standing", "sitting", "holding", "jewelry", "gloves",
    "hair_ornament", "ribbon", "1boy", "multiple_girls", "day", "night", "tree", "flower",
]
CHARACTER_TAGS = ["alice_(demo)", "bob_(demo)", "carol_(demo)", "dave_(demo)", "eve_(demo)", "frank_(demo)"]


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP), as in ViT."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTagger(nn.Module):
    """BGR 0–255 image -> patch embedding -> transformer -> LayerNorm + mean pool (D) -> sigmoid tags."""

    def __init__(self, cfg: TaggerConfig):
        super().__init__()
        self.cfg = cfg
        tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, cfg.width) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg.width, cfg.heads) for _ in range(cfg.depth)])
        self.proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.classifier = nn.Linear(cfg.embed_dim, cfg.num_tags)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        x = x.flip(1) / 127.5 - 1.0  # BGR 0–255 -> RGB -1..1, inside the model like the real taggers
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.proj(self.blocks(x)))
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(x)
        if self.cfg.head == "matmul":  # exports as MatMul + Add (a 2-D Linear exports as Gemm)
            return torch.sigmoid(torch.matmul(pooled, self.classifier.weight.t()) + self.classifier.bias)
        return torch.sigmoid(self.classifier(pooled))


def input_shape(cfg: TaggerConfig, batch: int) -> tuple[int, int, int, int]:
    s = cfg.image_size
    return (batch, s, s, 3) if cfg.layout == "NHWC" else (batch, 3, s, s)


def tag_rows(num_tags: int) -> list[tuple[int, str, int, int]]:
    """(tag_id, name, category, count) rows: ratings (9), general (0), then characters (4)."""
    n_char = max(1, min(len(CHARACTER_TAGS), num_tags // 8))
    n_general = num_tags - len(RATING_TAGS) - n_char
    if n_general < 1:
        raise ValueError(f"num_tags must be at least {len(RATING_TAGS) + 2}")
    general = [GENERAL_TAGS[i] if i < len(GENERAL_TAGS) else f"tag_{i:03d}" for i in range(n_general)]
    named = [(n, 9) for n in RATING_TAGS] + [(n, 0) for n in general] + [(n, 4) for n in CHARACTER_TAGS[:n_char]]
    return [(9999999 - i, name, cat, 100000 // (i + 1)) for i, (name, cat) in enumerate(named)]


def build_model(cfg: TaggerConfig) -> TinyTagger:
    torch.manual_seed(cfg.seed)
    return TinyTagger(cfg).eval()


def load_torch_tagger(folder: Path) -> TinyTagger:
    """The torch model a kit folder was exported from (for tests comparing against the ONNX)."""
    folder = Path(folder)
    cfg = TaggerConfig(**json.loads((folder / CONFIG_FILE).read_text()))
    model = TinyTagger(cfg).eval()
    model.load_state_dict(torch.load(folder / WEIGHTS_FILE, weights_only=True))
    return model


def _export(model: TinyTagger, path: Path) -> None:
    cfg = model.cfg
    example = torch.zeros(input_shape(cfg, 2))  # batch 2 so the exporter cannot specialise on 1
    with warnings.catch_warnings():  # the exporter's own deprecation note says nothing about our model
        quiet.ignore_warnings()
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            input_names=[cfg.input_name],
            output_names=[cfg.output_name],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            external_data=False,
            optimize=True,
            verbose=False,
        )


def build_tiny_tagger(
    out_dir: Path,
    seed: int = 0,
    image_size: int | None = None,
    embed_dim: int | None = None,
    layout: str | None = None,
    input_name: str | None = None,
    num_tags: int | None = None,
    family: str = "vit-v2",
    head: str | None = None,
) -> Path:
    """Write model.onnx, selected_tags.csv, torch_model.pt and tagger_config.json into out_dir.

    Unset arguments come from the family preset. Deterministic from the seed; a second call with
    the same settings returns at once (marker file); the folder appears atomically.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tagger family {family!r}; choose from {sorted(FAMILIES)}")
    overrides = dict(image_size=image_size, embed_dim=embed_dim, layout=layout, input_name=input_name, num_tags=num_tags, head=head)
    settings = {**FAMILIES[family], **{k: v for k, v in overrides.items() if v is not None}, "seed": seed}
    cfg = TaggerConfig(**settings)
    if cfg.layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be NHWC or NCHW, got {cfg.layout!r}")
    if cfg.head not in ("gemm", "matmul"):
        raise ValueError(f"head must be gemm or matmul, got {cfg.head!r}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size must be a multiple of {cfg.patch_size}")

    out_dir = Path(out_dir)
    fingerprint = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()
    marker = out_dir / MARKER
    if marker.is_file() and marker.read_text() == fingerprint:
        return out_dir

    write_tagger_folder(out_dir, build_model(cfg), tag_rows(cfg.num_tags), fingerprint)
    return out_dir


def write_tagger_folder(out_dir: Path, model: TinyTagger, rows: list[tuple[int, str, int, int]], fingerprint: str) -> None:
    """The tagger folder, atomically: model.onnx, selected_tags.csv (the WD columns), the torch
    weights and config the tests compare against, and the marker a rebuild checks."""
    with atomic_dir(out_dir) as tmp:
        _export(model, tmp / "model.onnx")
        torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(model.cfg), indent=2))
        with open(tmp / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["tag_id", "name", "category", "count"])
            writer.writerows(rows)
        (tmp / MARKER).write_text(fingerprint)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build a tiny WD-style ONNX tagger folder (offline, seconds).")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--family", default="vit-v2", choices=sorted(FAMILIES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = build_tiny_tagger(args.out, seed=args.seed, family=args.family)
    print(f"tiny tagger written to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
