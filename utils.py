"""The pieces train.py and generate.py share: tokenizer, data, checkpoints, devices.

Every mistake a user can make (a missing file, a bad flag, a prompt the model cannot read)
raises UsageError; the scripts print its message as one line and exit with code 2.
"""

import collections
import contextlib
import hashlib
import math
import os
import re
import shutil
import sys
import urllib.request

import torch

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = os.path.join("data", "input.txt")


class UsageError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def run_main(main):
    """Run a script's main(): a UsageError becomes one line on stderr and exit code 2, and
    Ctrl-C (one that main does not handle itself) exits with 130, without a traceback."""
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Tokenizers. Both turn text into a list of ints and back, and travel inside the checkpoint as
# plain data (to_dict / tokenizer_from_dict), so generate.py needs nothing else.

class CharTokenizer:
    """One token per character. Vocabulary = the sorted distinct characters of the text."""

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
        return {"kind": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    """Byte-level byte-pair encoding (BPE), as GPT-2 uses.

    How it works. Text is first turned into UTF-8 bytes: 256 base tokens, so any text in any
    script (Chinese, emoji) can be encoded, and decoding gives it back exactly. Training then
    repeats one step: find the pair of adjacent tokens that occurs most often in the training
    text and make it a new token (b"t" + b"h" -> b"th", later b"th" + b"e" -> b"the"), until
    the vocabulary has vocab_size tokens. Frequent words end up as a single token, rare ones
    as a few pieces, so a token covers several characters on average. Encoding applies the
    learned merges in the order they were learned.

    Pairs are never merged across word boundaries: the text is first split into chunks (a word
    with its leading space, a run of digits, of punctuation or of underscores, a run of spaces),
    which keeps tokens meaningful and lets each distinct chunk be counted and encoded once.
    """

    CHUNK = re.compile(r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+| ?_+|\s+(?!\S)|\s+")

    def __init__(self, merges):
        self.merges = [tuple(pair) for pair in merges]
        self.rank = {pair: 256 + i for i, pair in enumerate(self.merges)}  # pair -> new token
        self.token_bytes = [bytes([b]) for b in range(256)]
        for left, right in self.merges:
            self.token_bytes.append(self.token_bytes[left] + self.token_bytes[right])
        self.cache = {}

    @classmethod
    def train(cls, text, vocab_size):
        if vocab_size < 256:
            raise UsageError(f"--vocab_size for BPE must be at least 256 (the byte tokens), "
                             f"got {vocab_size}")
        chunk_counts = collections.Counter(cls.CHUNK.findall(text))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        counts = list(chunk_counts.values())
        pair_counts = collections.Counter()
        words_with = collections.defaultdict(set)  # pair -> indices of words that contain it
        for i, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += counts[i]
                words_with[pair].add(i)
        merges = []
        for new_token in range(256, vocab_size):
            if not pair_counts:
                break  # every chunk is a single token already
            best = max(pair_counts, key=pair_counts.get)
            merges.append(best)
            # Only the words containing `best` change: take their old pairs out of the counts,
            # merge, and put their new pairs in.
            for i in words_with.pop(best):
                old = words[i]
                for pair in zip(old, old[1:]):
                    pair_counts[pair] -= counts[i]
                    if pair_counts[pair] <= 0:
                        del pair_counts[pair]
                words[i] = merge_pair(old, best, new_token)
                for pair in zip(words[i], words[i][1:]):
                    pair_counts[pair] += counts[i]
                    words_with[pair].add(i)
        return cls(merges)

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def encode(self, text):
        ids = []
        for chunk in self.CHUNK.findall(text):
            if chunk not in self.cache:
                self.cache[chunk] = self.encode_chunk(chunk)
            ids.extend(self.cache[chunk])
        return ids

    def encode_chunk(self, chunk):
        tokens = list(chunk.encode("utf-8"))
        while len(tokens) > 1:
            # Apply the earliest-learned merge present; later merges build on earlier ones.
            pair = min(zip(tokens, tokens[1:]), key=lambda p: self.rank.get(p, float("inf")))
            if pair not in self.rank:
                break
            tokens = merge_pair(tokens, pair, self.rank[pair])
        return tokens

    def decode(self, ids):
        # A sampled sequence can stop inside a multi-byte character: show it as U+FFFD.
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": "bpe", "merges": [list(pair) for pair in self.merges]}


def merge_pair(tokens, pair, new_token):
    """tokens with every occurrence of the adjacent pair replaced by new_token."""
    merged, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
            merged.append(new_token)
            i += 2
        else:
            merged.append(tokens[i])
            i += 1
    return merged


def tokenizer_from_dict(state):
    if state["kind"] == "bpe":
        return BPETokenizer(state["merges"])
    return CharTokenizer(state["chars"])


def start_tokens(tokenizer):
    """What generation starts from when there is no prompt: a newline, as a text file would."""
    try:
        return tokenizer.encode("\n")
    except UsageError:  # a character vocabulary without a newline
        return [0]


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
    atomic_write(path, lambda tmp: write_bytes(tmp, payload))


def write_bytes(path, payload):
    with open(path, "wb") as f:
        f.write(payload)


def split_data(data, val_fraction=0.1):
    """First 90% for training, the last 10% for validation (text or tokens)."""
    n_train = int(len(data) * (1 - val_fraction))
    return data[:n_train], data[n_train:]


def tokenize(text, kind="char", vocab_size=1024, cache_dir=None):
    """(tokenizer, train token ids, val token ids) for text split 90/10 by characters.

    The character vocabulary comes from the whole text (65 for Tiny Shakespeare);
    BPE is trained on the training split only. BPE results are cached in cache_dir, keyed by
    the text's hash, so a second run on the same text starts at once.
    """
    train_text, val_text = split_data(text)
    if kind == "char":
        tokenizer = CharTokenizer.from_text(text)
        return tokenizer, tokenizer.encode(train_text), tokenizer.encode(val_text)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    cache_path = os.path.join(cache_dir or ".", f".bpe{vocab_size}-{digest}.cache.pt")
    if os.path.exists(cache_path):
        try:
            cached = torch.load(cache_path, weights_only=True)
            return (tokenizer_from_dict(cached["tokenizer"]), cached["train"].tolist(),
                    cached["val"].tolist())
        except Exception:
            pass  # a damaged cache file: build it again below

    tokenizer = BPETokenizer.train(train_text, vocab_size)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    if tokenizer.decode(train_ids) != train_text or tokenizer.decode(val_ids) != val_text:
        raise UsageError("the BPE tokenizer does not round-trip this text; please report it")
    cached = dict(tokenizer=tokenizer.to_dict(), train=torch.tensor(train_ids),
                  val=torch.tensor(val_ids))
    try:
        atomic_write(cache_path, lambda tmp: torch.save(cached, tmp))
    except OSError:
        pass  # a read-only data folder: it just will not be faster next time
    return tokenizer, train_ids, val_ids


def bits_per_char(mean_loss, n_tokens, n_chars):
    """Turn a mean loss in nats per token into bits per character, comparable across
    tokenizers: total nats = mean_loss * n_tokens; / n_chars; / ln 2 for bits."""
    return mean_loss * n_tokens / n_chars / math.log(2)


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


def use_compile(setting, device, doing):
    """--compile true, false, or auto (on for CUDA only, where its start-up pays for itself),
    and only where torch.compile can work: otherwise a note says why and the code runs eager."""
    if not (setting == "true" or (setting == "auto" and device.startswith("cuda"))):
        return False
    problem = compile_problem(device)
    if problem:
        print(f"Note: {doing} without torch.compile: {problem} (see TROUBLESHOOTING.md)")
        return False
    return True


def compile_problem(device):
    """Why torch.compile cannot work here, or None."""
    if device.startswith("cuda"):
        from torch.utils._triton import has_triton
        if not has_triton():
            return "Triton is not installed or does not support this GPU"
    elif device == "cpu" and not (shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler found"
    elif device == "mps":
        return "this project has not tried it on MPS"
    return None


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
