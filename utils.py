"""The pieces train.py and generate.py share: tokenizer, data, checkpoints, devices.

Every mistake a user can make (a missing file, a bad flag, a prompt the model cannot read)
raises UsageError; the scripts print its message as one line and exit with code 2.
"""

import contextlib
import hashlib
import os
import urllib.request

import torch

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = os.path.join("data", "input.txt")


class UsageError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per character

class CharTokenizer:
    """Vocabulary = the sorted distinct characters of the training text; token id = index."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise UsageError(f"characters not in the model's vocabulary: {''.join(unknown)!r}; "
                             f"use only characters from the training text")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def to_dict(self):
        """Plain data for the checkpoint (loadable with weights_only=True)."""
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, state):
        return cls(state["chars"])


# ---------------------------------------------------------------------------------------------
# Data

def read_text(path):
    """Read a UTF-8 text file, fetching Tiny Shakespeare first if it is the default path."""
    if not os.path.exists(path) and os.path.normpath(path) == DEFAULT_DATA:
        download_tiny_shakespeare(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}; pass --data PATH to a UTF-8 text file")
    except IsADirectoryError:
        raise UsageError(f"data path is a directory: {path}; pass --data PATH to a text file")
    except PermissionError:
        raise UsageError(f"cannot read data file {path}: permission denied")
    except UnicodeDecodeError as err:
        raise UsageError(f"data file {path} is not UTF-8 text (bad byte at offset {err.start}); "
                         f"convert it to UTF-8 first")
    if not text:
        raise UsageError(f"data file {path} is empty; give it some text to learn from")
    return text


def download_tiny_shakespeare(path):
    print(f"Downloading Tiny Shakespeare to {path}...")
    try:
        with urllib.request.urlopen(DATA_URL, timeout=30) as response:
            payload = response.read()
    except OSError as err:
        raise UsageError(f"could not download Tiny Shakespeare ({err}); offline? Save {DATA_URL} "
                         f"as {path} by hand, or pass --data PATH to another text file")
    if hashlib.sha256(payload).hexdigest() != DATA_SHA256:
        raise UsageError(f"downloaded Tiny Shakespeare has the wrong sha256; save {DATA_URL} "
                         f"as {path} by hand")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: open(tmp, "wb").write(payload))


def split_data(data, val_fraction=0.1):
    """First 90% of the tokens for training, the last 10% for validation."""
    n_train = int(len(data) * (1 - val_fraction))
    return data[:n_train], data[n_train:]


def get_batch(data, batch_size, block_size, generator=None):
    """Random (x, y) blocks from a 1-D token tensor; y is x shifted left by one: (B, T) each.

    Sampling happens where the data lives (the GPU, if it is there): no Python loop, no copy.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), device=data.device,
                           generator=generator)
    offsets = torch.arange(block_size + 1, device=data.device)
    windows = data[starts[:, None] + offsets]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------
# Checkpoints: only tensors and plain Python values, so loading can never run code

def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash leaves the old file or the new one."""
    tmp_path = f"{path}.tmp"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}; train one with `python train.py` "
                         f"or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UsageError(f"{path} needs pickle to load, which can run code; refusing. "
                             f"Use a checkpoint saved by this project's train.py")
        raise UsageError(f"{path} is not a readable checkpoint (truncated or another format); "
                         f"retrain or pass another --checkpoint")
    if not isinstance(checkpoint, dict) or not {"model", "model_args", "tokenizer"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a Mini-GPT checkpoint (no model, model_args or "
                         f"tokenizer); pass one saved by train.py")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Devices and precision

def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA GPU is available; "
                         f"use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but MPS is not available; use --device cpu")
    if name.split(":")[0] not in ("cuda", "mps", "cpu"):
        raise UsageError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu")
    return name


def pick_dtype(name, device):
    """'auto' -> bfloat16 on GPUs that support it, float16 on older GPUs, bfloat16 on CPUs
    with native bf16 instructions, else float32 (see README for the measured speed-ups)."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def cpu_has_native_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device, dtype):
    """Mixed precision: matmuls in bf16/fp16, weights and the optimizer stay in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))
