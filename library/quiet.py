"""Third-party messages we know to be harmless, silenced one by one: by the logger or warning
category that emits them and the exact text, never by turning a library's output off wholesale.
Every script installs these at start (library.errors.run_cli)."""
from __future__ import annotations

import logging
import re


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


# logger name -> regular expressions of the messages to drop
LOG_MESSAGES = {
    # diffusers' ModelMixin.to(dtype) warns whenever _keep_in_fp32_modules is a list, even an empty
    # one (diffusers 0.42): "should be kept in float32: []" names no module. A real list still shows.
    "diffusers.models.modeling_utils": [r"^There are modules in \w+ that should be kept in float32: \[\]\."],
}

_installed = False


def install() -> None:
    """Add the filters (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, patterns in LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))
