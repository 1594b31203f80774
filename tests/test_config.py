"""What config.py promises: the default model's settings, every field a flag, presets, clear errors."""

import pytest
import torch

from config import PRESETS, Config, field_comments, parse_config
from utils import UsageError


def test_defaults_are_the_default_models():
    config, preset = parse_config([])
    assert (config.n_embd, config.n_layer, config.n_head, config.block_size) == (384, 6, 6, 256)
    assert (config.dropout, config.batch_size, config.max_iters, config.eval_interval) == \
        (0.2, 64, 5000, 500)
    assert config.device == "auto" and preset is None


def test_both_flag_spellings_and_types():
    config, _ = parse_config(["--n_layer", "3", "--learning_rate=3e-4", "--flash", "false",
                              "--data", "x.txt"])
    assert config.n_layer == 3 and config.learning_rate == 3e-4
    assert config.flash == "false" and config.data == "x.txt"


def test_every_field_is_a_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in Config.__dataclass_fields__:
        assert f"--{name}" in help_text
    assert field_comments().keys() == Config.__dataclass_fields__.keys()  # each has its why
    assert "width of the residual stream" in help_text


def test_preset_then_overrides():
    config, preset = parse_config(["--preset", "cpu", "--max_iters", "7"])
    assert preset == "cpu"
    assert config.n_embd == PRESETS["cpu"]["n_embd"]
    assert config.max_iters == 7


@pytest.mark.parametrize("argv, message", [
    (["--n_layer", "two"], "invalid int value: 'two'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--wandb", "maybe"], "expected true or false"),
    (["--preset", "tpu"], "invalid choice"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--n_embd", "100", "--n_head", "6"], "divisible by n_head"),
    (["--dropout", "1.5"], "--dropout"),
    (["--batch_size", "0"], "--batch_size"),
    (["--dtype", "float8"], "--dtype"),
    (["--flash", "maybe"], "--flash must be auto, true or false"),
    (["--optimizer", "sgd"], "--optimizer must be adamw or muon"),
])
def test_bad_values_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


def test_muon_on_a_pytorch_without_it_says_what_to_do(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(UsageError, match="PyTorch 2.9 or newer.*--optimizer adamw"):
        parse_config(["--preset", "cpu"])
