"""kohya's augmentation keys (random_crop, color_aug, resize_interpolation) and alpha_mask with its
masked loss: what a sample becomes, and how the mask weighs the loss (as kohya's apply_masked_loss)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import train_pfg
from library.data.dataset import PFGDataset, SampleKey, collate, collect_items
from library.data.dataset_config import load_dataset_config
from library.errors import UserError


def _dataset(tmp_path, subset: str, images: dict[str, np.ndarray], resolution: int = 32) -> PFGDataset:
    folder = tmp_path / "img"
    folder.mkdir(parents=True, exist_ok=True)
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / name)
    toml = tmp_path / "d.toml"
    toml.write_text(f"[general]\nresolution = {resolution}\nenable_bucket = true\nmin_bucket_reso = 16\nmax_bucket_reso = 128\n"
                    f"bucket_reso_steps = 16\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"{folder.as_posix()}\"\n{subset}\n")
    items, failures = collect_items(load_dataset_config(toml), "p")
    assert not failures
    return PFGDataset(items, torch.zeros(len(items), 4))


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def test_random_crop_moves_the_crop_per_sample_seed_stably(tmp_path):
    wide = {"wide.png": _noise(64, 128)}  # bucket 80x48: the image, resized to 96x48, overhangs by 16 px
    plain = _dataset(tmp_path / "a", "", wide, resolution=64)
    cropped = _dataset(tmp_path / "b", "random_crop = true", wide, resolution=64)
    centre = plain[(0, 1)]["pixels"]
    crops = [cropped[(0, seed)] for seed in range(12)]
    assert all(torch.equal(c["pixels"], cropped[(0, seed)]["pixels"]) for seed, c in enumerate(crops))  # per seed: stable
    lefts = {int(c["time_ids"][3]) for c in crops}
    assert len(lefts) > 3 and any(not torch.equal(c["pixels"], centre) for c in crops)
    item = cropped.items[0]
    resized = np.asarray(Image.open(item.image_path).resize(item.assignment.resized_size, Image.Resampling.LANCZOS))
    for c in crops:  # the pixels are the resized image at the crop SDXL's time ids report
        top, left = int(c["time_ids"][2]), int(c["time_ids"][3])
        h, w = item.assignment.bucket[1], item.assignment.bucket[0]
        expected = torch.from_numpy(resized[top:top + h, left:left + w].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
        assert torch.allclose(c["pixels"], expected)


def test_color_aug_shifts_about_a_third_of_the_samples(tmp_path):
    images = {"a.png": _noise(32, 32)}
    plain = _dataset(tmp_path / "a", "", images)[(0, 0)]["pixels"]
    shifted = _dataset(tmp_path / "b", "color_aug = true", images)
    changed = [not torch.equal(shifted[(0, seed)]["pixels"], plain) for seed in range(300)]
    assert 70 < sum(changed) < 130  # kohya: p = 0.33, half hue shift, half gamma
    assert torch.equal(shifted[(0, 7)]["pixels"], shifted[(0, 7)]["pixels"])


@pytest.mark.parametrize("name, pil_filter", [("nearest", Image.Resampling.NEAREST), ("bicubic", Image.Resampling.BICUBIC),
                                              ("box", Image.Resampling.BOX)])
def test_resize_interpolation_picks_the_filter(tmp_path, name, pil_filter):
    images = {"a.png": _noise(50, 50)}
    dataset = _dataset(tmp_path, f'resize_interpolation = "{name}"', images)
    item = dataset.items[0]
    resized = Image.open(item.image_path).resize(item.assignment.resized_size, pil_filter).crop(item.assignment.crop_ltrb)
    expected = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(dataset[(0, 0)]["pixels"], expected)
    assert item.latent_job().interpolation == name  # latent caches are encoded with the same filter


def test_alpha_mask_gives_each_sample_its_mask(tmp_path):
    rgba = _noise(32, 32, 4)
    rgba[..., 3] = 0
    rgba[:, :8, 3] = 255  # opaque left quarter
    images = {"a.png": rgba, "b.png": _noise(32, 32)}  # b: no alpha channel, a mask of ones
    dataset = _dataset(tmp_path / "flip", "alpha_mask = true\nflip_aug = true", images)
    unflipped = _dataset(tmp_path / "plain_alpha", "alpha_mask = true", images)
    reference = unflipped[(0, 0)]
    assert torch.equal(reference["mask"], torch.from_numpy(rgba[..., 3] / 255.0).float())
    for seed in range(8):  # mirrored samples carry the mirrored mask
        sample = dataset[(0, seed)]
        flipped = not torch.equal(sample["pixels"], reference["pixels"])
        assert torch.equal(sample["mask"], torch.flip(reference["mask"], dims=[-1]) if flipped else reference["mask"])
    assert torch.equal(unflipped[(1, 0)]["mask"], torch.ones(32, 32))
    plain = _dataset(tmp_path / "plain", "", images)
    assert "mask" not in plain[(0, 0)]
    # latents cached: the mask comes at latent resolution, scaled by area
    cached = PFGDataset(unflipped.items, unflipped.features, {0: (torch.zeros(4, 4, 4), torch.zeros(4, 4, 4))})
    small = cached[(0, 0)]["mask"]
    assert small.shape == (4, 4) and torch.allclose(small, torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4))
    batch = collate([unflipped[(0, 0)], plain[(1, 0)]])  # kohya: a sample without a mask weighs fully
    assert batch["masks"].shape == (2, 32, 32) and torch.equal(batch["masks"][1], torch.ones(32, 32))


def test_masked_loss_weighs_every_element_as_kohya(tiny_sd1):
    """kohya's apply_masked_loss: loss * mask (scaled to the latents by area), then the plain mean
    over all elements: a zero mask gives 0, halves add up, 0.5 everywhere halves the loss."""
    from library.models.loading import load_sd_model
    from library.models.pfg import PFGAdapter, PFGShape
    from library.models.text import PromptEncoder
    from library.train.trainer import PFGTrainer, StepOptions

    model = load_sd_model(str(tiny_sd1))
    trainer = PFGTrainer(model, PFGAdapter(PFGShape(2, 8, 32)), PromptEncoder(model.tokenizer, model.text_encoder), StepOptions())
    torch.manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 8, 8), "captions": ["a", "b"], "features": torch.randn(2, 8)}
    noise, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([100, 600])

    def loss(mask: torch.Tensor | None) -> float:
        with torch.no_grad():
            return trainer.loss(batch | ({"masks": mask} if mask is not None else {}), timesteps, noise).item()

    full = loss(None)
    left = torch.zeros(2, 64, 64)
    left[:, :, :32] = 1
    assert loss(torch.ones(2, 64, 64)) == pytest.approx(full) and loss(torch.zeros(2, 64, 64)) == 0.0
    assert loss(left) + loss(1 - left) == pytest.approx(full)
    checker = torch.zeros(2, 64, 64)
    checker[:, ::2] = 1  # every 8x8 pixel block half opaque: 0.5 at latent resolution by area, not 0 or 1
    assert loss(checker) == pytest.approx(full / 2)


def test_masked_training_through_the_entry_point(tiny_sd1, tiny_tagger, tmp_path, initial_pfg_4x768):
    """Fully transparent images weigh nothing: with plain SGD the PFG head stays exactly where it
    started. --masked_loss needs alpha_mask subsets; augmentations that change pixels refuse latent caches."""
    from safetensors.torch import load_file

    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(2):
        rgba = _noise(32, 32, 4, seed=i)
        rgba[..., 3] = 0
        Image.fromarray(rgba).save(folder / f"t{i}.png")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = 32\nbatch_size = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder.as_posix()}"\n')
    common = ["--pretrained_model_name_or_path", str(tiny_sd1), "--dataset_config", str(toml), "--output_dir", str(tmp_path / "out"),
              "--train_unet", "none", "--max_train_steps", "2", "--resume_pfg", str(initial_pfg_4x768), "--pfg_num_tokens", "4",
              "--optimizer_type", "torch.optim.SGD", "--learning_rate", "1", "--pfg_learning_rate", "1", "--max_grad_norm", "0"]
    with pytest.raises(UserError, match="--masked_loss weighs the loss by the images' alpha channel"):
        train_pfg.main([*common, "--masked_loss"])
    assert train_pfg.main([*common, "--masked_loss", "--alpha_mask", "--tagger_model", str(tiny_tagger)]) == 0
    start, trained = load_file(str(initial_pfg_4x768)), load_file(str(tmp_path / "out" / "pfg-pfg.safetensors"))
    assert all(torch.equal(start[k], trained[k]) for k in start)

    toml.write_text(toml.read_text() + "random_crop = true\n")
    with pytest.raises(UserError, match=r"random_crop and color_aug give each sample new pixels.*#1"):
        train_pfg.main([*common, "--cache_latents"])


@pytest.fixture
def initial_pfg_4x768(tmp_path):
    from library.models.pfg import PFGAdapter, PFGShape, pfg_metadata, save_pfg

    torch.manual_seed(0)
    adapter = PFGAdapter(PFGShape(4, 768, 32))
    path = tmp_path / "init-pfg.safetensors"
    save_pfg(adapter, path, pfg_metadata(adapter.shape, "init"))
    return path


def test_sample_keys_carry_epoch_and_step():
    key = SampleKey(3, 11)
    assert tuple(key) == (3, 11, 0, 0) and SampleKey(*(3, 11)) == key
