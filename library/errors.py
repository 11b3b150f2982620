"""User-facing errors: bad input ends with one clear message, not a traceback."""
from __future__ import annotations

import sys
import warnings
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (file, flag, config). The message names the file and what is wrong."""


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
    _format_notices()
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _leave_process_group()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    _leave_process_group()
    sys.exit(code or 0)


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch, close torch.distributed before exiting: exiting with
    the process group open aborts the process (SIGABRT, "terminate called without an active
    exception") and hides the exit status behind the launcher's crash report."""
    dist = sys.modules.get("torch.distributed")  # only when the script used it: never imports torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
