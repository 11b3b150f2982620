"""The held-out images an evaluation runs on, and their PFG vectors."""
from __future__ import annotations

import numpy as np
import torch

from library.data.dataset import TrainItem, collect_items, load_features
from library.data.features import load_valid_feature
from library.data.images import ImageLoadError, load_image
from library.errors import UserError


def held_out_items(dataset_config, pfg_prompt: str, num_images: int = 0) -> list[TrainItem]:
    """The usable images of the held-out dataset (the first `num_images`, 0 = all); at least 2."""
    items, failures = collect_items(dataset_config, pfg_prompt)
    for failure in failures:
        print(f"skipped {failure.path}: {failure.reason}")
    if num_images:
        items = items[:num_images]
    if len(items) < 2:
        raise UserError(f"{dataset_config.source}: {len(items)} usable held-out images; the metrics compare images, so at least 2 are needed")
    return items


def item_features(items: list[TrainItem], encoder) -> torch.Tensor:
    """(n, D) vectors: the encoder's valid caches, or the encoder run now; without an encoder,
    the caches prepare_features.py wrote."""
    if encoder is None:
        return load_features(items)[0]
    vectors = []
    for item in items:
        vector = load_valid_feature(item.feature_path, encoder.encoder_id, item.image_path)
        if vector is None:
            try:
                vector = encoder.encode([load_image(item.image_path)])[0]
            except ImageLoadError as e:
                raise UserError(str(e)) from None
        vectors.append(np.asarray(vector, dtype=np.float32))
    return torch.from_numpy(np.stack(vectors))
