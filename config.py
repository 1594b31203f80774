"""Every hyperparameter in one place, with its default and why. Each field of Config is a flag of
train.py, `--name value` or `--name=value` (`--help` lists them). A preset is a named set of
overrides applied first: `--preset cpu --max_iters 500` is "the CPU recipe, but 500 steps"."""

import argparse
import inspect
import math
import re
from dataclasses import dataclass, fields

from utils import DEVICE_NAME, UsageError, one_line


@dataclass
class Config:
    # data and files
    data: str = "data/input.txt"       # UTF-8 text file or folder of .txt files (Tiny Shakespeare: fetched)
    checkpoint: str = "ckpt.pt"        # where the model is saved (atomically, at each eval and at the end)
    tokenizer: str = "char"            # char (one token per character) or bpe (byte-level BPE)
    vocab_size: int = 1024             # BPE only: tokens in the vocabulary, at least 256
    bpe_sample_chars: int = 10_000_000  # BPE: merges learned on at most this many chars (0 = all)
    # model (the default model: 10,788,929 parameters with Tiny Shakespeare's 65 characters)
    n_embd: int = 384                  # width of the residual stream
    n_layer: int = 6                   # number of Transformer blocks
    n_head: int = 6                    # attention heads per block; must divide n_embd
    block_size: int = 256              # context length in tokens
    dropout: float = 0.2               # dropout probability while training (0 = off)
    flash: str = "auto"                # attention via SDPA (true) or written out (false); auto: SDPA on GPUs
    # optimisation
    batch_size: int = 64               # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches summed into one optimizer step
    optimizer: str = "adamw"           # adamw or muon (Muon: blocks' matrices; AdamW: the rest)
    learning_rate: float = 1e-3        # peak learning rate, reached after warmup
    muon_lr: float = 0.05              # --optimizer muon: Muon's peak learning rate, same schedule
    min_lr: float = 1e-4               # the cosine schedule decays to this
    warmup_iters: int = 100            # linear warmup up to learning_rate over this many steps
    lr_decay_iters: int = 0            # cosine decay length; 0 = max_iters
    weight_decay: float = 0.1          # AdamW decay, on weight matrices only
    beta1: float = 0.9                 # AdamW first-moment decay
    beta2: float = 0.99                # AdamW second-moment decay (0.99: small batches are noisy)
    grad_clip: float = 1.0             # clip the gradient norm to this; 0 = off
    max_iters: int = 5000              # optimizer steps
    # evaluation and output
    eval_interval: int = 500           # evaluate (and save) every this many steps
    eval_iters: int = 20               # batches for the train-loss estimate
    eval_tokens: int = 0               # exact val loss up to this many tokens, else a subset; 0: 112k chars
    log_interval: int = 10             # steps between progress-bar updates and metrics lines
    sample_tokens: int = 500           # tokens (characters) sampled at the end of training (0 = none)
    eval_sample_tokens: int = 0        # tokens sampled at each evaluation (0 = none)
    # system
    device: str = "auto"               # auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu
    dtype: str = "auto"                # auto, float32, bfloat16 or float16 (autocast; see README)
    compile: str = "auto"              # torch.compile: auto (on for CUDA), true or false
    seed: int = 1337                   # seeds batches, dropout and the init
    # runs
    reference: bool = False            # every speed-up off: float32, written-out attention, AdamW, ...
    resume: str = ""                   # --resume: go on from --checkpoint; --resume PATH: from PATH
    wandb: bool = False                # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "mini-gpt"    # the W&B project to log to


# What --reference sets: the code on the page, with none of speedups.py (train.py also skips
# its CPU dropout, malloc setting and fused AdamW). Slower; for reading and stepping through.
REFERENCE = dict(dtype="float32", flash="false", compile="false", optimizer="adamw")

# The CPU recipe (docs/results.md has the runs): on a 2-core laptop CPU, fewer, wider layers, a
# short context and a high learning rate learn the most per second (block 32 beat block 64 at
# the same tokens per step), and Muon needs fewer than half of AdamW's steps. Each CPU preset
# evaluates only at the start and the end: evaluating is not free.
CPU_RECIPE = dict(n_embd=192, n_layer=3, n_head=6, block_size=32, dropout=0.0, batch_size=64,
                  optimizer="muon", learning_rate=4e-3, muon_lr=0.05, sample_tokens=300)

PRESETS = {
    # About 30 s, then 2 minutes (docs/results.md compares them with nanoGPT's CPU recipe).
    "cpu": dict(CPU_RECIPE, warmup_iters=25, max_iters=200, eval_interval=200),
    "cpu-2min": dict(CPU_RECIPE, warmup_iters=40, max_iters=900, eval_interval=900),
    # About 10 minutes: one more layer and twice the context (block 64, batch 32: the same
    # tokens per step), which pays once the run is long enough to use them.
    "cpu-10min": dict(CPU_RECIPE, n_layer=4, block_size=64, batch_size=32, warmup_iters=100,
                      max_iters=3400, eval_interval=3400),
    # nanoGPT's README recipe for a CPU (its config/train_shakespeare_char.py and CPU flags), run
    # by this code: `python bench.py curve` compares the recipes above with it at equal time.
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                        dropout=0.0, learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100,
                        max_iters=2000, lr_decay_iters=2000, eval_interval=250, eval_iters=20,
                        compile="false"),
    # For one modern GPU: the default model aimed at the least time to val loss 1.47 (a higher
    # learning rate, less dropout, fewer steps; no torch.compile, whose start-up of tens of
    # seconds is about all so short a run could save). Not yet tuned on a GPU: on an H200 it
    # overfits just short of 1.47 (docs/gpu.md has the run, FUTURE_WORK.md).
    "fast": dict(learning_rate=2e-3, min_lr=2e-4, warmup_iters=200, max_iters=2500,
                 eval_interval=250, dropout=0.1, compile="false"),
}


def parse_config(argv=None):
    """Build a Config from defaults, then --preset, then the other flags given."""
    parser = ArgumentParser(prog="train.py", description="Train Mini-GPT.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named set of overrides")
    comments = field_comments()
    for field in fields(Config):
        # A bare `--wandb` means `--wandb true`; a bare `--resume` goes on from --checkpoint.
        const = True if field.type is bool else "true" if field.name == "resume" else None
        # default=SUPPRESS: a flag not given stays absent, so a preset is not undone.
        parser.add_argument(f"--{field.name}", nargs=None if const is None else "?", const=const,
                            type=parse_bool if field.type is bool else field.type,
                            default=argparse.SUPPRESS, metavar=field.name.upper(),
                            help=f"{comments[field.name]} (default: {field.default!r})")
    given = vars(parser.parse_args(argv))
    if "resume" in given and not given["resume"].strip():  # `--resume=`: a path left out?
        raise UsageError("--resume was given an empty path; pass --resume alone to go on from "
                         "--checkpoint, or --resume PATH")
    preset = given.pop("preset", None)
    overrides = {**PRESETS.get(preset, {}), **given}
    if overrides.get("reference"):
        clashing = [f"--{k} {given[k]}" for k, v in REFERENCE.items() if given.get(k, v) != v]
        if clashing:
            plain = ", ".join(f"--{k} {v}" for k, v in REFERENCE.items())
            raise UsageError(f"--reference runs the plain code ({plain}); drop "
                             f"{' and '.join(clashing)}, or --reference")
        overrides.update(REFERENCE)
    config = Config(**overrides)
    check_config(config)
    return config, preset


TYPE_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def check_config(config):
    """Every field's type and range, and the relations between fields, checked before any
    work starts: a bad value is one line naming the flag, the value and what is accepted.
    The checks run in this order, so with several bad flags the first named is the one here."""
    for field in fields(Config):
        value = getattr(config, field.name)
        accepted = (int, float) if field.type is float else field.type
        if not isinstance(value, accepted) or (field.type is not bool and isinstance(value, bool)):
            raise UsageError(f"--{field.name} must be {TYPE_NAMES[field.type]}, got {value!r}")
        if field.type is float and not math.isfinite(value):
            raise UsageError(f"--{field.name} must be a finite number, got {value}")
    for name in ("data", "checkpoint", "wandb_project"):
        if not getattr(config, name).strip():
            raise UsageError(f"--{name} must not be empty")
    check_each(config, ("n_embd", "n_layer", "n_head", "block_size", "batch_size", "max_iters",
                        "eval_interval", "eval_iters", "gradient_accumulation_steps",
                        "log_interval"), lambda v: v >= 1, "at least 1")
    if config.n_embd % config.n_head != 0:
        # The largest divisor of n_embd up to n_head (looking no further than a million down).
        divisor = next(d for d in range(min(config.n_head, config.n_embd, 10**6), 0, -1)
                       if config.n_embd % d == 0)
        raise UsageError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}); "
                         f"pick e.g. --n_head {divisor}")
    check_each(config, ("warmup_iters", "lr_decay_iters", "sample_tokens", "eval_sample_tokens"),
               lambda v: v >= 0, "0 or more")
    check_each(config, ("dropout",), lambda v: 0 <= v < 1, "in [0, 1)")
    check_each(config, ("learning_rate", "muon_lr"), lambda v: v > 0, "above 0")
    check_each(config, ("min_lr",), lambda v: 0 <= v <= config.learning_rate,
               f"from 0 to --learning_rate ({config.learning_rate})")
    check_each(config, ("weight_decay", "grad_clip"), lambda v: v >= 0, "0 or more (0 = off)")
    rates = ["learning_rate"] + (["muon_lr"] if config.optimizer == "muon" else [])
    for name in rates:  # each step multiplies every decayed weight by 1 - lr * weight_decay
        if config.weight_decay * getattr(config, name) >= 1:
            raise UsageError(f"--weight_decay times --{name} must be below 1 (each step shrinks "
                             f"the weights by that fraction), got {config.weight_decay} x "
                             f"{getattr(config, name)}")
    # AdamW's moving averages: 1 would never forget.
    check_each(config, ("beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)")
    # torch takes 64 bits; each DDP rank adds its rank to the seed (runs.set_up).
    check_each(config, ("seed",), lambda v: 0 <= v < 2**63, "from 0 to 2**63 - 1")
    check_each(config, ("dtype",), lambda v: v in ("auto", "float32", "bfloat16", "float16"),
               "auto, float32, bfloat16 or float16")
    check_each(config, ("tokenizer",), lambda v: v in ("char", "bpe"), "char or bpe")
    # BPE training stops by itself when nothing is left to merge, long before any size the
    # flag can ask for; past 2**63 - 1 the count of merges to try no longer fits in a C integer.
    if config.vocab_size < 256 or config.tokenizer == "bpe" and config.vocab_size >= 2**63:
        raise UsageError(f"--vocab_size (for --tokenizer bpe) must be at least 256, the byte "
                         f"tokens, and at most 2**63 - 1, got {config.vocab_size}")
    if config.eval_tokens != 0 and config.eval_tokens <= config.block_size:
        raise UsageError(f"--eval_tokens must be 0 (auto) or more than block_size "
                         f"({config.block_size}): the val subset is blocks of block_size + 1 "
                         f"tokens; got {config.eval_tokens}")
    check_each(config, ("bpe_sample_chars",), lambda v: v >= 0, "0 (the whole train split) or more")
    check_each(config, ("optimizer",), lambda v: v in ("adamw", "muon"), "adamw or muon")
    check_each(config, ("compile", "flash"), lambda v: v in ("auto", "true", "false"),
               "auto, true or false")
    check_each(config, ("device",), DEVICE_NAME.fullmatch, "auto, cuda, cuda:N, mps or cpu")
    if re.search(r"[/\\#?%:]", config.wandb_project) or len(config.wandb_project) > 128:
        raise UsageError(f"--wandb_project must be at most 128 characters, none of / \\ # ? % :, "
                         f"got {config.wandb_project!r}")


def check_each(config, names, passes, accepted):
    """Refuse the first of these fields whose value fails passes(value), saying what is accepted."""
    for name in names:
        if not passes(getattr(config, name)):
            raise UsageError(f"--{name} must be {accepted}, got {getattr(config, name)!r}")


def field_comments():
    """The comment after each field of Config above, so that --help says what the field means."""
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?# (.*)$", inspect.getsource(Config), re.M))


def parse_bool(text):
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr and exit code 2, without the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")
