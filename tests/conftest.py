"""Shared test helpers: a tiny corpus, a tiny model config, and a way to run the scripts."""

import contextlib
import io
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY_TEXT = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n"
    "Deny thy father and refuse thy name.\n\n"
) * 20

# Flags for a model small enough to train for a few steps in about a second.
TINY_FLAGS = ["--n_embd", "32", "--n_layer", "2", "--n_head", "4", "--block_size", "32",
              "--batch_size", "8", "--eval_iters", "2", "--dropout", "0.0", "--device", "cpu",
              "--sample_tokens", "20", "--warmup_iters", "2"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU, skipped without one; `pytest -m cuda tests` runs "
                   "just these (tests/test_cuda.py)")


@pytest.fixture
def tiny_data(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return str(path)


def run_script(script, *args, timeout=120):
    """Run train.py or generate.py as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_in_process(main, argv, torchrun=None):
    """(exit code, stdout, stderr) of a script's main(argv), run as the script runs it (through
    utils.run_main) but in this process, which is much faster than a new one. Anything but a
    clean return or SystemExit (a traceback, for a user) fails the calling test right there.
    One thread: tiny models run faster so, and much faster on a shared machine. Puts back the
    thread count and the Ctrl-C handler that a training run installs. torchrun: run_main's
    (None: as the script runs it, True for train.py's main)."""
    from utils import run_main
    handler, threads = signal.getsignal(signal.SIGINT), torch.get_num_threads()
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(lambda: main([str(arg) for arg in argv]),
                     torchrun=main.__module__ == "train" if torchrun is None else torchrun)
    except SystemExit as exit_info:
        code = exit_info.code or 0
    finally:
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def tiny_model(**overrides):
    from model import GPTConfig, GPTModel
    torch.manual_seed(0)
    args = dict(vocab_size=20, n_embd=32, n_layer=2, n_head=4, block_size=16, dropout=0.0)
    return GPTModel(GPTConfig(**{**args, **overrides})).eval()


def random_batch(batch_size, block_size, device="cpu", seed=None):
    """(x, y) of random tokens below tiny_model's 20, y shifted by one as in dataset.get_batch:
    for tests of a training step, where what the tokens say does not matter. (B, T) each."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 20, (batch_size, block_size + 1), generator=generator)
    return windows[:, :-1].to(device), windows[:, 1:].to(device)
