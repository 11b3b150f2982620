"""Third-party messages we know to be harmless, silenced one by one: by the logger (or warning
category) that emits them and the exact text, never by turning a library's output off wholesale.
A message that differs (another module missing, another reason) still shows. Every script
installs these at start (library.errors.run_cli), before the libraries that log them are imported.
"""
from __future__ import annotations

import logging
import re
import warnings


class DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]
        self.dropped: list[str] = []  # what was silenced, for whoever asks (tests/test_quiet.py)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(p.search(message) for p in self.patterns):
            self.dropped.append(message)
            return False
        return True


# logger name -> regular expressions of the messages to drop, each with why it is harmless
LOG_MESSAGES = {
    # diffusers' ModelMixin.to(dtype) warns whenever _keep_in_fp32_modules is a list, even an empty
    # one (diffusers 0.42): "should be kept in float32: []" names no module. A real list still shows.
    "diffusers.models.modeling_utils": [r"^There are modules in \w+ that should be kept in float32: \[\]\."],
    # bitsandbytes (0.50) tries the optional `kernels` package for 4-bit CPU matmuls when it is
    # imported (diffusers and peft import it). Nothing here runs 4-bit layers: the 8-bit optimizers
    # do not use that kernel. Another failure of the kernel (an installed but broken one) still shows.
    "bitsandbytes.backends.cpu.ops": [
        r"^Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'\."
    ],
    # transformers 5 names its torchvision-backed image processors `XImageProcessor` and, without
    # torchvision (requirements.txt has none), falls back to the PIL ones, the processors transformers
    # 4 always used. diffusers' imports touch CLIP's and SigLIP's; the CLIP encoder preprocesses with
    # the PIL one, as the original CLIP recipe does.
    "transformers.utils.import_utils": [
        r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
    ],
    # torch's ONNX exporter registers torchvision's detection ops (nms, roi_align, ...) when
    # torchvision is installed and says it skips them otherwise; the taggers we export use none.
    "torch.onnx._internal.exporter._registration": [r"^torchvision is not installed\. Skipping torchvision::\w+$"],
}

# Python warnings: (category, regular expression matching the start of the message)
WARNINGS = [
    # torch 2.13's ONNX exporter copies pytree specs through its own deprecated LeafSpec check
    # (torch/utils/_pytree.py); the exported graph is unaffected.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
]


def ignore_warnings() -> None:
    """The WARNINGS filters; also for a `warnings.catch_warnings()` block in code run without run_cli."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


_installed: dict[str, DropMessages] = {}


def install() -> dict[str, DropMessages]:
    """Add the filters (once per process); returns them by logger name."""
    global _installed
    if not _installed:
        ignore_warnings()
        _installed = {name: DropMessages(patterns) for name, patterns in LOG_MESSAGES.items()}
        for name, drop in _installed.items():
            logging.getLogger(name).addFilter(drop)
    return _installed
