"""The training loop: epochs of bucketed batches, optimizer steps through accelerate, save points
(library/train/save_points.py), stopping on a signal, and progress display. The step itself is
`PFGTrainer.loss`, run as the forward of the prepared TrainedModules (library/train/setup.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.data.dataset import PFGDataset, collate
from library.errors import UserError
from library.train.interrupt import StopRequest, ignore_in_workers
from library.train.plan import EpochPlan
from library.train.save_points import Progress, SaveFailed, SavePoints
from library.train.saving import OutputWriter, epoch_tag, step_tag
from library.train.setup import PreparedTraining


@dataclass(frozen=True)
class LoopOptions:
    seed: int
    max_grad_norm: float
    save_every_n_steps: int
    save_every_n_epochs: int
    save_state: bool
    dataloader_workers: int
    continue_on_save_error: bool = False

    @classmethod
    def from_settings(cls, settings) -> "LoopOptions":
        return cls(settings.seed, settings.max_grad_norm, settings.save_every_n_steps, settings.save_every_n_epochs,
                   settings.save_state, settings.dataloader_workers, settings.continue_on_save_error)


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
        stop: StopRequest | None = None,
    ):
        self.accelerator = accelerator
        self.model = prepared.model  # the prepared TrainedModules: forward(batch, loss) is the step
        self.optimizer = prepared.optimizer
        self.lr_scheduler = prepared.lr_scheduler
        self.saves = SavePoints(accelerator, prepared, writer)
        self.loss = trainer.loss  # the step, over the same (unwrapped) children as self.model
        self.plan = plan
        self.dataset = dataset
        self.writer = writer
        self.options = options
        # Things done between steps (training samples, validation): each has after_step(step),
        # after_epoch(epoch, step) and at_end(step).
        self.hooks = hooks or []
        self.progress = Progress()
        self.stop = stop  # SIGTERM/SIGINT: save and stop after the current step (None: no handlers)
        self._trained: list[torch.nn.Parameter] | None = None

    # -- state and save points ---------------------------------------------------------------

    def load_state(self, folder: Path) -> None:
        self.progress = self.saves.load_state(folder)

    def _save_point(self, tag: str | None, with_state: bool | None = None, periodic: bool = True) -> list[Path]:
        """Save outputs (and state); a periodic point the disk refuses may be skipped with
        --continue_on_save_error (tried again at the next one), otherwise the run stops, its
        previous outputs and states intact."""
        with_state = self.options.save_state if with_state is None else with_state
        try:
            return self.saves.save(self.progress, tag, with_state)
        except SaveFailed as e:
            if periodic and self.options.continue_on_save_error:
                self.accelerator.print(f"warning: {e}; training goes on (--continue_on_save_error) and saves again "
                                       "at the next save point")
                return []
            newest = self.saves.newest_state()
            resume = f"; the newest complete state is {newest}: make room, then rerun with --resume latest" if newest else ""
            raise UserError(f"{e}; training stopped at step {self.progress.global_step}{resume}") from None

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

    def _share(self, loss: torch.Tensor) -> None:
        """Every process learns every loss and every signal received, each batch: a NaN/inf loss
        stops all of them together, and a signal stops all after the same step, so no process
        waits forever in a collective for one that stopped alone."""
        signum = self.stop.local_signal() if self.stop is not None else 0
        mine = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(signum), device=loss.device)])
        shared = self.accelerator.gather(mine.reshape(1, 2))
        if self.stop is not None:
            self.stop.agree(int(shared[:, 1].max()))
        losses = shared[:, 0]
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

        workers = self.options.dataloader_workers
        return DataLoaderShard(
            self.dataset, device=None, batch_sampler=batches, collate_fn=collate, num_workers=workers,
            generator=torch.Generator().manual_seed(self.options.seed + epoch), worker_init_fn=ignore_in_workers if workers else None,
        )

    def run(self) -> list[Path]:
        """Train to the planned step count and write the final save point; on a signal, save a
        resumable state and the outputs after the current step and raise the Stop that says how
        to continue. A process of a multi-process run that dies (killed, out of memory) makes the
        others' next collective fail (at once for a closed connection, after --ddp_timeout for a
        silent one): they stop with a message instead of a traceback."""
        try:
            if self.stop is None:
                return self._run()
            with self.stop:
                return self._run()
        except RuntimeError as e:  # torch.distributed.DistError is one
            if self.accelerator.num_processes > 1 and lost_peer(e):
                raise UserError(
                    f"process {self.accelerator.process_index} lost the others at step {self.progress.global_step + 1}: "
                    f"another process of this run died or stopped answering ({str(e).strip().splitlines()[-1][:200]}). "
                    "The launcher's report names it and its exit status; fix the cause, then rerun with --resume latest"
                ) from None
            raise

    def _finish_trackers(self) -> None:
        """Flush and close the trackers. Not accelerator.end_training(): it also closes the process
        group while the DDP model still holds it, and freeing the model afterwards can hang in
        gloo's teardown; run_cli closes the group once the model is gone."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def _stop_now(self) -> None:
        state = self.writer.state_dir(step_tag(self.progress.global_step))
        self._save_point(step_tag(self.progress.global_step), with_state=True, periodic=False)
        self._finish_trackers()
        raise self.stop.stopped(state)

    def _run(self) -> list[Path]:
        total = self.plan.total_steps()
        progress = self.progress
        bar = tqdm(total=total, initial=progress.global_step, desc="steps", disable=not self.accelerator.is_local_main_process)
        try:
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
                        self._share(loss)
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
                    if self.stop is not None and self.stop.requested and progress.global_step < total:
                        self._stop_now()
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
            for hook in self.hooks:
                hook.at_end(progress.global_step)
            written = self._save_point(None, periodic=False)  # the end: never skipped
            self._finish_trackers()
            return written
        finally:
            bar.close()  # before any message, so it starts on a line of its own


# What torch.distributed says when a peer is gone: gloo's closed or reset connections, NCCL's
# errors and the collectives' timeout (--ddp_timeout).
_PEER_LOST = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out", "Timed out", "timeout")


def lost_peer(error: BaseException) -> bool:
    return isinstance(error, torch.distributed.DistError) or any(marker in str(error) for marker in _PEER_LOST)
