"""Checkpoints, and writing files so that nothing a user owns is lost.

A checkpoint holds only tensors and plain Python values, so torch.load(weights_only=True) reads
it and loading can never run code; its contents are checked before anything is built from them.
Every file is written whole or not at all (atomic_write), and before any work a run proves that
its outputs can be written and overwrite none of its inputs.
"""

import contextlib
import errno
import json
import math
import os
import warnings

import torch

from config import Config, check_config
from model import GPTConfig, GPTModel
from utils import UsageError, check_fits_in_memory, check_regular_file, regular_file_problem, tmp_path_for

# ---------------------------------------------------------------------------------------------
# Files written whole, outputs that spare the inputs

def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a crash leaves the old file or the new one.
    The temporary file is this process's own (its id in the name): two runs never share one."""
    tmp_path = tmp_path_for(path)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(OSError):  # gone already once renamed
            os.remove(tmp_path)


def check_outputs_spare_inputs(outputs, inputs, fix):
    """Prove, before any work, that no file a run writes ({path: what it is, in words}) is, or
    lies inside, one it reads, compared as files (through symlinks and hard links)."""
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


NAME_MAX = 255  # bytes in a file name: the limit of ext4, XFS, Btrfs, APFS and NTFS
TMP_SUFFIX = ".1234567.tmp"  # the longest that atomic_write adds (process ids: 7 digits at most)


def check_output_path(path, flag, example_name, beside=()):
    """Prove, before any work, that a file can be saved at path: not a folder nor a read-only
    file, in a folder (made here if need be) where atomic_write's own path.PID.tmp can be
    written, with a name short enough for that and for the files named after it (beside: their
    paths, path and a suffix). Saving can then fail only for lack of space."""
    if not path.strip():
        raise UsageError(f"{flag} must not be empty")
    if os.path.isdir(path) or not os.path.basename(path):  # "runs/" names a folder too
        raise UsageError(f"{flag} {path} {'is' if os.path.isdir(path) else 'names'} a folder; "
                         f"name a file in it, e.g. {flag} {os.path.join(path, example_name)}")
    suffix = max([path, *beside], key=len)[len(path):]
    name = os.path.basename(path)
    if (over := bytes_over_name_max(name + suffix)) > 0:
        raise UsageError(f"{flag} {path} is too long a name: the run also writes it with "
                         f"{suffix}.PID.tmp added, and a file name may have {NAME_MAX} bytes; "
                         f"pick a name of at most {len(os.fsencode(name)) - over} bytes")
    check_writable(path, f"{flag} {path}", f"pick another {flag}")
    try:
        make_folders(os.path.dirname(path))
        open(tmp_path_for(path), "wb").close()
        os.remove(tmp_path_for(path))
    except OSError as err:
        raise UsageError(f"cannot save {flag} {path} ({err.strerror or err}); pick a path in a "
                         f"folder you can write to") from None


def bytes_over_name_max(name):
    """How many bytes the file name, written first with atomic_write's .PID.tmp added, has over
    NAME_MAX: 0 or less if it fits."""
    return len(os.fsencode(name + TMP_SUFFIX)) - NAME_MAX


def make_folders(folder):
    """os.makedirs(folder, exist_ok=True), one folder at a time from the first that exists
    (makedirs calls itself once per missing folder, so a deep enough path hit Python's recursion
    limit), and with a reason a user can act on where makedirs gives "File exists": a file or a
    dead link on the path."""
    missing = []
    while folder and not os.path.isdir(folder):  # "" is the current folder
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except (FileExistsError, NotADirectoryError):
            if not os.path.isdir(folder):  # not just made by another process
                raise OSError(errno.EEXIST, not_a_folder(folder)) from None


def not_a_folder(folder):
    """What is wrong with a folder that cannot be made: part of its path is a file, or a
    symlink to nothing or a loop (the first that exists, going up)."""
    while folder and not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if os.path.islink(folder) and not os.path.exists(folder):
        dead = regular_file_problem(folder) == "is a symlink to nothing"
        return f"{folder} is a symlink {'to nothing' if dead else 'loop'}"
    return "part of the path is a file, not a folder"


def check_writable(path, named, fix):
    """Refuse a file at path that a rename cannot replace: read-only (chmod a-w, chattr +i), or
    append-only (chattr +a), which os.access calls writable but which refuses to be opened for
    anything but appending (opened for writing here, nothing written: it stays as it was)."""
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{named} is read-only; make it writable, or {fix}")
    if os.path.isfile(path):
        try:
            os.close(os.open(path, os.O_WRONLY))
        except PermissionError:
            raise UsageError(f"{named} is append-only, so it cannot be replaced; clear that flag "
                             f"(chattr -a {path}), or {fix}") from None


def check_replaceable(path, flag, writer, is_ours, fix=None):
    """Refuse, before any work, to replace what lies at path unless writer wrote it (is_ours(path)
    says): a file named by mistake, or a FIFO or device, which the rename would put a file over.
    flag: the flag that named path; fix: what to do instead (default: pick another flag)."""
    problem = regular_file_problem(path)
    if problem == "does not exist" or not problem and is_ours(path):
        return
    problem = problem or f"is a file that {writer} did not write"
    away = "" if "device" in problem else ", or move that file away"  # never /dev/null
    raise UsageError(f"{flag} {path} {problem}; {fix or f'pick another {flag}'}{away}")


def png_tagged(path, tag):
    """Whether the PNG at path carries tag, the {"Software": ...} its writer saved it with
    (savefig's metadata): how a later run knows the picture is its own to replace."""
    with contextlib.suppress(OSError), open(path, "rb") as f:  # text chunks precede the pixels
        return b"Software\x00" + tag["Software"].encode() in f.read(4096)
    return False


def parse_json(text):
    """The value that JSON text (str or bytes) holds, or None for text that is not JSON:
    damaged, not UTF-8, or nested deeper than Python's parser goes (a RecursionError)."""
    with contextlib.suppress(ValueError, RecursionError):
        return json.loads(text)
    return None


def is_checkpoint(path):
    """Whether train.py wrote the file at path: it has the keys load_checkpoint asks for (not
    nanoGPT's ckpt.pt, which has model_args too, but no tokenizer). A damaged one is train.py's
    too: a fresh run may replace it."""
    with contextlib.suppress(Exception):  # not a file torch.save wrote
        return has_our_keys(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return False


def write_failure(err):
    """Why writing failed, in words."""
    err = file_error(err)
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return "the disk is full or the file could not be written"


def out_of_room(err):
    """Whether writing failed for want of room (a full disk, a quota, a file size limit), which
    freeing space mends, rather than for want of permission (a read-only file or folder)."""
    err = file_error(err)
    return not isinstance(err, OSError) or err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def file_error(err):
    """The OSError behind err: torch.save reports a failed write to a Python file (a full disk,
    a file size limit) as a RuntimeError, raised while that OSError was being handled."""
    wrapped = not isinstance(err, OSError) and isinstance(err.__context__, OSError)
    return err.__context__ if wrapped else err


# ---------------------------------------------------------------------------------------------
# Checkpoints: saved, loaded, and checked before anything is built from them

def save_checkpoint(checkpoint, path):
    # Through a Python file, not torch.save(checkpoint, path): torch would open the path itself
    # and report any failure (a read-only folder too) as a RuntimeError with no errno.
    def save(tmp_path):
        with open(tmp_path, "wb") as f:
            torch.save(checkpoint, f)
    atomic_write(path, save)


def load_checkpoint(path, device="cpu", flag="--checkpoint"):
    """The checkpoint at path, checked; flag: the one that named it (--resume, --compare)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; pass the checkpoint file in it")
    check_regular_file(path, flag, "pass the checkpoint file train.py saved",
                       f"checkpoint not found: {path}; train one with `python train.py` or pass "
                       f"{flag} PATH")
    try:
        with warnings.catch_warnings():  # a file that is not a checkpoint: our line says so
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise UsageError(unreadable_checkpoint(path, err)) from None
    if not has_our_keys(checkpoint):
        raise UsageError(f"{path} is not a Mini-GPT checkpoint (no model, model_args or "
                         f"tokenizer); pass one saved by train.py")
    if problem := checkpoint_problem(checkpoint):
        raise UsageError(f"{path} is a damaged checkpoint: {problem}; retrain, or pass another "
                         f"{flag}")
    model_args, weights = checkpoint["model_args"], checkpoint["model"]
    # The causal masks are not stored: they are built from block_size, so check their size.
    masks = model_args["n_layer"] * model_args["block_size"] ** 2
    check_fits_in_memory(4 * (sum(w.numel() for w in weights.values()) + masks), device,
                         f"the model in {path}", "sample on a machine with more memory")
    return checkpoint


def has_our_keys(checkpoint):
    return isinstance(checkpoint, dict) and {"model", "model_args", "tokenizer"} <= checkpoint.keys()


def chosen_weights(checkpoint, which="best"):
    """(weights, what they are in words, as the eval lines print it: "val loss 1.4811 at step
    1500"). "last": the last step's, which --resume goes on from. "best": the lowest val loss's,
    which train.py keeps beside them (best_model) once a later step is worse."""
    if which == "best" and "best_model" in checkpoint:
        best = checkpoint["best"]  # load_checkpoint made sure it comes with the best weights
        return checkpoint["best_model"], f"val loss {best['val_loss']:.4f} at step {best['step']}"
    step, val_loss = checkpoint.get("step"), checkpoint.get("val_loss")
    if not is_step(step) or not isinstance(val_loss, float):  # hand-made: no figures in it
        return checkpoint["model"], "the only weights in it"
    return checkpoint["model"], f"val loss {val_loss:.4f} at step {step}"


def is_step(step):
    return type(step) is int and step >= 0  # type(): True is an int to isinstance


def unreadable_checkpoint(path, err):
    """Why torch.load (weights only) refused path: only a file that asks for Python objects by
    name (pickle's "globals") needs pickle, which could run code."""
    if "Unsupported global" in str(err):
        return (f"{path} needs pickle to load, which can run code; refusing. Use a checkpoint "
                f"saved by this project's train.py")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    except OSError as os_error:  # permission denied, an I/O error, ...
        return f"cannot read {path} ({os_error.strerror or os_error}); pass a readable file"
    if is_zip:
        return f"{path} is a damaged checkpoint (cut short or corrupted); retrain, or copy it again"
    return (f"{path} is not a Mini-GPT checkpoint (not a file that torch.save wrote); pass one "
            f"saved by train.py")


MODEL_SHAPE = ("vocab_size", "n_embd", "n_layer", "n_head", "block_size")  # whole numbers >= 1


def checkpoint_problem(checkpoint):
    """What is wrong with a checkpoint's model_args, weights, tokenizer and best weights, or
    None. The weights' shapes are compared with those the model_args imply before any model is
    built, so a damaged file can neither crash generation halfway nor allocate absurd memory."""
    model_args, best = checkpoint["model_args"], checkpoint.get("best")
    problem = (odd_tensor_problem(checkpoint) or model_args_problem(model_args)
               or weights_problem(checkpoint["model"], model_args)
               or tokenizer_problem(checkpoint["tokenizer"], model_args["vocab_size"]))
    if problem:
        return problem
    if "best" in checkpoint and not (
            isinstance(best, dict) and is_step(best.get("step"))
            and isinstance(best.get("val_loss"), float) and math.isfinite(best["val_loss"])):
        return "its best evaluation is not a step and a val loss"
    step = checkpoint.get("step")  # not a step >= 0: no figures (chosen_weights, resume say so)
    if is_step(step) and "best" in checkpoint and best["step"] > step:
        return f"its best evaluation, at step {best['step']}, comes after its last, step {step}"
    if isinstance(checkpoint.get("config"), dict) and (problem := flags_problem(checkpoint)):
        return problem
    if "best_model" in checkpoint:
        return (weights_problem(checkpoint["best_model"], model_args) if "best" in checkpoint
                else "it has best weights but no step or val loss for them")
    return None


def flags_problem(checkpoint):
    """What --resume would quote back from the flags saved in checkpoint ("pass --optimizer
    muon") that train.py does not take, by train.py's own checks, or None. (A flag saved as
    None is unknown, as if not saved.)"""
    quoted = {name: checkpoint["config"][name] for name in ("optimizer", "vocab_size",
                                                            "bpe_sample_chars")
              if checkpoint["config"].get(name) is not None}
    try:
        check_config(Config(**quoted))
    except UsageError as err:
        return f"the flags saved in it are not train.py's ({err})"
    return None


def odd_tensor_problem(checkpoint):
    """Name the first tensor anywhere in checkpoint that is not a plain array of real numbers
    (sparse, quantized, complex, "meta": no data, or float8_e4m3fn and other formats without a
    torch.isfinite), or None: torch.load takes them all, but the checks below and the kernels
    expect plain ones (a sparse weight crashes torch.isfinite).
    A stack, not recursion, and each object once: a file may put a list inside itself."""
    stack, seen = [("", checkpoint)], set()
    while stack:
        name, value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if torch.is_tensor(value) and (value.layout != torch.strided or value.is_quantized
                                       or value.is_complex() or value.is_meta):
            return f"{name.strip()} is not a plain tensor of real numbers (it is sparse, " \
                   f"quantized, complex or has no data)"
        if torch.is_tensor(value) and not nan_checkable(value):
            return f"{name.strip()} holds {str(value.dtype)[6:]}, numbers torch cannot check " \
                   f"for NaN"
        if isinstance(value, (dict, list, tuple)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [(f"{name} {str(key):.40}", item) for key, item in items]
    return None


def nan_checkable(tensor):
    """Whether torch.isfinite takes tensor's number format: not most float8 ones (e4m3fn)."""
    try:
        torch.isfinite(tensor.new_empty(0))  # no data needed: the format alone decides
    except (NotImplementedError, RuntimeError):
        return False
    return True


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
    n_blocks = len({name.split(".")[1] for name in weights if name.startswith("blocks.")})
    if n_blocks != model_args["n_layer"]:
        return f"model_args n_layer is {model_args['n_layer']}, the weights hold {n_blocks} blocks"
    for name, rows in (("tok_emb.weight", "vocab_size"), ("pos_emb.weight", "block_size")):
        shape = (model_args[rows], model_args["n_embd"])
        found = tuple(weights[name].shape) if name in weights else "missing"
        if found != shape:
            return f"weight {name} is {found}, the model_args say {shape}"
    with torch.device("meta"):
        expected = GPTModel(GPTConfig(**model_args)).state_dict()
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


# What each optimizer keeps for a parameter once it has stepped: AdamW its step count and two
# running moments, Muon (speedups.py) its momentum; all but "step" have the parameter's shape.
OPTIMIZER_STATE = {"AdamW": {"step", "exp_avg", "exp_avg_sq"}, "Muon": {"momentum_buffer"}}


def optimizer_problem(saved, optimizer):
    """What is wrong with saved, the state_dict() of an optimizer like this run's (AdamW, or
    speedups.MuonAdamW's {"adamw": ..., "muon": ...}), or None. Asked before load_state_dict,
    which trusts what it is given: a moment of the wrong shape crashes fused AdamW's kernel."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return torch_optimizer_problem(saved, optimizer)
    parts = {"adamw": optimizer.adamw, "muon": optimizer.muon}  # speedups.MuonAdamW
    if not isinstance(saved, dict) or saved.keys() != parts.keys():
        return "it is not Muon's and AdamW's state"
    return next(filter(None, (torch_optimizer_problem(saved[name], part)
                              for name, part in parts.items())), None)


def torch_optimizer_problem(saved, optimizer):
    live = optimizer.state_dict()  # its parameters numbered 0, 1, ..., as a saved state has them
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = OPTIMIZER_STATE[type(optimizer).__name__]
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)
            and len(saved["param_groups"]) == len(live["param_groups"])):
        return f"it is not the state of {type(optimizer).__name__} for this model"
    for group, live_group in zip(saved["param_groups"], live["param_groups"]):
        # (Only the parameters: runs.resume keeps this run's settings, lr, betas and so on.)
        ids = group.get("params") if isinstance(group, dict) else None
        if not (type(ids) is list and all(type(i) is int for i in ids)
                and ids == live_group["params"]):
            return "its parameter groups are not this model's"
    for i, state in saved["state"].items():
        if type(i) is not int or not 0 <= i < len(params):
            return f"it holds state for a parameter #{str(i):.20} the model does not have"
        if not isinstance(state, dict) or state and state.keys() != kept:
            return f"parameter #{i}'s state is not {sorted(kept)}"
        for name, value in state.items():
            shape = () if name == "step" else params[i].shape
            at_least_0 = name in ("step", "exp_avg_sq")  # a count; a mean of squares (sqrt'ed)
            if not (torch.is_tensor(value) and value.shape == shape and value.is_floating_point()
                    and torch.isfinite(value).all() and not (at_least_0 and (value < 0).any())):
                return (f"parameter #{i}'s {name} is not {tuple(shape)} finite numbers"
                        + (" >= 0" if at_least_0 else ""))
    return None


def tokenizer_problem(state, vocab_size):
    """Plain data tokenizer_from_dict can rebuild, of vocab_size tokens (None: any number)."""
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
