"""The scripts as a user runs them: train.py then generate.py, and every bad input giving one
clear line on stderr, exit code 2, no traceback."""

import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate
import train
from conftest import ROOT, TINY_FLAGS, TINY_TEXT, run_script
from utils import run_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train a tiny model for a few steps once; the tests below generate from it."""
    folder = tmp_path_factory.mktemp("run")
    data = folder / "tiny.txt"
    data.write_text(TINY_TEXT)
    ckpt = folder / "ckpt.pt"
    result = run_script("train.py", "--data", data, "--checkpoint", ckpt, "--max_iters", "30",
                        "--eval_interval", "10", *TINY_FLAGS)
    return result, ckpt, data


def test_train_prints_the_documented_lines_in_order(trained):
    result, ckpt, data = trained
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    text = data.read_text()
    vocab_size = len(set(text))
    expected_start = ["Loading data...", f"Dataset length: {len(text)} characters",
                      f"Vocabulary size: {vocab_size}"]
    number_format, attention, optimizer = lines[:3]  # what runs, and why
    assert number_format.split(":")[0] in ("float32", "bf16 autocast") and "native bf16" in number_format
    assert attention == "written-out attention: faster on CPUs (--flash true for the other)"
    assert optimizer.startswith("AdamW (--optimizer muon")
    assert lines[3:6] == expected_start
    assert lines[6].startswith("Model parameters: ") and "," in lines[6]
    assert "Starting training for 30 iterations..." in lines
    steps = [line for line in result.stdout.splitlines() if "Step " in line]
    assert [s.split(":")[0].split("Step ")[1] for s in steps] == ["0", "10", "20", "30"]
    step0_loss = float(steps[0].split("train loss ")[1].split(",")[0])
    assert abs(step0_loss - math.log(vocab_size)) < 0.15  # nothing learned yet
    assert "Sample:" in result.stdout


def test_checkpoint_holds_plain_data_only(trained):
    _, ckpt, _ = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["step"] == 30 and checkpoint["tokenizer"]["kind"] == "char"
    assert {"model", "model_args", "optimizer", "config", "val_loss"} <= checkpoint.keys()


def test_generate_prints_header_then_prompt_and_text(trained):
    _, ckpt, _ = trained
    result = run_script("generate.py", "--checkpoint", ckpt, "--prompt", "ROMEO:",
                        "--max_new_tokens", "50", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    val_loss = torch.load(ckpt, weights_only=True)["best"]["val_loss"]
    assert lines[:8] == ["GENERATING TEXT", "=" * 60, "Prompt: ROMEO:", "Max tokens: 50",
                         "Temperature: 0.8", "Top-k: 200",
                         f"Weights: best, val loss {val_loss:.4f} at step 30", "=" * 60]
    body = "\n".join(lines[9:])
    assert body.startswith("ROMEO:") and len(body) == len("ROMEO:") + 50


def test_generate_past_block_size_and_seed_repeatable(trained):
    _, ckpt, _ = trained
    args = ["--checkpoint", ckpt, "--max_new_tokens", "100", "--device", "cpu", "--seed", "7"]
    first, second = run_script("generate.py", *args), run_script("generate.py", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # block_size is 32: 100 tokens slide the window


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_generate_with_16_or_32_bit_weights(trained, dtype):
    _, ckpt, _ = trained
    result = run_script("generate.py", "--checkpoint", ckpt, "--max_new_tokens", "40",
                        "--device", "cpu", "--dtype", dtype, "--prompt", "ROMEO:")
    assert result.returncode == 0, result.stderr
    assert "\nROMEO:" in result.stdout.split("=" * 60)[-1]


def test_generate_several_samples(trained):
    _, ckpt, _ = trained
    result = run_script("generate.py", "--checkpoint", ckpt, "--num_samples", "3",
                        "--max_new_tokens", "30", "--device", "cpu", "--prompt", "JULIET:")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 3


def test_interactive_prompt_loop(trained):
    _, ckpt, _ = trained
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(ckpt),
                             "--interactive", "--max_new_tokens", "10", "--device", "cpu"],
                            input="ROMEO:\nQ\u00e9\nJULIET:\n\n", capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 4  # three prompts and the empty line that quits
    assert "ROMEO:" in result.stdout and "JULIET:" in result.stdout
    assert "not in the model's vocabulary" in result.stdout  # and the loop went on


def expect_usage_error(result, message):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line


def expect_usage_error_in_process(main, args, message, capsys):
    """As expect_usage_error, through the same run_main() the scripts use, without paying for a
    new Python process per case."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main([str(a) for a in args]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy)"),
    (["--top_k", "0"], "--top_k must be at least 1"),
    (["--top_p", "1.5"], "--top_p must be from 1e-6 to 1"),
    (["--max_new_tokens", "-5"], "--max_new_tokens must be >= 0"),
    (["--prompt", "ROMEO\u00e9"], "not in the model's vocabulary"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--nope"], "unrecognized arguments"),
    (["--top_k", "many"], "invalid int value"),
    (["--dtype", "int4"], "invalid choice"),
])
def test_generate_bad_input(trained, args, message, capsys):
    _, ckpt, _ = trained
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    expect_usage_error_in_process(generate.main, ["--checkpoint", ckpt, *args], message, capsys)


def test_generate_bad_input_in_a_real_process(trained):
    _, ckpt, _ = trained
    expect_usage_error(run_script("generate.py", "--checkpoint", ckpt, "--temperature", "-1"),
                       "--temperature must be 0 (greedy)")


def test_generate_bad_checkpoints(tmp_path):
    expect_usage_error(run_script("generate.py", "--checkpoint", tmp_path / "none.pt"),
                       "checkpoint not found")
    truncated = tmp_path / "bad.pt"
    truncated.write_bytes(b"PK\x03\x04 definitely not finished")
    expect_usage_error(run_script("generate.py", "--checkpoint", truncated),
                       "damaged checkpoint")


@pytest.mark.parametrize("make_data, args, message", [
    (None, ["--data", "missing.txt"], "data file not found"),
    (lambda p: p.write_text(""), [], "is empty"),
    (lambda p: p.write_bytes(b"\xff\xfe caf\xe9"), [], "not UTF-8"),
    (lambda p: p.write_text("short text"), [], "too few for block_size"),
    (lambda p: p.write_text("x" * 500), ["--n_embd", "30", "--n_head", "4"], "divisible by n_head"),
    (lambda p: p.write_text("x" * 500), ["--max_iters", "ten"], "invalid int value"),
    (lambda p: p.write_text("x" * 500), ["--colour", "red"], "unrecognized arguments"),
])
def test_train_bad_input(tmp_path, make_data, args, message, capsys):
    data = tmp_path / "data.txt"
    if make_data:
        make_data(data)
    expect_usage_error_in_process(
        train.main, ["--data", data, "--checkpoint", tmp_path / "c.pt", "--device", "cpu", *args],
        message, capsys)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    ckpt = tmp_path / "ckpt.pt"
    common = ["--data", tiny_data, "--checkpoint", ckpt, *TINY_FLAGS]
    assert run_script("train.py", *common, "--max_iters", "5", "--eval_interval", "5").returncode == 0
    good = torch.load(ckpt, weights_only=True)
    result = run_script("train.py", *common, "--max_iters", "40", "--eval_interval", "1",
                        "--learning_rate", "1e30", "--weight_decay", "0", "--grad_clip", "0",
                        "--warmup_iters", "1")
    expect_usage_error(result, "NaN or infinite")
    after = torch.load(ckpt, weights_only=True)
    assert after["step"] == good["step"] == 5


def test_ctrl_c_saves_and_stops_cleanly_with_cpu_warning(tmp_path, tiny_data):
    ckpt = tmp_path / "ckpt.pt"
    # The default GPU-sized model on the CPU for a long run: it warns up front, then trains
    # until Ctrl-C.
    process = subprocess.Popen(
        [sys.executable, "train.py", "--data", tiny_data, "--checkpoint", str(ckpt),
         "--device", "cpu", "--batch_size", "2", "--eval_iters", "1", "--sample_tokens", "0",
         "--block_size", "64", "--max_iters", "1000000", "--log_interval", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("Starting training"):
            break
    log, deadline = tmp_path / "ckpt.pt.metrics.jsonl", time.time() + 120
    while time.time() < deadline and '"loss"' not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)  # a step is done (a Ctrl-C before that saves nothing)
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=60)
    output = "".join(output) + rest
    assert process.returncode == 0, errors
    assert "will take hours" in output and "--preset cpu" in output
    assert f"checkpoint saved to {ckpt}" in output
    assert torch.load(ckpt, weights_only=True)["step"] >= 1
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "ckpt.pt.loss.png").exists()  # drawn at the stop, the last evaluation


def test_bench_generate_prints_the_summary_line():
    result = run_script("bench.py", "generate", "--device", "cpu", "--tokens", "5")
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"generate: cache [\d,]+ tok/s, no-cache [\d,]+ tok/s, speedup \d+\.\d\dx",
                        last_line), last_line


def test_a_reader_that_stops_early_ends_generation_quietly(trained):
    """`python generate.py | head -3`: when the pipe closes, generate.py stops without a
    traceback."""
    _, ckpt, _ = trained
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint",
                                ckpt, "--max_new_tokens", "100000", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout.readline() == b"GENERATING TEXT\n"
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and b"Traceback" not in err, err


def test_bench_explore_prints_the_live_pages_server_times():
    result = run_script("bench.py", "explore", "--device", "cpu", "--steps", "1", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "the default model (10,788,929 parameters)" in result.stdout
    assert re.fullmatch(r"keystroke \(255 -> 256 characters\): median \d+ ms of server time over "
                        r"1 rounds", lines[-2]), lines[-2]
    assert lines[-1].startswith("paste (256 characters): median ")
