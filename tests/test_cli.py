"""Every user command answers --help (exit 0, its options listed), as argparse users expect."""
from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("script, option", [
    ("prepare_features", "--tagger_model"), ("train_pfg", "--pfg_num_tokens"),
    ("gen_pfg", "--pfg_scale"), ("eval_pfg", "--n_boot"),  # eval's help holds a literal "95%"
])
def test_help_lists_the_options(script, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and option in out
