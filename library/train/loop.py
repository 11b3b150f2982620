"""The training loop: epochs of bucketed batches, optimizer steps through accelerate, save
points, resumable state and progress display. The step itself is `PFGTrainer.loss`, run as the
forward of the prepared TrainedModules (library/train/setup.py)."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.data.dataset import PFGDataset, collate
from library.errors import UserError
from library.fileio import replace_dir
from library.fileio import write_json
from library.train.plan import EpochPlan
from library.train.saving import OutputWriter, epoch_tag, step_tag
from library.train.setup import PreparedTraining
from library.train.settings import STATE_FILE


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (0-based)
    global_step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # batches of this process consumed in the current epoch


@dataclass(frozen=True)
class LoopOptions:
    seed: int
    max_grad_norm: float
    save_every_n_steps: int
    save_every_n_epochs: int
    save_state: bool
    dataloader_workers: int

    @classmethod
    def from_settings(cls, settings) -> "LoopOptions":
        return cls(settings.seed, settings.max_grad_norm, settings.save_every_n_steps, settings.save_every_n_epochs,
                   settings.save_state, settings.dataloader_workers)


class TrainingDiverged(UserError):
    pass


class TrainLoop:
    """Runs a prepared training to its end: the loop owns nothing it did not get here, complete."""

    def __init__(
        self,
        accelerator,
        prepared: PreparedTraining,
        trainer,
        plan: EpochPlan,
        dataset: PFGDataset,
        writer: OutputWriter,
        options: LoopOptions,
        hooks: list | None = None,
    ):
        self.accelerator = accelerator
        self.model = prepared.model  # the prepared TrainedModules: forward(batch, loss) is the step
        self.optimizer = prepared.optimizer
        self.lr_scheduler = prepared.lr_scheduler
        self.save_template = prepared.save_template  # weightless copy (main process) saving fills
        self.loss = trainer.loss  # the step, over the same (unwrapped) children as self.model
        self.plan = plan
        self.dataset = dataset
        self.writer = writer
        self.options = options
        # Things done between steps (training samples, validation): each has after_step(step),
        # after_epoch(epoch, step) and at_end(step).
        self.hooks = hooks or []
        self.progress = Progress()
        self._trained: list[torch.nn.Parameter] | None = None

    # -- state ------------------------------------------------------------------------------

    def save_state(self, folder: Path) -> None:
        """accelerate's state (every process writes its own RNG file, and under FSDP/DeepSpeed its
        shards) into one temporary folder all processes share, renamed into place when complete."""
        accelerator = self.accelerator
        tmp = folder.with_name(f".{folder.name}.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted save left
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / STATE_FILE, asdict(self.progress))
            replace_dir(tmp, folder)
        accelerator.wait_for_everyone()

    def load_state(self, folder: Path) -> None:
        folder = Path(folder)  # a state folder: TrainSettings.validate checked it before any model loaded
        try:
            self.accelerator.load_state(str(folder))
        except (RuntimeError, ValueError, KeyError) as e:  # other modules, shapes or optimizer groups
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UserError(
                f"--resume {folder}: this state does not fit the current run ({reason}); resume with the settings "
                "it was saved with (its NAME-settings.toml) or start without --resume"
            ) from None
        self.progress = Progress(**json.loads((folder / STATE_FILE).read_text()))
        self.accelerator.print(f"resuming from {folder}: epoch {self.progress.epoch + 1}, step {self.progress.global_step}")

    # -- the loop ---------------------------------------------------------------------------

    def _save_point(self, tag: str | None) -> list[Path]:
        """Save outputs (and state) on the main process; intermediate points rotate."""
        self.accelerator.wait_for_everyone()
        written: list[Path] = []
        if self.options.save_state:
            state = self.writer.state_dir(tag)
            self.save_state(state)  # every process takes part in accelerate's save_state
            written.append(state)
        weights = self.full_weights()
        if self.accelerator.is_main_process:
            unet = weights.unet if weights.trains_unet else None
            written = self.writer.save(weights.adapter, unet, tag, {"steps": self.progress.global_step, "epoch": self.progress.epoch}) + written
            if tag is not None:
                self.writer.rotate(written)
        return written

    def full_weights(self) -> torch.nn.Module | None:
        """The trained modules holding their full weights (main process; None elsewhere). Every
        process must call this: under FSDP or DeepSpeed ZeRO-3 each holds a shard, and
        accelerate's get_state_dict gathers them. Elsewhere it is the live state dict, no copy."""
        try:
            state = self.accelerator.get_state_dict(self.model)
        except ValueError as e:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
            raise UserError(f"cannot gather the full weights to save them ({e}); with DeepSpeed ZeRO-3 set "
                            "zero3_save_16bit_model: true in the accelerate config") from None
        if not self.accelerator.is_main_process:
            return None
        weights = copy.deepcopy(self.save_template)  # weightless: cheap
        weights.load_state_dict(state, strict=True, assign=True)
        return weights

    def _device_batch(self, batch: dict) -> dict:
        device = self.accelerator.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        """Listed once: walking a peft-wrapped UNet's modules every step costs more than clipping."""
        if self._trained is None:
            from accelerate.utils import DistributedType

            parameters = list(self.model.parameters())
            # accelerate clips an FSDP model through the model itself, recognised by its full list
            fsdp = self.accelerator.distributed_type == DistributedType.FSDP
            self._trained = parameters if fsdp else [p for p in parameters if p.requires_grad]
        return self._trained

    def _optimizer_step(self, loss: torch.Tensor, group_size: int) -> None:
        """Backward of one batch; at the end of its accumulation group, the optimizer step and one
        step of the schedule. accelerate divides every batch's loss by k
        (--gradient_accumulation_steps); an epoch's last group may hold m < k batches, and is
        scaled by k / m so that its step, too, follows the mean loss of the batches in it."""
        k = self.accelerator.gradient_accumulation_steps
        self.accelerator.backward(loss * (k / group_size) if group_size < k else loss)
        if self.accelerator.sync_gradients and self.options.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self._trained_parameters(), self.options.max_grad_norm)
        self.optimizer.step()  # accelerate steps only at the end of an accumulation group
        if self.accelerator.sync_gradients and not self.optimizer.step_was_skipped:
            # Once per optimizer step, whatever the process count: the Accelerator is made with
            # step_scheduler_with_optimizer=False, because accelerate's own stepping advances the
            # schedule num_processes times per step (for data loaders it shards itself, which
            # ours are not), ending warmup and decay N times too early. Under DeepSpeed the engine
            # steps the schedule itself, and this call is accelerate's no-op.
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _group_size(self, epoch_batches: int, position: int) -> int:
        """Batches in the accumulation group of the epoch's batch `position`: k, or fewer for the
        epoch's last group (which still ends in an optimizer step)."""
        k = self.accelerator.gradient_accumulation_steps
        start = position - position % k
        return min(k, epoch_batches - start)

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss, on every process together: each one's loss is shared, so no
        process waits forever in the next collective for one that stopped alone."""
        losses = self.accelerator.gather(loss.detach().float().reshape(1))
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            progress = self.progress
            where = "" if losses.numel() == 1 else f" on process {int((~finite).nonzero()[0])}"
            raise TrainingDiverged(
                f"loss became {losses[~finite][0].item()}{where} at step {progress.global_step + 1} (epoch {progress.epoch + 1}); "
                "stopping. The last saved checkpoint is intact; lower the learning rate or use another precision"
            )

    def _epoch_loader(self, batches: list[list[tuple[int, int]]], epoch: int):
        """The epoch's batches as accelerate's DataLoaderShard (without any sharding or device
        placement of its own: the plan already gave this process its share). It tells accelerate
        where the epoch ends, so `accumulate` makes the epoch's last, shorter group an optimizer
        step: an epoch is ceil(batches / k) steps, and epoch saves fall on a step. Its own
        generator: creating an iterator must not draw from the global RNG, or the noise after a
        --resume would differ from an uninterrupted run."""
        from accelerate.data_loader import DataLoaderShard

        return DataLoaderShard(
            self.dataset, device=None, batch_sampler=batches, collate_fn=collate, num_workers=self.options.dataloader_workers,
            generator=torch.Generator().manual_seed(self.options.seed + epoch),
        )

    def run(self) -> list[Path]:
        total = self.plan.total_steps()
        progress = self.progress
        bar = tqdm(total=total, initial=progress.global_step, desc="steps", disable=not self.accelerator.is_local_main_process)
        loss_sum, loss_count = 0.0, 0
        self.model.train()
        while progress.global_step < total:
            epoch_batches = self.plan.batches_for_epoch(progress.epoch)
            loader = self._epoch_loader(epoch_batches[progress.batch_in_epoch :], progress.epoch)
            for batch in loader:
                group = self._group_size(len(epoch_batches), progress.batch_in_epoch)
                with self.accelerator.accumulate(self.model):
                    with self.accelerator.autocast():
                        loss = self.model(self._device_batch(batch), self.loss)
                    self._check_finite(loss)
                    self._optimizer_step(loss, group)
                progress.batch_in_epoch += 1
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                if not self.accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                lr = self.lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", avg=f"{loss_sum / loss_count:.4f}", lr=f"{lr:.2e}")
                self.accelerator.log({"loss": loss.item(), "loss_avg": loss_sum / loss_count, "lr": lr}, step=progress.global_step)
                for hook in self.hooks:
                    hook.after_step(progress.global_step)
                every = self.options.save_every_n_steps
                if every and progress.global_step % every == 0 and progress.global_step < total:
                    self._save_point(step_tag(progress.global_step))
                if progress.global_step >= total:
                    loader.end()  # leave accelerate's record of the epoch's loader, as its end would
                    break
            else:  # the epoch ran to its end
                progress.epoch += 1
                progress.batch_in_epoch = 0
                for hook in self.hooks:
                    hook.after_epoch(progress.epoch, progress.global_step)
                every = self.options.save_every_n_epochs
                if every and progress.epoch % every == 0 and progress.global_step < total:
                    self._save_point(epoch_tag(progress.epoch))
        bar.close()
        for hook in self.hooks:
            hook.at_end(progress.global_step)
        written = self._save_point(None)
        self.accelerator.end_training()  # flush and close the trackers
        return written
