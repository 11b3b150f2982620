"""Sample images during training (`--sample_prompts FILE --sample_every_n_steps N`), through the
same sampler as gen_pfg.py, over the live weights. Every image draws its noise from its own
seeded generator (library/sample/sampler.py), never from the global random state, so a run with
samples trains exactly like a run without them (tests/test_train.py checks both)."""
from __future__ import annotations

from pathlib import Path

import torch

from library.sample.image_outputs import save_png
from library.sample.prompt_file import read_prompt_file
from library.sample.sampler import PFGSampler, SampleRequest, a1111_parameters, canonical_sampler


def read_sample_requests(prompt_file: str, resolution: tuple[int, int], sampler: str) -> list[SampleRequest]:
    """Parsed at start-up, so a bad prompt file fails before any model loads."""
    defaults = SampleRequest(prompt="", width=resolution[0], height=resolution[1], steps=20, scale=7.0, seed=0,
                             sampler=canonical_sampler(sampler))  # kohya's --sample_sampler names (k_euler_a) too
    return read_prompt_file(prompt_file, defaults)


class TrainingSamples:
    def __init__(self, requests: list[SampleRequest], every_n_steps: int, every_n_epochs: int, out_dir: Path,
                 output_name: str, accelerator, sampler: PFGSampler):
        self.requests = requests
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.out_dir = out_dir
        self.output_name = output_name
        self.accelerator = accelerator
        self.sampler = sampler  # over the trainer's own (unwrapped, live) modules

    def after_step(self, step: int) -> None:
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.sample(f"{step:06d}")

    def after_epoch(self, epoch: int, step: int) -> None:
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self.sample(f"e{epoch:06d}")

    def at_end(self, step: int) -> None:
        """Samples are periodic only, as in kohya."""

    def sample(self, label: str) -> list[Path]:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return []
        sampler = self.sampler
        trained = [m for m in (sampler.model.unet, sampler.adapter) if m is not None]
        modes = [m.training for m in trained]
        written = []
        try:
            for m in trained:
                m.eval()
            with torch.no_grad(), self.accelerator.autocast():
                for index, request in enumerate(self.requests):
                    request = sampler.sized(request)
                    (image, seed), = sampler.generate(request, 1)
                    path = self.out_dir / "sample" / f"{self.output_name}_{label}_{index:02d}_{seed}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    written.append(save_png(image, path, a1111_parameters(request, seed, self.output_name, self.output_name)))
        finally:
            for m, mode in zip(trained, modes):
                m.train(mode)
        return written
