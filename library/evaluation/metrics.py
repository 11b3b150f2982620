"""How strongly a PFG model follows its guide image, measured on held-out images.

The public API, shared by eval_pfg.py and the trainer's validation:

    samples = load_eval_samples(items, features, vae)          # held-out TrainItems -> latents
    report = evaluate_denoising(trainer, samples, timesteps=8, candidates=8, seed=0)
    report.gain          # Interval: mean denoising loss with others' vectors minus with its own
    report.retrieval     # Retrieval: how often its own vector gives the lowest loss (vs 1/K)

    generation_retrieval(generated_vectors, guide_vectors)   # CLIP-I style, after generating; .per_guide(n)

library/evaluation/report.py turns these into eval_pfg.py's table and eval.json.

The building blocks are public too: `eval_timesteps`, `candidate_sets`, `denoising_losses`,
`conditioning_gain` (bootstrap interval), `denoising_retrieval`, `cosine_matrix`.

Every comparison is paired: an image is noised once per timestep with seeded noise, and only
the PFG vector changes between candidates, so differences come from the conditioning alone.
The text is each image's own caption for every candidate. Losses use `PFGTrainer.loss`, the
training objective itself, through `trainer.for_evaluation()`: PFG dropout and Min-SNR weighting off.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

# -- samples --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSample:
    name: str
    latents: torch.Tensor  # (4, h, w), scaled as the trainer uses them
    feature: torch.Tensor  # (D,)
    caption: str


def load_eval_samples(items: list, features: torch.Tensor, vae: torch.nn.Module) -> list[EvalSample]:
    """Held-out `TrainItem`s (library.data.dataset) and their vectors -> samples, encoding latents once
    (valid `*_sd.npz` caches are read instead). No flips, no caption shuffling."""
    from library.data.latents import cache_latents

    jobs = [item.latent_job(flip=False) for item in items]
    latents = cache_latents(jobs, vae, to_disk=False, progress=False)
    return [
        EvalSample(item.image_path.name, latents[k][0].float(), features[k].float(), item.caption)
        for k, item in enumerate(items)
    ]


# -- statistics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # 2.5th percentile of the bootstrap
    high: float  # 97.5th percentile

    @property
    def above_zero(self) -> bool:
        return self.low > 0


@dataclass(frozen=True)
class Retrieval:
    top1: float  # fraction of images whose own vector ranks first
    chance: float  # 1 / number of candidates

    @property
    def ratio(self) -> float:
        return self.top1 / self.chance


def conditioning_gain(losses_own: torch.Tensor, losses_shuffled: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> Interval:
    """Mean of (shuffled - own) per image, with a percentile bootstrap 95% interval over images
    (images are the independent unit; timesteps and candidates are averaged within one)."""
    diff = (losses_shuffled.double() - losses_own.double()).cpu().numpy().reshape(-1)
    if diff.size == 0:
        raise ValueError("conditioning_gain needs at least one image")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(diff.mean()), float(low), float(high))


def denoising_retrieval(losses: torch.Tensor) -> Retrieval:
    """`losses` (images, K) with the own vector in column 0: top-1 = own loss strictly lowest."""
    own = losses[:, :1]
    others = losses[:, 1:]
    hits = (own < others).all(dim=1) if others.shape[1] else torch.ones(len(losses), dtype=torch.bool)
    return Retrieval(float(hits.float().mean()), 1.0 / losses.shape[1])


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return a @ b.T


@dataclass(frozen=True)
class SimilarityReport:
    own_similarity: float  # mean cosine of a generated image to its own guide
    other_similarity: float  # mean cosine to the other guides
    retrieval: Retrieval  # its own guide is the most similar one, among all guides
    owners: tuple[int, ...]  # generated image r was made from guide owners[r]
    nearest: tuple[int, ...]  # the guide most similar to generated image r

    def per_guide(self, num_guides: int) -> list[tuple[int, int]]:
        """(hits, images) of each guide: an overall top-1 can hide a guide that never works."""
        counts = [[0, 0] for _ in range(num_guides)]
        for owner, nearest in zip(self.owners, self.nearest):
            counts[owner][0] += int(owner == nearest)
            counts[owner][1] += 1
        return [(hits, images) for hits, images in counts]


def generation_retrieval(generated: torch.Tensor, guides: torch.Tensor, owners: torch.Tensor | None = None) -> SimilarityReport:
    """Row r of `generated` was made from guide owners[r] (default: guide r). Cosine similarities
    in one encoder's space; top-1 among all n guides against chance 1/n (IP-Adapter's CLIP-I, plus
    retrieval). Several images per guide average out the luck of single seeds."""
    sim = cosine_matrix(generated, guides)
    rows, n = sim.shape
    owners = torch.arange(rows) if owners is None else owners
    own = sim[torch.arange(rows), owners]
    other = (sim.sum() - own.sum()) / max(1, rows * (n - 1))
    nearest = sim.argmax(dim=1)
    hits = nearest == owners
    return SimilarityReport(
        float(own.mean()), float(other), Retrieval(float(hits.float().mean()), 1.0 / n),
        tuple(owners.tolist()), tuple(nearest.tolist()),
    )


# -- denoising losses -----------------------------------------------------------------------


def eval_timesteps(count: int, num_train_timesteps: int = 1000) -> list[int]:
    """`count` timesteps evenly across the schedule, at the centres of equal bins."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def candidate_sets(num_images: int, k: int, seed: int) -> torch.Tensor:
    """(images, K) indices: column 0 the image itself, then K-1 distinct other images (seeded)."""
    k = max(1, min(k, num_images))
    rng = random.Random(f"candidates/{seed}")
    rows = []
    for i in range(num_images):
        others = [j for j in range(num_images) if j != i]
        rows.append([i, *rng.sample(others, k - 1)])
    return torch.tensor(rows, dtype=torch.long)


def _noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def denoising_losses(trainer, samples: list[EvalSample], candidates: torch.Tensor, timesteps: list[int], seed: int) -> torch.Tensor:
    """(images, K) mean denoising loss of image i conditioned on sample candidates[i, j]'s
    vector, over `timesteps`, with noise fixed per (seed, image) and shared by its candidates."""
    # The metric must see every vector and compare plain losses: PFG dropout and Min-SNR weighting
    # (training choices) are off in this copy of the step, so validation and eval_pfg.py agree.
    trainer = trainer.for_evaluation()
    param = next(trainer.model.unet.parameters())
    t = torch.tensor(timesteps, dtype=torch.long, device=param.device)
    losses = torch.zeros(candidates.shape, dtype=torch.float64)
    for i, sample in enumerate(samples):
        latents = sample.latents.to(param.device, torch.float32).expand(len(timesteps), *sample.latents.shape)
        noise = _noise(tuple(latents.shape), seed, i).to(param.device)
        captions = [sample.caption] * len(timesteps)
        for j, c in enumerate(candidates[i].tolist()):
            features = samples[c].feature[None].expand(len(timesteps), -1)
            batch = {"latents": latents, "features": features, "captions": captions}
            losses[i, j] = float(trainer.loss(batch, timesteps=t, noise=noise))
    return losses


@dataclass(frozen=True)
class DenoisingReport:
    timesteps: list[int]
    candidates: int
    loss_own: float
    loss_shuffled: float
    gain: Interval
    retrieval: Retrieval


def evaluate_denoising(trainer, samples: list[EvalSample], timesteps: int = 8, candidates: int = 8, seed: int = 0, n_boot: int = 1000) -> DenoisingReport:
    """Conditioning gain and denoising retrieval of `samples` (at least 2), in one pass."""
    if len(samples) < 2:
        raise ValueError("the conditioning metrics need at least 2 held-out images")
    steps = eval_timesteps(timesteps, trainer.noise_scheduler.config.num_train_timesteps)
    sets = candidate_sets(len(samples), candidates, seed)
    losses = denoising_losses(trainer, samples, sets, steps, seed)
    own, shuffled = losses[:, 0], losses[:, 1:].mean(dim=1)
    return DenoisingReport(
        steps, sets.shape[1], float(own.mean()), float(shuffled.mean()),
        conditioning_gain(own, shuffled, n_boot, seed), denoising_retrieval(losses),
    )
