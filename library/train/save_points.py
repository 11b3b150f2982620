"""Save points of a run: its outputs (PFG head, UNet or LoRA) and its resumable state, written by
all processes together, so that none waits alone in a collective when another fails.

Every file goes to a temporary name and is renamed into place; a state folder is written whole
into a hidden folder and renamed once every process has finished. A save that the disk refuses
(full, read-only) leaves the previous outputs and states as they were and is said in one line
with the path and the free space; periodic saves may then be skipped (--continue_on_save_error)
and tried again at the next save point.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from library.errors import UserError
from library.fileio import WriteFailed, failures_said, replace_dir, write_json
from library.train.saving import OutputWriter
from library.train.setup import PreparedTraining
from library.train.state import STATE_FILE, latest_state


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress (0-based)
    global_step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # batches of this process consumed in the current epoch


class SaveFailed(UserError):
    """A save point the disk refused, the same on every process."""


class SavePoints:
    def __init__(self, accelerator, prepared: PreparedTraining, writer: OutputWriter):
        self.accelerator = accelerator
        self.model = prepared.model
        self.save_template = prepared.save_template  # weightless copy (main process) saving fills
        self.writer = writer

    # -- agreement ----------------------------------------------------------------------------

    def _together(self, action: Callable[[], None], main_only: bool) -> None:
        """Run `action` on the main process (or on all); a write the disk refuses, on any process,
        becomes the same SaveFailed on every process."""
        accelerator = self.accelerator
        failure = None
        if accelerator.is_main_process or not main_only:
            try:
                action()
            except WriteFailed as e:
                failure = str(e)
        flags = accelerator.gather(torch.tensor([int(failure is not None)], device=accelerator.device))
        failed = flags.nonzero().flatten().tolist()
        if failed:
            raise SaveFailed(failure or f"process {failed[0]} could not write its part of the save (its message is above)")

    # -- the state ------------------------------------------------------------------------------

    def save_state(self, folder: Path, progress: Progress) -> None:
        """accelerate's state (every process writes its own RNG file, and under FSDP/DeepSpeed its
        shards) into one hidden folder all processes share, then train_state.json, then the
        rename into place: a folder under the real name is always complete."""
        accelerator = self.accelerator
        tmp = folder.with_name(f".{folder.name}.tmp")

        def fresh_folder():
            with failures_said(tmp):
                shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted save left
                tmp.mkdir(parents=True)

        def accelerate_state():
            with failures_said(tmp):
                accelerator.save_state(str(tmp))

        def finish():
            write_json(tmp / STATE_FILE, asdict(progress))
            with failures_said(folder):
                replace_dir(tmp, folder)

        try:
            self._together(fresh_folder, main_only=True)
            accelerator.wait_for_everyone()
            self._together(accelerate_state, main_only=False)
            self._together(finish, main_only=True)
        finally:  # a failed or interrupted save (a full disk, a second signal) leaves no partial state
            if accelerator.is_main_process and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()

    def load_state(self, folder: Path) -> Progress:
        folder = Path(folder)  # a complete state folder: checked before any model loaded
        try:
            self.accelerator.load_state(str(folder))
        except (RuntimeError, ValueError, KeyError) as e:  # other modules, shapes or optimizer groups
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UserError(
                f"--resume {folder}: this state does not fit the current run ({reason}); resume with the settings "
                "it was saved with (its NAME-settings.toml) or start without --resume"
            ) from None
        progress = Progress(**json.loads((folder / STATE_FILE).read_text()))
        self.accelerator.print(f"resuming from {folder}: epoch {progress.epoch + 1}, step {progress.global_step}")
        return progress

    # -- outputs ----------------------------------------------------------------------------------

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

    def save(self, progress: Progress, tag: str | None, with_state: bool) -> list[Path]:
        """One save point: the state first (when asked), then the outputs (main process);
        intermediate points (a tag) rotate. Every process calls this."""
        self.accelerator.wait_for_everyone()
        written: list[Path] = []
        if with_state:
            state = self.writer.state_dir(tag)
            self.save_state(state, progress)
            written.append(state)
        weights = self.full_weights()

        def outputs():
            unet = weights.unet if weights.trains_unet else None
            written[:0] = self.writer.save(weights.adapter, unet, tag, {"steps": progress.global_step, "epoch": progress.epoch})
            if tag is not None:
                self.writer.rotate(written)

        self._together(outputs, main_only=True)
        return written

    def newest_state(self) -> Path | None:
        return latest_state(self.writer.output_dir, self.writer.outputs.output_name)
