"""User-facing errors: bad input ends with one clear message, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (file, flag, config). The message names the file and what is wrong."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main(); a UserError prints `error: ...` and exits with status 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
