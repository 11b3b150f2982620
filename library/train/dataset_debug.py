"""`train_pfg.py --debug_dataset` (kohya's flag): every sample of the first epoch as training would
see it — image, bucket, mirrored or not, and the caption exactly as the text encoder receives it
(after prefix/suffix, wildcards, shuffle, warmup and dropouts) — without loading any model. The
captions come from the same draws the dataset makes (library/data/dataset.py draw_sample)."""
from __future__ import annotations

import json
from typing import Iterator

from library.data.dataset import draw_sample
from library.train.plan import EpochPlan


def debug_lines(plan: EpochPlan) -> Iterator[str]:
    total_steps = plan.total_steps()
    count = 0
    for batch in plan.batches_for_epoch(0):
        for key in batch:
            item = plan.items[key.index]
            draw = draw_sample(item, key, total_steps)
            width, height = draw.assignment.bucket
            crop = "" if draw.assignment == item.assignment else f", crop {draw.assignment.crop_ltrb}"
            flip = ", flipped" if draw.flip else ""
            color = ("" if draw.color is None else f", hue {draw.color.hue:+.1f}" if draw.color.hue is not None
                     else f", gamma {draw.color.gamma:.3f}")
            count += 1
            yield (f"epoch 1, step {key.step + 1}: {item.image_path} [{width}x{height}{flip}{crop}{color}] "
                   f"{json.dumps(draw.caption, ensure_ascii=False)}")
    yield f"{count} samples in epoch 1 (--debug_dataset: nothing was trained)"
