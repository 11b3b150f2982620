"""The shape of a run: which batches each process takes in each epoch, how many optimizer steps
an epoch makes and how many the run makes. Known before any model loads, so the schedule, the
metadata and the loop all read the same numbers."""
from __future__ import annotations

import math
from dataclasses import dataclass

from library.data.dataset import SampleKey, TrainItem, at_steps, epoch_batches
from library.errors import UserError


@dataclass(frozen=True)
class EpochPlan:
    items: list[TrainItem]
    batch_sizes: list[int]  # per dataset
    seed: int
    num_processes: int
    process_index: int
    gradient_accumulation_steps: int
    max_train_steps: int
    max_train_epochs: int  # > 0 overrides max_train_steps

    @classmethod
    def for_run(cls, items: list[TrainItem], batch_sizes: list[int], settings, accelerator) -> "EpochPlan":
        return cls(items, batch_sizes, settings.seed, accelerator.num_processes, accelerator.process_index,
                   settings.gradient_accumulation_steps, settings.max_train_steps, settings.max_train_epochs)

    def batches_for_epoch(self, epoch: int) -> list[list[SampleKey]]:
        """This process's share of the epoch: batch k goes to process k mod world size."""
        batches = epoch_batches(self.items, self.batch_sizes, self.seed, epoch)
        per_process = len(batches) // self.num_processes  # equal counts keep DDP processes in step
        if per_process == 0:
            raise UserError(f"the dataset gives {len(batches)} batches per epoch, fewer than the {self.num_processes} processes")
        share = batches[self.process_index :: self.num_processes][:per_process]
        # each key learns the optimizer step it trains at: kohya's token warmup reads it
        return at_steps(share, epoch * math.ceil(per_process / self.gradient_accumulation_steps), self.gradient_accumulation_steps)

    def batches_left_out(self) -> int:
        """Batches of an epoch no process takes (fewer than the process count; others each epoch)."""
        return len(epoch_batches(self.items, self.batch_sizes, self.seed, 0)) % self.num_processes

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.batches_for_epoch(0)) / self.gradient_accumulation_steps)

    def total_steps(self) -> int:
        if self.max_train_epochs > 0:
            return self.max_train_epochs * self.steps_per_epoch()
        return self.max_train_steps
