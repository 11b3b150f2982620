"""--full_fp16: the trained weights themselves in fp16, as kohya's flag does.

Their gradients are fp16 too, which torch's GradScaler refuses to unscale ("Attempting to
unscale FP16 gradients"); kohya lets it, and so do we: the scaler still skips steps whose
gradients overflowed. On the CPU accelerate makes no scaler (fp16 has no autocast there)."""
from __future__ import annotations

import functools


def allow_fp16_gradients(accelerator) -> None:
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    unscale = scaler._unscale_grads_

    @functools.wraps(unscale)
    def unscale_fp16_too(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16_too
