"""A kohya user's habits through the entry points: their command lines (kohya's flag names, hints
for the ones without an equivalent, did-you-mean, every --config_file mistake at once,
--output_config, --sample_at_first), prompt files in kohya's forms, and readable --help texts."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import toml
import torch

import train_pfg
from library.cli_config import parse_settings
from library.errors import UserError
from library.train.settings import TrainSettings
from tests.dataset_copies import small_dataset_copy

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers schedulers


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def settings(*argv: str) -> TrainSettings:
    return parse_settings(TrainSettings, ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *argv], "")[0]


def test_kohya_flag_names_mean_the_same_here():
    s = settings("--network_module=networks.lora", "--network_args", "conv_dim=4", "conv_alpha=2", "--unet_lr=2e-4",
                 "--learning_rate=1e-6", "--max_data_loader_n_workers", "3", "--save_last_n_epochs", "2",
                 "--caption_extension", ".txt", "--enable_bucket", "--no_half_vae")
    assert (s.train_unet, s.network_conv_dim, s.network_conv_alpha, s.learning_rate) == ("lora", 4, 2.0, 2e-4)
    assert (s.dataloader_workers, s.save_last_n, s.caption_extension, s.enable_bucket, s.no_half_vae) == (3, 2, ".txt", True, True)
    assert settings().train_unet == "full" and settings("--learning_rate", "3e-5").learning_rate == 3e-5
    notes = settings("--v2", "--network_train_unet_only", "--persistent_data_loader_workers").notes()
    assert len(notes) == 3 and "changes nothing" in notes[0]
    for argv, message in [
        (["--network_module", "networks.dylora"], "PFG trains kohya's LoRA only"),
        (["--network_module", "networks.lora", "--train_unet", "full"], "trains a LoRA, but --train_unet is 'full'"),
        (["--network_args", "algo=lokr"], "only conv_dim=N and conv_alpha=A apply"),
        (["--network_args", "conv_dim=four"], "conv_dim needs a number"),
    ]:
        with pytest.raises(UserError, match=message):
            settings(*argv)
    with pytest.raises(UserError, match="--full_fp16 needs --mixed_precision fp16"):
        settings("--full_fp16").validate()


def test_unknown_flags_get_did_you_mean_or_kohyas_hint_all_at_once(tmp_path):
    with pytest.raises(UserError) as info:
        train_pfg.main(["--pretrained_model_name_or_path", "m", "--learnig_rate", "1e-4", "--text_encoder_lr=1e-5",
                        "--mem_eff_attn", "--totally_unknown"])
    message = str(info.value)
    assert message.startswith("4 problems with the command line:")
    assert "unrecognized argument --learnig_rate (did you mean '--learning_rate'?)" in message
    assert "--text_encoder_lr: PFG keeps the text encoder frozen" in message and "--mem_eff_attn: use --sdpa" in message
    assert "unrecognized argument --totally_unknown" in message
    result = subprocess.run([sys.executable, "train_pfg.py", "--pretrained_model_name_or_path", "m", "--shuffle_captions"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: unrecognized argument --shuffle_captions (did you mean '--shuffle_caption'?)" in result.stderr


def test_config_file_reports_every_mistake_at_once_and_takes_kohya_names(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nlearning_rat = 1e-4\nmax_train_steps = "many"\ntext_encoder_lr = 1e-5\n'
                   '[model]\ntrain_unet = "half"\n')
    with pytest.raises(UserError) as info:
        train_pfg.main(["--config_file", str(bad)])
    lines = str(info.value).splitlines()
    assert lines[0] == f"4 problems in {bad}:"
    assert f"  {bad}: unknown key 'learning_rat' (did you mean 'learning_rate'?)" in lines
    assert f"  {bad}: key 'max_train_steps' must be int, got str 'many'" in lines
    assert any("key 'text_encoder_lr': PFG keeps the text encoder frozen" in line for line in lines)
    assert any("key 'train_unet' must be one of none, full, lora, got 'half'" in line for line in lines)
    kohya = tmp_path / "kohya.toml"  # a kohya training config's own names
    kohya.write_text('network_module = "networks.lora"\nunet_lr = 5e-4\nmax_data_loader_n_workers = 2\n')
    s, _ = parse_settings(TrainSettings, ["--config_file", str(kohya), "--pretrained_model_name_or_path", "m"], "")
    assert (s.train_unet, s.learning_rate, s.dataloader_workers) == ("lora", 5e-4, 2)


def test_output_config_writes_the_given_settings_and_exits(tmp_path, capsys):
    target = tmp_path / "mine"
    with pytest.raises(SystemExit) as exit_info:
        train_pfg.main(["--pretrained_model_name_or_path", "model.safetensors", "--network_module", "networks.lora",
                        "--learning_rate", "1e-4", "--shuffle_caption", "--config_file", str(target), "--output_config"])
    assert exit_info.value.code == 0 and f"wrote {target}.toml" in capsys.readouterr().out
    written = toml.load(f"{target}.toml")
    assert written == {"pretrained_model_name_or_path": "model.safetensors", "network_module": "networks.lora",
                       "learning_rate": 1e-4, "shuffle_caption": True}
    s, _ = parse_settings(TrainSettings, ["--config_file", f"{target}.toml"], "")  # and it reads back
    assert (s.train_unet, s.shuffle_caption) == ("lora", True)
    with pytest.raises(UserError, match="already exists"):
        train_pfg.main(["--config_file", f"{target}.toml", "--output_config"])


@pytest.mark.parametrize("script", ["train_pfg", "gen_pfg", "prepare_features", "eval_pfg"])
def test_help_texts_say_each_default_once_and_keep_the_examples(script, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "(default: )" not in flat and "(default: None)" not in flat and "(default: False)" not in flat
    assert not re.search(r"\(default[^)]*\)[^(]{0,3}\(default", flat)  # never two defaults for one option
    if script in ("train_pfg", "gen_pfg"):
        assert "--sdpa, --no-sdpa torch scaled-dot-product attention (default: used unless --xformers)" in flat
    doc = importlib.import_module(script).__doc__
    example = next(line for line in doc.splitlines() if line.strip().startswith("python") or "launch" in line)
    assert example in out  # the usage example keeps its own line
    if script == "gen_pfg":
        assert "SDXL" in out.split("options:")[0]  # the description names every family it runs


def test_no_half_vae_keeps_the_vae_in_fp32(tiny_sd1):
    from library.models.loading import load_sd_model
    from library.train.setup import prepare_sd_model

    for flags, dtype in (([], torch.bfloat16), (["--no_half_vae"], torch.float32)):
        model = load_sd_model(str(tiny_sd1))
        prepare_sd_model(model, settings("--mixed_precision", "bf16", *flags), torch.device("cpu"))
        assert next(model.vae.parameters()).dtype == dtype and next(model.text_encoder.parameters()).dtype == torch.bfloat16


def test_kohya_train_network_command_from_its_docs_runs_as_train_pfg(tiny_sd1, prepared_dataset, tmp_path):
    """kohya's docs/train_network.md SD1.5 LoRA command, unchanged but for the script name and the
    PFG flag (--pfg_num_tokens); --full_fp16 trains fp16 weights the same way."""
    from safetensors.torch import load_file

    data = small_dataset_copy(prepared_dataset, tmp_path / "data", 2)  # batch 2: one step per epoch
    out = tmp_path / "out"
    command = (f'--pretrained_model_name_or_path="{tiny_sd1}" --dataset_config="{data}" --output_dir="{out}" '
               '--output_name="my_lora" --save_model_as=safetensors --network_module=networks.lora --network_dim=16 '
               '--network_alpha=1 --learning_rate=1e-4 --optimizer_type="AdamW8bit" --lr_scheduler="constant" --sdpa '
               '--max_train_epochs=10 --save_every_n_epochs=1 --mixed_precision="fp16" --gradient_checkpointing')
    argv = [part.replace('"', "") for part in command.split()]  # what the shell hands over
    assert train_pfg.main([*argv, "--pfg_num_tokens", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["my_lora-lora.safetensors", "my_lora-pfg.safetensors", "my_lora-settings.toml",
                            *(f"my_lora-{e:06d}-{kind}.safetensors" for e in range(1, 10) for kind in ("lora", "pfg"))])
    lora = load_file(str(out / "my_lora-lora.safetensors"))
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert all(float(v) == 1.0 for k, v in lora.items() if k.endswith(".alpha"))  # --network_alpha=1

    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append({p.dtype for group in self.param_groups for p in group["params"]})
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", spy)
        assert train_pfg.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--dataset_config", str(data),
                               "--output_dir", str(tmp_path / "fp16"), "--network_module", "networks.lora", "--network_dim", "2",
                               "--optimizer_type", "AdamW", "--mixed_precision", "fp16", "--full_fp16",
                               "--max_train_steps", "1", "--pfg_num_tokens", "2"]) == 0
    assert seen == [{torch.float16}]  # the LoRA and the PFG head train in fp16 themselves


def test_toml_and_json_prompt_files_render_one_sample_each(tiny_sd1, prepared_dataset, tmp_path):
    """Training samples from kohya's JSON form, the first of them before training (--sample_at_first);
    gen_pfg.py --from_file with kohya's TOML form: one image per prompt, at its size, seed and steps."""
    from PIL import Image

    import gen_pfg
    from library.sample.image_outputs import read_parameters

    prompts = tmp_path / "prompts.json"
    prompts.write_text('[{"prompt": "illustration of *", "width": 64, "height": 32, "seed": 7, "sample_steps": 2},'
                       ' "illustration of * --w 32 --h 64 --d 8 --s 2"]')
    data = small_dataset_copy(prepared_dataset, tmp_path / "data", 2)
    assert train_pfg.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--dataset_config", str(data),
                           "--output_dir", str(tmp_path / "out"), "--output_name", "t", "--train_unet", "none",
                           "--max_train_steps", "1", "--pfg_num_tokens", "2", "--sample_prompts", str(prompts),
                           "--sample_at_first"]) == 0
    samples = sorted((tmp_path / "out" / "sample").iterdir())
    assert [p.name for p in samples] == ["t_000000_00_7.png", "t_000000_01_8.png"]
    assert [Image.open(p).size for p in samples] == [(64, 32), (32, 64)]

    kohya_toml = tmp_path / "prompts.toml"
    kohya_toml.write_text('[prompt]\nwidth = 64\nheight = 64\nsample_steps = 2\nnegative_prompt = "lowres"\n'
                          '[[prompt.subset]]\nprompt = "a cat"\nseed = 3\n'
                          '[[prompt.subset]]\nprompt = "a dog"\nseed = 4\nwidth = 32\nsample_steps = 3\n')
    assert gen_pfg.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--from_file", str(kohya_toml),
                         "--outdir", str(tmp_path / "gen")]) == 0
    cat, dog = sorted((tmp_path / "gen").glob("*.png"))
    assert (cat.name, Image.open(cat).size, dog.name, Image.open(dog).size) == ("00000-3.png", (64, 64), "00001-4.png", (32, 64))
    assert "Steps: 2" in read_parameters(cat) and "Steps: 3" in read_parameters(dog) and "Negative prompt: lowres" in read_parameters(dog)
