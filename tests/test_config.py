"""What config.py promises: the default model's settings, every field a flag, presets, clear errors."""

import pytest

from config import PRESETS, Config, check_config, field_comments, parse_config
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


@pytest.mark.parametrize("argv, message", [
    (["--n_head", "5", "--dropout", "2"],
     r"n_embd \(384\) must be divisible by n_head \(5\); pick e.g. --n_head 4"),
    (["--learning_rate", "0", "--dropout", "2"], r"--dropout must be in \[0, 1\)"),
    (["--weight_decay", "-1", "--min_lr", "1"], "--min_lr must be from 0 to --learning_rate"),
])
def test_with_several_bad_flags_the_first_checked_is_named(argv, message):
    # The shape first, then the ranges and relations in check_config's order.
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "-1"], "--learning_rate must be above 0, got -1.0"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--dropout", "inf"], "--dropout must be a finite number, got inf"),
    (["--muon_lr", "0"], "--muon_lr must be above 0"),
    (["--min_lr", "0.01"], r"--min_lr must be from 0 to --learning_rate \(0.001\), got 0.01"),
    (["--weight_decay", "-0.1"], "--weight_decay must be 0 or more"),
    (["--weight_decay", "2000"], "--weight_decay times --learning_rate must be below 1"),
    (["--optimizer", "muon", "--weight_decay", "20"], "--weight_decay times --muon_lr"),
    (["--beta2", "1"], r"--beta2 must be in \[0, 1\), got 1.0"),
    (["--grad_clip", "-1"], "--grad_clip must be 0 or more"),
    (["--seed", "-1"], r"--seed must be from 0 to 2\*\*63 - 1, got -1"),
    (["--seed", str(2**63)], "--seed must be from 0 to 2"),
    (["--warmup_iters", "-5"], "--warmup_iters must be 0 or more"),
    (["--lr_decay_iters", "-5"], "--lr_decay_iters must be 0 or more"),
    (["--sample_tokens", "-1"], "--sample_tokens must be 0 or more"),
    (["--n_head", "0"], "--n_head must be at least 1, got 0"),  # not a division by zero
    (["--vocab_size", "100"], "--vocab_size .* must be at least 256"),
    (["--device", "cuda:x"], "--device must be auto, cuda, cuda:N, mps or cpu, got 'cuda:x'"),
    (["--data", ""], "--data must not be empty"),
    (["--checkpoint", " "], "--checkpoint must not be empty"),
    (["--wandb_project", "team/run"], "--wandb_project must be at most 128 characters"),
    (["--resume="], "--resume was given an empty path"),
])
def test_every_field_is_checked_before_any_work(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


def test_a_huge_n_head_gets_its_suggestion_at_once():
    with pytest.raises(UsageError, match="pick e.g. --n_head 384"):
        parse_config(["--n_head", str(10**18 + 1)])  # no search through a quintillion numbers


def test_fields_of_the_wrong_type_are_refused():
    for field, value in (("n_embd", "384"), ("dropout", True), ("wandb", "yes"), ("data", 3)):
        with pytest.raises(UsageError, match=f"--{field} must be"):
            check_config(Config(**{field: value}))


def test_accepted_edges_pass():
    config, _ = parse_config(["--min_lr", "0", "--warmup_iters", "0", "--weight_decay", "0",
                              "--grad_clip", "0", "--beta1", "0", "--seed", str(2**63 - 1),
                              "--learning_rate", "1e30", "--resume"])
    assert config.resume == "true" and config.seed == 2**63 - 1
