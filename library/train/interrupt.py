"""SIGTERM and SIGINT during training: the first asks the loop to finish its optimizer step, save a
resumable state and the current outputs, and stop; a second stops at once.

Preempted spot instances and SLURM time limits send SIGTERM with a short grace period; Ctrl-C sends
SIGINT. Under several processes the request travels with the loss every step (TrainLoop), so all
processes stop after the same step and save together.
"""
from __future__ import annotations

import shlex
import signal
import sys
import time

from library.errors import Stop, StopAtOnce

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for the loop's lifetime (a context manager); `signum` is the first signal seen."""

    def __init__(self, argv: list[str], budget_seconds: float = 0.0, say=print):
        self.argv = argv  # the command line, for the command that continues the run
        self.signum: int | None = None  # the first signal this process got
        self.agreed: int | None = None  # a signal every process knows of (shared with the loss)
        self.received_at = 0.0
        self.budget_seconds = budget_seconds  # --save_on_signal_timeout: the platform's grace period
        self.say = say
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        """Whether every process knows of a signal: only then may they stop, after the same step."""
        return self.agreed is not None

    def local_signal(self) -> int:
        return self.signum or 0

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise StopAtOnce(f"stopped at once by a second {signal.Signals(signum).name}", 128 + signum)
        self.signum, self.received_at = signum, time.monotonic()
        budget = f" within the grace period of {self.budget_seconds:g} s (--save_on_signal_timeout)" if self.budget_seconds else ""
        self.say(f"\n{signal.Signals(signum).name} received: finishing this optimizer step, then saving a resumable "
                 f"state and the current outputs{budget}; send it again to stop at once", flush=True)

    def agree(self, signum: int) -> None:
        """A signal some process got, as every process learned it with the loss: stop with it."""
        if self.agreed is None and signum:
            self.agreed = signum
            if self.signum is None:
                self.signum, self.received_at = signum, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.received_at

    def stopped(self, state) -> Stop:
        """The exception that ends the run after its save, with the command that continues it."""
        took = self.elapsed()
        late = ""
        if self.budget_seconds and took > self.budget_seconds:
            late = (f"\nwarning: stopping took {took:.0f} s, more than the {self.budget_seconds:g} s grace period "
                    "(--save_on_signal_timeout): a preemption would have killed the save; save states more often "
                    "(--save_every_n_steps with --save_state) so less is lost")
        name = signal.Signals(self.agreed).name
        return Stop(f"stopped by {name} after saving {state} in {took:.0f} s.{late}\n"
                    f"to continue: {resume_command(self.argv, str(state))}\n"
                    f"(or rerun the same command with --resume latest)", 128 + self.agreed)


def ignore_in_workers(worker_id: int) -> None:
    """DataLoader workers leave signals to the training process (a terminal's Ctrl-C and SLURM's
    SIGTERM reach them too): the process finishes its step with their batches, then stops them."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def resume_command(argv: list[str], state: str) -> str:
    """The user's train_pfg.py command line with `--resume STATE` in place of any --resume."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if not arg.startswith("--resume="):
            args.append(arg)
    launcher = "accelerate launch" if _launched() else sys.executable.rsplit("/", 1)[-1]
    return " ".join([launcher, "train_pfg.py", *map(shlex.quote, args), "--resume", shlex.quote(state)])


def _launched() -> bool:
    import os

    return any(key in os.environ for key in ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"))
