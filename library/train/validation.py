"""Validation during training (`--validation_split`): on held-out images, the fixed-timestep
denoising loss and the conditioning gain (loss with other images' vectors minus with the
image's own), computed by library/evaluation/metrics.py — the same code as eval_pfg.py."""
from __future__ import annotations

from library.evaluation.metrics import EvalSample, evaluate_denoising


class TrainingValidation:
    def __init__(self, samples: list[EvalSample], every_n_steps: int, accelerator, trainer,
                 timesteps: int, candidates: int, seed: int):
        self.samples = samples
        self.every_n_steps = every_n_steps
        self.accelerator = accelerator
        self.trainer = trainer  # the run's PFGTrainer, over the live (unwrapped) modules
        self.timesteps = timesteps
        self.candidates = candidates
        self.seed = seed
        self.history: list[dict] = []
        self.last_step: int | None = None

    def after_step(self, step: int) -> None:
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.run(step)

    def after_epoch(self, epoch: int, step: int) -> None:
        """Validation follows steps, not epochs."""

    def at_end(self, step: int) -> None:
        if self.last_step != step:
            self.run(step)

    def run(self, step: int) -> dict | None:
        """Main process only, on unwrapped modules (no collective calls); seeded noise, so the
        training RNG is untouched."""
        self.accelerator.wait_for_everyone()
        self.last_step = step  # on every process (history is the main one's): all must agree on at_end
        if not self.accelerator.is_main_process:
            return None
        trainer = self.trainer
        modes = [(m, m.training) for m in (trainer.model.unet, trainer.adapter)]
        for module, _ in modes:
            module.eval()
        try:
            with self.accelerator.autocast():
                report = evaluate_denoising(trainer, self.samples, self.timesteps, min(self.candidates, len(self.samples)), self.seed, n_boot=500)
        finally:
            for module, mode in modes:
                module.train(mode)
        values = {
            "val/loss": report.loss_own, "val/loss_shuffled": report.loss_shuffled, "val/gain": report.gain.mean,
            "val/gain_low": report.gain.low, "val/gain_high": report.gain.high, "val/retrieval_top1": report.retrieval.top1,
        }
        self.accelerator.log(values, step=step)
        self.accelerator.print(
            f"validation @ step {step}: loss {report.loss_own:.4f}, conditioning gain {report.gain.mean:+.4f} "
            f"[{report.gain.low:+.4f}, {report.gain.high:+.4f}], retrieval {report.retrieval.top1:.2f} "
            f"(chance {report.retrieval.chance:.2f})"
        )
        self.history.append({"step": step, **values})
        return values
