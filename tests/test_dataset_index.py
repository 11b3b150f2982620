"""Training at scale: latents read from their disk caches when their batch comes, and the
per-folder index (library/data/index.py) that makes a start fast without ever serving what
changed: an edited image, a replaced tagger, a deleted cache, a damaged or foreign index."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import prepare_features
import train_pfg
import library.data.dataset as dataset_module
import library.data.index as index_module
import library.data.latents as latents_module
from library.data.dataset import collect_items, load_feature_table
from library.data.dataset_config import load_dataset_config
from library.data.features import read_cache
from library.data.index import DatasetIndex, index_path
from library.errors import UserError
from tests.dataset_copies import small_dataset_copy


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="session")
def other_tagger(kit_dir) -> Path:
    """A tagger of the same kind and width as tiny_tagger, with other weights."""
    from tools.make_tiny_tagger import build_tiny_tagger

    return build_tiny_tagger(kit_dir / "tiny-tagger-other", seed=7)


def _train(model: Path, dataset: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert train_pfg.main(["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset), "--output_dir", str(out),
                           "--output_name", "t", "--seed", "1", "--learning_rate", "1e-3", "--pfg_learning_rate", "1e-2",
                           "--train_unet", "none", "--pfg_num_tokens", "2", *extra]) == 0
    return load_file(str(out / "t-pfg.safetensors"))


def _items(toml: Path, index: DatasetIndex | None = None):
    return collect_items(load_dataset_config(toml), "illustration of *", index)


def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
    return calls


def test_disk_latents_are_read_when_their_batch_comes_equal_the_ram_run_and_resume(tiny_sd1, prepared_dataset, tmp_path, monkeypatch):
    """With --cache_latents_to_disk each batch reads its latents from the cache files just before
    its step (in the DataLoader workers when there are any), never all at start; the weights equal
    a --cache_latents run (every latent read into memory at start) bit for bit, and a run resumed
    halfway with two workers ends on them too. flip_aug: the mirrored latents come from the files too."""
    toml = small_dataset_copy(prepared_dataset, tmp_path / "data", 7)
    toml.write_text(toml.read_text() + "flip_aug = true\n")
    items, _ = _items(toml)
    vae = _vae(tiny_sd1)
    latents_module.cache_latents([item.latent_job() for item in items], vae, to_disk=True, progress=False)  # as prepare_features --cache_latents

    log = tmp_path / "reads.log"
    real_read = latents_module.read_latent_cache

    def read(path, *args):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} read\n")
        return real_read(path, *args)

    from library.train.loop import TrainLoop

    real_step = TrainLoop._optimizer_step

    def step(self, loss, group):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} step\n")
        return real_step(self, loss, group)

    monkeypatch.setattr(latents_module, "read_latent_cache", read)
    monkeypatch.setattr(TrainLoop, "_optimizer_step", step)

    def events() -> list[tuple[int, str]]:
        found = [(int(pid), what) for pid, what in (line.split() for line in log.read_text().splitlines())]
        log.unlink()
        return found

    flags = ["--max_train_steps", "4"]
    disk = _train(tiny_sd1, toml, tmp_path / "disk", *flags, "--cache_latents_to_disk")
    kinds = "".join("s" if what == "step" else "r" for _, what in events())
    assert kinds.count("s") == 4 and kinds[0] == "r"
    # Reads come with their batches (of 1 or 2): the first step's and the next one's (accelerate's
    # loader takes one batch ahead to know where the epoch ends), then at most a batch per step.
    before_first, *between = kinds.split("s")[:4]
    assert 1 <= len(before_first) <= 4 and all(len(reads) <= 2 for reads in between), kinds

    ram = _train(tiny_sd1, toml, tmp_path / "ram", *flags, "--cache_latents")
    kinds = "".join("s" if what == "step" else "r" for _, what in events())
    assert kinds == "r" * 7 + "s" * 4  # every image's latents read at start
    assert disk.keys() == ram.keys() and all(torch.equal(disk[k], ram[k]) for k in disk)

    _train(tiny_sd1, toml, tmp_path / "half", "--max_train_steps", "2", "--cache_latents_to_disk", "--save_state")
    events()
    resumed = _train(tiny_sd1, toml, tmp_path / "resumed", *flags, "--cache_latents_to_disk", "--dataloader_workers", "2",
                     "--resume", str(tmp_path / "half" / "t-state"))
    readers = {pid for pid, what in events() if what == "read"}
    assert readers and os.getpid() not in readers  # the workers read them
    assert all(torch.equal(disk[k], resumed[k]) for k in disk)


def _vae(model: Path):
    from library.models.loading import load_sd_model

    return load_sd_model(str(model)).vae


def test_a_second_start_opens_no_image_and_no_cache(tiny_sd1, prepared_dataset, tmp_path, monkeypatch):
    """With the index written, listing the images, loading the vectors and checking the latent
    caches read no image header and open no cache file: one scandir and one stat per file. The
    vectors are the caches' own, from the index's memory-mapped array."""
    toml = small_dataset_copy(prepared_dataset, tmp_path / "data", 5)
    items, _ = _items(toml)
    first, encoder_id = load_feature_table(items)
    jobs = [item.latent_job() for item in items]
    vae = _vae(tiny_sd1)
    identity = latents_module.vae_id(vae)
    latents_module.write_latent_caches(jobs, vae, identity, progress=False)
    index = DatasetIndex()
    assert all(latents_module.valid_latent_caches(jobs, identity, index))  # opened once: now recorded
    index.save()
    assert index_path(items[0].subset.image_dir, None).is_file()

    headers = _count_calls(monkeypatch, index_module, "image_size")
    reads = _count_calls(monkeypatch, dataset_module, "read_cache")
    opens = _count_calls(monkeypatch, latents_module, "latent_cache_matches")
    index = DatasetIndex()
    again, _ = _items(toml, index)
    table, again_id = load_feature_table(again, index)
    assert all(latents_module.valid_latent_caches([item.latent_job() for item in again], identity, index))
    assert headers == [] and reads == [] and opens == []
    assert again == items and again_id == encoder_id
    assert isinstance(table.blocks[0], np.memmap) and len(table.blocks) == 1
    for k, item in enumerate(items):
        assert torch.equal(table[k], torch.from_numpy(read_cache(item.feature_path)[0])) and torch.equal(table[k], first[k])
    assert torch.equal(table[[3, 1]].tensor(), torch.stack([table[3], table[1]]))


def test_an_edited_image_is_never_served_from_the_index(tiny_tagger, prepared_dataset, tmp_path, capsys):
    """The index in place, an image edited after prepare_features.py: its header is read again (a
    new size reaches the bucket), its old vector is refused with the file named, and the prepare
    job re-encodes exactly that image."""
    toml = small_dataset_copy(prepared_dataset, tmp_path / "data", 4)
    items, _ = _items(toml)
    load_feature_table(items)
    edited = items[2].image_path
    from PIL import Image

    Image.new("RGB", (40, 120), (200, 10, 10)).save(edited, format="PNG" if edited.suffix == ".png" else "JPEG")
    items, _ = _items(toml)
    assert items[2].original_size == (40, 120)
    with pytest.raises(UserError, match=r"1 feature caches were made from another version of their image") as info:
        load_feature_table(items)
    assert edited.name in str(info.value)
    assert prepare_features.main(["--dataset_config", str(toml), "--tagger_model", str(tiny_tagger)]) == 0
    assert "1 written, 3 skipped (valid cache)" in capsys.readouterr().out
    table, _ = load_feature_table(_items(toml)[0])
    assert torch.equal(table[2], torch.from_numpy(read_cache(items[2].feature_path)[0]))


def test_a_replaced_tagger_is_never_served_from_the_index(tiny_tagger, other_tagger, tmp_path, capsys):
    """The tagger file replaced under the same path (new weights, a new encoder id): with the index
    in place, prepare_features.py re-encodes every image instead of skipping them, and training
    gets the new vectors; a subset pinning the old encoder is refused."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        _save_image(images / f"img{i}.png", i)
    tagger = tmp_path / "tagger"
    shutil.copytree(tiny_tagger, tagger)
    args = ["--train_data_dir", str(images), "--tagger_model", str(tagger)]
    assert prepare_features.main(args) == 0
    assert prepare_features.main(args) == 0
    assert "0 written, 3 skipped (valid cache)" in capsys.readouterr().out
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n')
    old_table, old_id = load_feature_table(_items(toml)[0])

    shutil.copy(other_tagger / "model.onnx", tagger / "model.onnx")
    assert prepare_features.main(args) == 0
    assert "3 written, 0 skipped (valid cache)" in capsys.readouterr().out
    table, new_id = load_feature_table(_items(toml)[0])
    assert new_id != old_id and not torch.equal(table[0], old_table[0])
    assert torch.equal(table[0], torch.from_numpy(read_cache(images / "img0_pfg.npz")[0]))
    toml.write_text(toml.read_text() + f'encoder = "{old_id}"\n')
    with pytest.raises(UserError, match="but its subset pins encoder"):
        load_feature_table(_items(toml)[0])


def _save_image(path: Path, seed: int) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)


def test_a_deleted_cache_is_never_served_from_the_index(tiny_sd1, prepared_dataset, tmp_path):
    """The index records a vector and a valid latent cache: once their files are deleted, the
    vector is reported missing and the latent cache is encoded again, not taken from the record."""
    toml = small_dataset_copy(prepared_dataset, tmp_path / "data", 4)
    index = DatasetIndex()
    items, _ = _items(toml, index)
    load_feature_table(items, index)
    jobs = [item.latent_job() for item in items]
    vae = _vae(tiny_sd1)
    identity = latents_module.vae_id(vae)
    latents_module.write_latent_caches(jobs, vae, identity, progress=False)
    assert all(latents_module.valid_latent_caches(jobs, identity, index))
    index.save()

    items[1].feature_path.unlink()
    jobs[3].cache_path.unlink()
    index = DatasetIndex()
    items, _ = _items(toml, index)
    with pytest.raises(UserError, match=r"1 feature caches are missing.*\n  .*" + items[1].feature_path.name):
        load_feature_table(items, index)
    assert latents_module.valid_latent_caches(jobs, identity, index) == [True, True, True, False]
    encoded = latents_module.cache_latents(jobs, vae, to_disk=True, progress=False, index=index)
    assert len(encoded) == 4 and jobs[3].cache_path.is_file()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "foreign", "other version", "not an index"])
def test_a_damaged_or_foreign_index_is_rebuilt_with_a_message(prepared_dataset, tmp_path, capsys, damage):
    toml = small_dataset_copy(prepared_dataset, tmp_path / "data", 4)
    items, _ = _items(toml)
    expected = load_feature_table(items)[0].tensor()  # a copy: the table maps the file damaged below
    path = index_path(items[0].subset.image_dir, None)
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "other version":
        data[8] += 1
    elif damage == "not an index":
        data = bytearray(b"hello" * 20)
    else:  # another folder's index copied in
        other = small_dataset_copy(prepared_dataset, tmp_path / "other", 4)
        other_items, _ = _items(other)
        load_feature_table(other_items)
        data = bytearray(index_path(other_items[0].subset.image_dir, None).read_bytes())
    path.write_bytes(bytes(data))
    capsys.readouterr()

    again, _ = _items(toml)
    table, _ = load_feature_table(again)
    out = capsys.readouterr().out
    reason = {"flipped byte": "is damaged", "truncated": "is damaged", "foreign": "was written for another folder",
              "other version": "has format version 2", "not an index": "is not a PFG index"}[damage]
    assert f"index {path} {reason}" in out and "rebuilding it" in out
    assert again == items and torch.equal(table.tensor(), expected)
    capsys.readouterr()
    _items(toml)
    assert "rebuilding" not in capsys.readouterr().out  # rebuilt: trusted again


def test_an_image_folder_that_cannot_hold_the_index_is_read_without_it(prepared_dataset, tmp_path, monkeypatch, capsys):
    """Images on a read-only (or full) file system: writing the index fails as the disk refuses it
    (fileio's WriteFailed), and the start goes on with a note instead of stopping."""
    import errno

    from library.fileio import failures_said

    def read_only(path, *args, **kwargs):
        with failures_said(Path(path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    toml = small_dataset_copy(prepared_dataset, tmp_path / "data", 3)
    monkeypatch.setattr(index_module, "atomic_path", read_only)
    items, failures = _items(toml, DatasetIndex(say=print))
    assert len(items) == 3 and not failures
    assert "note: cannot write the index" in capsys.readouterr().out
    assert not index_path(items[0].subset.image_dir, None).exists()
