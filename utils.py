"""The pieces train.py and generate.py share: tokenizer, data, checkpoints, devices.

Every mistake a user can make (a missing file, a bad flag, a prompt the model cannot read)
raises UsageError; the scripts print its message as one line and exit with code 2.
"""

import collections
import contextlib
import glob
import math
import os
import re
import shutil
import signal
import stat
import sys
import warnings

import torch

try:
    import fcntl  # file locks; POSIX only
except ImportError:  # Windows: runs are not locked
    fcntl = None

from model import GPTConfig, GPTModel


class UsageError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def run_main(main):
    """Run a script's main(): a UsageError becomes one line on stderr and exit code 2, and
    Ctrl-C (one that main does not handle itself) exits with 130, without a traceback. SIGTERM
    (what `timeout` or a cluster's scheduler sends before a kill) is taken as a Ctrl-C: files
    half written are cleaned up on the way out. Under torchrun only rank 0 prints the error."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the scripts quiet it while importing
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if hasattr(sys.stdout, "reconfigure"):
        # A path or prompt that is not valid UTF-8 (a terminal's lone byte arrives as a lone
        # surrogate, "\udcff") prints escaped instead of ending the run.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        main()
    except UsageError as err:
        if os.environ.get("RANK", "0") == "0":  # every rank meets the same error: say it once
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python generate.py | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        sys.exit(0)
    finally:
        release_locks()


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
            check_decodable("".join(unknown))
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
        check_decodable(text)
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


def check_decodable(text):
    """Refuse lone surrogates: how Python passes on the bytes of an argument that the terminal's
    locale could not decode (U+DC80 to U+DCFF). They are not characters at all."""
    undecodable = re.search("[\ud800-\udfff]", text)
    if undecodable:
        raise UsageError(f"the text has a character that is not valid Unicode "
                         f"({undecodable[0]!r}): bytes the terminal's locale could not decode; "
                         f"use a UTF-8 locale (e.g. LANG=C.UTF-8) or remove them")


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


def regular_file_problem(path):
    """Why path is not a plain file that can be read, in words, or None: it does not exist, is
    a dangling or looping symlink, a folder, or a FIFO, device or socket (opening a FIFO would
    wait for a writer for ever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a symlink to nothing" if os.path.islink(path) else "does not exist"
    except OSError as err:  # a symlink loop, a name too long, ...
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "is a FIFO or a socket, not a regular file"
    if not stat.S_ISREG(mode):
        return "is a device, not a regular file"
    return None


def bits_per_char(mean_loss, n_tokens, n_chars):
    """Turn a mean loss in nats per token into bits per character, comparable across
    tokenizers: total nats = mean_loss * n_tokens; / n_chars; / ln 2 for bits."""
    return mean_loss * n_tokens / n_chars / math.log(2)


# ---------------------------------------------------------------------------------------------
# Checkpoints: only tensors and plain Python values, so loading can never run code

def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash leaves the old file or the new one.
    The temporary file is this process's own (its id in the name): two runs never share one."""
    tmp_path = tmp_path_for(path)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            with contextlib.suppress(OSError):
                os.remove(tmp_path)


def tmp_path_for(path):
    return f"{path}.{os.getpid()}.tmp"


def remove_leftover_tmp(path):
    """Delete the temporary files of path that killed processes left behind (path.PID.tmp).
    Call it only while holding path's lock: no other process can be writing one then."""
    for leftover in glob.glob(f"{glob.escape(path)}.*.tmp"):
        if re.fullmatch(r"\d+", leftover[len(path) + 1:-4]):
            with contextlib.suppress(OSError):
                os.remove(leftover)


HELD_LOCKS = {}  # path -> its lock file, held until the script's main() ends (run_main)


def hold_lock(path):
    """Lock path for this process until main() ends: None, or where another process holds it,
    what that process wrote in the file (its id), for the message."""
    path = os.path.abspath(path)
    if path not in HELD_LOCKS:
        lock = take_lock(path, wait=False)
        if isinstance(lock, str):
            return lock
        HELD_LOCKS[path] = lock
    return None


def release_locks():
    while HELD_LOCKS:
        release_lock(*HELD_LOCKS.popitem())


def take_lock(path, wait):
    """The open lock file at path, locked; or, where another process holds it and wait is
    False, what that process wrote in it. The lock is the operating system's (flock): it goes
    with the process however it ends, so a crashed run leaves no stale lock, only a file that
    the next run takes over. Without fcntl (Windows) nothing is locked: None."""
    if fcntl is None:
        return None
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break  # else the holder deleted the file while we waited: take the new one
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()}")
    f.flush()
    return f


def release_lock(path, f):
    if f is not None:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:  # still ours, not a file
                os.remove(path)  # put there since; while locked: a waiting run sees it gone
        f.close()


def check_outputs_spare_inputs(outputs, inputs, fix):
    """Prove, before any work, that no file a run writes is, or lies inside, one it reads.
    outputs and inputs: {path: what it is, in words}. Paths are compared as the files they
    lead to, through symlinks and hard links."""
    for output, output_name in outputs.items():
        for source, source_name in inputs.items():
            inside = os.path.isdir(source) and os.path.realpath(output).startswith(
                os.path.join(os.path.realpath(source), ""))
            if inside or same_file(output, source):
                raise UsageError(f"{output_name} {output} would "
                                 f"{'write inside' if inside else 'overwrite'} {source_name} "
                                 f"{source}, which this run reads; {fix}")


def same_file(a, b):
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)  # both exist
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(path, flag, example_name):
    """Prove, before any work, that a file can be saved at path (named by flag in the errors):
    it is not a folder, its folder exists (created here if need be), and a file can be written
    there: the very path.PID.tmp that atomic_write writes first. Saving can then fail only for
    lack of space."""
    if not path.strip():
        raise UsageError(f"{flag} must not be empty")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; name a file in it, e.g. "
                         f"{flag} {os.path.join(path, example_name)}")
    probe = tmp_path_for(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        # makedirs says "File exists" or "Not a directory" when part of the path is a file.
        reason = "part of the path is a file, not a folder" if isinstance(
            err, (FileExistsError, NotADirectoryError)) else err.strerror or err
        raise UsageError(f"cannot save {flag} {path} ({reason}); pick a path in a folder you "
                         f"can write to") from None


def write_failure(err):
    """Why writing a file failed, in words: an OSError's reason, or torch.save's, which reports
    a full disk as a RuntimeError ("unexpected pos ...")."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return "the disk is full or the file could not be written"


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path, device="cpu"):
    """The checkpoint at path, its contents checked (checkpoint_problem) before anything is
    built from them."""
    if os.path.isdir(path):
        raise UsageError(f"--checkpoint {path} is a folder; pass the checkpoint file in it")
    problem = regular_file_problem(path)
    if problem == "does not exist":
        raise UsageError(f"checkpoint not found: {path}; train one with `python train.py` "
                         f"or pass --checkpoint PATH")
    if problem:
        raise UsageError(f"--checkpoint {path} {problem}; pass the checkpoint file train.py "
                         f"saved")
    try:
        with warnings.catch_warnings():  # a file that is not a checkpoint: our line says so
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(unreadable_checkpoint(path, err)) from None
    if not isinstance(checkpoint, dict) or not {"model", "model_args", "tokenizer"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a Mini-GPT checkpoint (no model, model_args or "
                         f"tokenizer); pass one saved by train.py")
    problem = checkpoint_problem(checkpoint) or best_problem(checkpoint)
    if problem:
        raise UsageError(f"{path} is a damaged checkpoint: {problem}; retrain, or pass another "
                         f"--checkpoint")
    model_args, weights = checkpoint["model_args"], checkpoint["model"]
    # The causal masks are not stored: they are built from block_size, so check their size.
    masks = model_args["n_layer"] * model_args["block_size"] ** 2
    check_fits_in_memory(4 * (sum(w.numel() for w in weights.values()) + masks), device,
                         f"the model in {path}", "sample on a machine with more memory")
    return checkpoint


def chosen_weights(checkpoint, which="best"):
    """(weights, what they are in words) of a loaded checkpoint. "last": the weights of the last
    step, which --resume goes on from. "best": those of the evaluation with the lowest val loss,
    which train.py keeps beside the last ones (as best_model) once a later step is worse; a
    checkpoint whose last step is its best, or one written before this was kept, has only one
    set. The words read as the eval lines print it: "val loss 1.4811 at step 1500"."""
    best = checkpoint.get("best", {})
    if which == "best" and "best_model" in checkpoint:
        return checkpoint["best_model"], f"val loss {best['val_loss']:.4f} at step {best['step']}"
    step, val_loss = checkpoint.get("step"), checkpoint.get("val_loss")
    if type(step) is not int or not isinstance(val_loss, float):  # hand-made: no figures in it
        return checkpoint["model"], "the only weights in it"
    return checkpoint["model"], f"val loss {val_loss:.4f} at step {step}"


def best_problem(checkpoint):
    """What is wrong with the best evaluation's record and weights, or None."""
    best = checkpoint.get("best", {})
    if not (isinstance(best, dict) and type(best.get("step", 0)) is int
            and isinstance(best.get("val_loss", 0.0), float)):
        return "its best evaluation is not a step and a val loss"
    if "best_model" in checkpoint:
        if not {"step", "val_loss"} <= best.keys():
            return "it has best weights but no step or val loss for them"
        return weights_problem(checkpoint["best_model"], checkpoint["model_args"])
    return None


def unreadable_checkpoint(path, err):
    """Why torch.load (weights only) refused path, in words: only a file that asks for Python
    objects by name (pickle's "globals") needs pickle, which could run code."""
    if "Unsupported global" in str(err):
        return (f"{path} needs pickle to load, which can run code; refusing. Use a checkpoint "
                f"saved by this project's train.py")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    except OSError as os_error:  # permission denied, an I/O error, ...
        return f"cannot read {path} ({os_error.strerror or os_error}); pass a readable file"
    if is_zip:
        return (f"{path} is a damaged checkpoint (cut short or corrupted); retrain, or copy it "
                f"again")
    return (f"{path} is not a Mini-GPT checkpoint (not a file that torch.save wrote); pass one "
            f"saved by train.py")


MODEL_SHAPE = ("vocab_size", "n_embd", "n_layer", "n_head", "block_size")  # whole numbers >= 1


def checkpoint_problem(checkpoint):
    """What is wrong with a checkpoint's model_args, weights and tokenizer, or None. The
    weights' shapes are compared with those the model_args imply before any model is built, so
    a damaged file can neither crash generation halfway nor make it allocate absurd memory."""
    model_args = checkpoint["model_args"]
    return (model_args_problem(model_args) or weights_problem(checkpoint["model"], model_args)
            or tokenizer_problem(checkpoint["tokenizer"], model_args["vocab_size"]))


def model_args_problem(model_args):
    if not isinstance(model_args, dict):
        return "model_args is not a dictionary"
    unknown = model_args.keys() - {*MODEL_SHAPE, "dropout", "flash"}
    if unknown:
        return f"model_args has unknown entries {sorted(map(str, unknown))}"
    for name in MODEL_SHAPE:
        value = model_args.get(name)
        if type(value) is not int or value < 1:  # type(): True is an int to isinstance
            return f"model_args {name} is {value!r:.40}, not a whole number >= 1"
    if model_args["n_embd"] % model_args["n_head"]:
        return "model_args n_embd is not divisible by n_head"
    dropout = model_args.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        return f"model_args dropout is {dropout!r:.40}, not a number in [0, 1)"
    if type(model_args.get("flash", False)) is not bool:
        return "model_args flash is not true or false"
    return None


def weights_problem(weights, model_args):
    if not (isinstance(weights, dict) and all(isinstance(name, str) and torch.is_tensor(w)
                                              for name, w in weights.items())):
        return "its weights are not a dictionary of tensors"
    # Build the model on the "meta" device, which records shapes and allocates nothing; first
    # make sure the sizes match the tensors stored, or a huge number would take forever.
    layers = {name.split(".")[1] for name in weights if name.startswith("blocks.")}
    if layers != {str(i) for i in range(len(layers))} or len(layers) != model_args["n_layer"]:
        return f"model_args n_layer is {model_args['n_layer']}, the weights hold {len(layers)} blocks"
    n_embd = model_args["n_embd"]
    for name, rows in (("tok_emb.weight", "vocab_size"), ("pos_emb.weight", "block_size")):
        shape = (model_args[rows], n_embd)
        if name not in weights or weights[name].shape != shape:
            found = tuple(weights[name].shape) if name in weights else "missing"
            return f"weight {name} is {found}, the model_args say {shape}"
    with torch.device("meta"):
        expected = GPTModel(GPTConfig(**{k: model_args[k] for k in MODEL_SHAPE})).state_dict()
    if weights.keys() != expected.keys():
        odd = sorted(weights.keys() ^ expected.keys())
        return f"the weights do not match the model_args ({', '.join(odd[:3])} ...)"
    for name, weight in weights.items():
        if weight.shape != expected[name].shape:
            return (f"weight {name} is {tuple(weight.shape)}, the model_args say "
                    f"{tuple(expected[name].shape)}")
        if not weight.is_floating_point():
            return f"weight {name} holds {weight.dtype}, not floating-point numbers"
        if not torch.isfinite(weight).all():
            return f"weight {name} holds NaN or infinite values"
    return None


def tokenizer_problem(state, vocab_size):
    """Plain data that tokenizer_from_dict can rebuild, with as many tokens as the model has
    (vocab_size; None: any number)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char":
        chars = state.get("chars")
        if not isinstance(chars, str) or len(set(chars)) != len(chars):
            return "its character tokenizer is not a string of distinct characters"
        n_tokens = len(chars)
    elif kind == "bpe":
        merges = state.get("merges")
        # Each merge joins two tokens that exist before it: the 256 bytes and earlier merges.
        if not isinstance(merges, list) or not all(
                isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(type(token) is int and 0 <= token < 256 + i for token in pair)
                for i, pair in enumerate(merges)):
            return "its BPE merges are not pairs of earlier token ids"
        n_tokens = 256 + len(merges)
    else:
        return "its tokenizer is neither char nor bpe"
    if vocab_size is not None and n_tokens != vocab_size:
        return f"its tokenizer has {n_tokens} tokens, the model {vocab_size}"
    return None


# ---------------------------------------------------------------------------------------------
# Devices and precision

DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def pick_device(name="auto"):
    if not DEVICE_NAME.fullmatch(name):
        raise UsageError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA GPU is available; "
                         f"use --device cpu (or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {name} asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but MPS is not available; use --device cpu")
    return name


def device_memory(device):
    """Bytes of memory on device: the GPU's, else the machine's RAM; None where unknown."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def check_fits_in_memory(n_bytes, device, what, fix):
    """Refuse, before allocating anything, work that cannot fit in the device's memory (a huge
    flag would otherwise end in an allocator's traceback, or in the machine swapping)."""
    available = device_memory(device)
    if available is not None and n_bytes > available:
        raise UsageError(f"{what} needs at least {gibibytes(n_bytes)} of memory, more than the "
                         f"{gibibytes(available)} on {device}; {fix}")


def gibibytes(n_bytes):
    n_gib = min(n_bytes, 10**300) / 2**30  # a float, even for an absurd number of bytes
    return f"{n_gib:,.1f} GiB" if n_gib < 1e6 else f"{n_gib:.1e} GiB"


# Apple GPUs (MPS: --device auto picks it on a Mac). What they get, from PyTorch's documented
# MPS support; none of it has been run on a Mac by this project yet (README, "Apple GPUs"):
# - float32 (MPS_DTYPE). MPS has bfloat16 from macOS 14 only, and not every Apple GPU computes
#   in it natively; float16 would need loss scaling. --dtype bfloat16 is accepted from macOS
#   14 (mps_has_bf16), as is --optimizer muon, whose iteration runs in bfloat16.
# - no torch.compile: its MPS backend is a prototype (compile_problem).
# - fused AdamW: PyTorch has an MPS kernel for it (train.make_optimizer, as everywhere).
# - SDPA attention: PyTorch has an MPS kernel for it (train.use_flash, as on CUDA GPUs).
# - its random state is saved for exact resume (train.rng_state); torchrun is refused (gloo,
#   its only backend there, moves CPU and CUDA tensors only: train.start_distributed).
MPS_DTYPE = "float32"


def mps_has_bf16():
    """bfloat16 on an Apple GPU: macOS 14 and newer."""
    return torch.backends.mps.is_macos_or_newer(14, 0)


def pick_dtype(name, device):
    """'auto' -> bfloat16 on GPUs that support it, float16 on older GPUs, bfloat16 on CPUs
    with native bf16 instructions, float32 on Apple GPUs and other CPUs (docs/results.md has
    the measured speed-ups)."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if gpu_has_native_bf16(device) else "float16"
    if device == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return MPS_DTYPE if device == "mps" else "float32"


def gpu_has_native_bf16(device):
    """bf16 in hardware: compute capability 8.0 and newer (A100, RTX 30xx, H100), AMD GPUs.
    Asked without emulation: plain is_bf16_supported() says yes on a T4 or V100 too, which
    have no bf16 tensor cores (only float16 ones), so that bf16 would run slowly there."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older PyTorch, without that argument
        return torch.cuda.get_device_capability(device) >= (8, 0)


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
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:  # e.g. a P100 (6.0) or a GTX 10xx (6.1)
            return (f"this GPU (compute capability {major}.{minor}) is older than Triton, "
                    f"torch.compile's GPU compiler, supports (7.0 and newer)")
        from torch.utils._triton import has_triton
        if not has_triton():
            return "Triton is not installed or does not support this GPU"
    elif device == "cpu" and not (shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler found"
    elif device == "mps":
        return "its Apple GPU (MPS) backend is a prototype, not tried by this project"
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
