"""User-facing errors: bad input ends with one clear message, not a traceback."""
from __future__ import annotations

import gc
import sys
import warnings
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (file, flag, config). The message names the file and what is wrong."""


class Stop(Exception):
    """A run that ended early on purpose (a signal): the message says what was saved and how to
    continue; the exit status is `exit_code` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopAtOnce(BaseException):
    """Leave now (a second signal): not an Exception, so no handler on the way swallows it; atomic
    writes still remove their temporary files as it passes."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Notice(UserWarning):
    """Something about the user's input that does not stop the run (a value adjusted as kohya
    does, a key that does not apply): a script prints it as one `warning: ...` line."""


def _format_notices() -> None:
    plain = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, Notice):
            return f"warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main(); a UserError prints `error: ...` and exits with status 2."""
    from library import quiet

    quiet.install()
    message, together = None, False
    _format_notices()
    try:
        code, together = main() or 0, True
    except UserError as e:
        message, code = f"error: {e}", 2
    except Stop as e:
        message, code = str(e), e.exit_code
    except StopAtOnce as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    # Out of the except blocks: the traceback, and with it main()'s frames and models, is gone.
    if message:
        print(message, file=sys.stderr)
    _leave_process_group(together)
    sys.exit(code)


def _leave_process_group(together: bool) -> None:
    """Under torchrun / accelerate launch, close torch.distributed before exiting: exiting with
    the process group open aborts the process (SIGABRT, "terminate called without an active
    exception") and hides the exit status behind the launcher's crash report. First free what
    main() left in reference cycles (a DDP model's reducer holds the group: freed after the group
    is closed, it can hang in gloo's teardown); after a successful run, meet the other processes
    first, so none closes its connections while another is still inside a collective."""
    dist = sys.modules.get("torch.distributed")  # only when the script used it: never imports torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()
