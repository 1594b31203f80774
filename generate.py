"""Generate text from a trained Mini-GPT checkpoint.

    python generate.py --prompt "ROMEO:" --max_new_tokens 300
    python generate.py --temperature 0 --prompt "To be"      # greedy: always the likeliest char
    python generate.py --num_samples 4                       # four samples in one batched pass
    python generate.py --interactive                         # type prompts, read continuations
    python generate.py --reference                           # the plain code: no speed-ups

main() reads the flags, loads the checkpoint, and prints the text as it is generated, each new
token costing one position thanks to model.py's KV cache (--no_cache: re-run the whole context).
Below it, the steps in the order main() calls them; last, the flags and their checks, which a
first read can skip. speedups.py adds two flags: int8 weights on CPUs (--dtype int8) and, on
CUDA, a compiled one-token step replayed as a CUDA graph (--compile, on by default there).
"""

import startup

startup.load_torch(__name__)  # first: Ctrl-C while it loads exits at once

import math

import torch

from checkpoint import chosen_weights, load_checkpoint
from config import ArgumentParser, check_each
from model import GPTConfig, GPTModel
from speedups import compile_decode, quantize_int8
from tokenizer import start_tokens, tokenizer_from_dict
from utils import UsageError, check_fits_in_memory, output_works, pick_device, pick_dtype, run_main, use_flash


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    flash = use_flash("false" if args.reference else "auto", device)  # as in training
    model, tokenizer, which = load_model(args.checkpoint, device, pick_dtype(args.dtype, device),
                                         flash=flash, weights=args.weights)
    check_samples_fit(model, args.num_samples, device)
    compile_decode(model, device, args.compile)  # --compile auto: on CUDA only
    torch.manual_seed(args.seed)

    if args.interactive:
        return prompt_loop(model, tokenizer, args, device)

    tokenizer.encode(args.prompt)  # fail on unknown characters before printing anything
    print("GENERATING TEXT")
    print("=" * 60)
    print(f"Prompt: {args.prompt}")
    print(f"Max tokens: {args.max_new_tokens}")
    print(f"Temperature: {args.temperature}")
    print(f"Top-k: {args.top_k}" + (" (does not apply: greedy)" if args.temperature == 0 else ""))
    if args.top_p is not None:  # only when asked for
        print(f"Top-p: {args.top_p}")
    print(f"Weights: {args.weights}, {which}")
    print("=" * 60)
    print()
    print_completion(model, tokenizer, args.prompt, args, device)


# ---------------------------------------------------------------------------------------------
# The steps of main(), in the order it calls them

def load_model(path, device, dtype="float32", flash=True, weights="best"):
    """(model in eval mode on device, tokenizer, which weights in words) from a train.py
    checkpoint: by default the weights of its lowest val loss (checkpoint.chosen_weights)."""
    # A dict of tensors and plain values: torch.load(weights_only=True), once checks have
    # refused a missing, foreign or damaged file with one line (checkpoint.py, a later read).
    checkpoint = load_checkpoint(path, device)
    state_dict, which = chosen_weights(checkpoint, weights)
    # flash picks the attention path (SDPA or written out), whatever the model trained with.
    model = GPTModel(GPTConfig(**{**checkpoint["model_args"], "flash": flash}))
    model.load_state_dict(state_dict)  # load_checkpoint made sure that the shapes match
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    return for_sampling(model, device, dtype), tokenizer, which


def for_sampling(model, device, dtype):
    """The model in eval mode on device, its weights in dtype (float32, bfloat16, float16, int8).
    Sampling reads every weight once per token, so 16-bit weights halve the bytes to move and
    8-bit ones (speedups.quantize_int8, CPU only) quarter them."""
    check_int8_on(device, dtype)
    if dtype == "int8":
        return quantize_int8(model).eval()
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def print_completion(model, tokenizer, prompt, args, device):
    prompt_ids = prompt_ids_for(prompt, tokenizer)
    if args.num_samples == 1:
        print(prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, prompt_ids, args, device):
            print(piece, end="", flush=True)
        print()
        return
    for i, sample in enumerate(generate_batch(model, tokenizer, prompt_ids, args, device)):
        print(f"--- sample {i + 1} of {args.num_samples} ---")
        print(prompt + sample)


def prompt_ids_for(prompt, tokenizer):
    return tokenizer.encode(prompt) if prompt else start_tokens(tokenizer)


def stream_text(model, tokenizer, prompt_ids, args, device, chunk=None, generator=None):
    """Yield the generated text piece by piece; the pieces join to the full decoded sample.
    Random draws come from generator (torch.Generator), else from torch's global one. Only the
    tokens not yet shown are decoded each time, so a long sample costs time in proportion to its
    length. On a GPU the new tokens come to the host a few at a time: reading each one as it
    comes would make every step wait for the copy."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    chunk = chunk or (1 if device == "cpu" else 8)  # 8 tokens: milliseconds on a GPU: smooth
    on_device, unshown = [], []
    for token in model.stream(idx, args.max_new_tokens, **sampling_options(args),
                              generator=generator):
        on_device.append(token)
        if len(on_device) < chunk:
            continue
        unshown += torch.cat(on_device).tolist()
        on_device = []
        text = tokenizer.decode(unshown)
        if not text.endswith("\ufffd"):  # BPE: a character cut between tokens; wait for the rest
            yield text
            unshown = []
    if on_device:
        unshown += torch.cat(on_device).tolist()
    yield tokenizer.decode(unshown)


def sampling_options(args):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                use_cache=not args.no_cache)


def generate_batch(model, tokenizer, prompt_ids, args, device):
    """num_samples continuations of the same prompt in one batched pass: a list of strings."""
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    tokens = model.generate(idx, args.max_new_tokens, **sampling_options(args))
    return [tokenizer.decode(row.tolist()) for row in tokens[:, len(prompt_ids):]]


def prompt_loop(model, tokenizer, args, device):
    """--interactive: a completion for each prompt typed, until an empty line or Ctrl-D."""
    print("Type a prompt and press Enter; an empty line or Ctrl-D quits.")
    while True:
        try:
            prompt = input("> ")
        except (EOFError, RuntimeError):  # Ctrl-D, no input left, or stdin closed
            print()  # end the prompt's line, quietly
            return
        except OSError as err:  # stdin opened for writing (EBADF), a hung-up terminal (EIO)
            if not output_works():
                raise  # it was the "> " that could not be written: run_main says so
            raise UsageError(f"cannot read the prompts from stdin ({err.strerror or err}); run "
                             f"--interactive in a terminal, or pipe the prompts in") from None
        if not prompt:
            return
        try:
            print_completion(model, tokenizer, prompt, args, device)
        except UsageError as err:  # e.g. a character the model never saw: ask again
            print(f"error: {err}")


# ---------------------------------------------------------------------------------------------
# The flags and their checks: every mistake refused before any work (a first read can skip)

def parse_args(argv=None):
    parser = ArgumentParser(prog="generate.py", description="Sample text from a checkpoint.")
    parser.add_argument("--prompt", default="", help="starting text (empty: start from a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="higher = more random, lower = more predictable, 0 = greedy")
    parser.add_argument("--top_k", type=int, default=200, help="sample only among the k likeliest")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus: sample among the likeliest tokens covering this probability")
    parser.add_argument("--checkpoint", default="ckpt.pt", help="checkpoint saved by train.py")
    parser.add_argument("--weights", default="best", choices=["best", "last"],
                        help="best: the weights of the run's lowest val loss; last: its last step's")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "int8"],
                        help="number format of the weights while sampling; auto = as in "
                             "training (bfloat16 where the chip has it, else float32); int8 "
                             "(CPU only, speedups.py) is the fastest on CPUs with native bf16")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="torch.compile the one-token decode step (CUDA graphs on GPUs); "
                             "auto = on for CUDA, where it pays back its start-up time")
    parser.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    parser.add_argument("--num_samples", type=int, default=1, help="independent samples, batched")
    parser.add_argument("--no_cache", action="store_true", help="re-run the whole context per token")
    parser.add_argument("--interactive", action="store_true", help="prompt loop in the terminal")
    parser.add_argument("--reference", action="store_true",
                        help="every speed-up off: float32, written-out attention, no compile")
    args = parser.parse_args(argv)
    if args.reference:
        if args.dtype not in ("auto", "float32") or args.compile == "true":
            raise UsageError("--reference runs float32 without compile; drop --dtype/--compile "
                             "or --reference")
        args.dtype, args.compile = "float32", "false"
    if args.interactive and args.prompt:
        raise UsageError("--prompt does not apply to --interactive, which asks for each prompt; "
                         "drop --prompt, or --interactive")
    if args.temperature == 0 and args.top_p is not None:
        raise UsageError("--top_p does not apply to --temperature 0 (greedy: always the likeliest "
                         "token); drop --top_p, or give a temperature above 0")
    if args.compile == "true" and args.no_cache:
        raise UsageError("--compile true compiles the cached one-token step; drop --no_cache or "
                         "--compile true")
    check_args(args)
    return args


def check_args(args):
    """Each flag's range, before anything is loaded: the first problem, as one line naming the
    flag and the value. Below 1e-6, temperature and top-p are greedy in all but name; then
    logits / temperature can overflow, and top-p rounds to 0 in float32, which drops all."""
    check_each(args, ("temperature",), lambda v: v == 0 or 1e-6 <= v < math.inf,
               "0 (greedy) or a finite number >= 1e-6")
    check_each(args, ("top_k",), lambda v: v >= 1, "at least 1")
    # (A NaN fails every comparison, so it is refused too.)
    check_each(args, ("top_p",), lambda v: v is None or 1e-6 <= v <= 1, "from 1e-6 to 1")
    check_each(args, ("max_new_tokens",), lambda v: v >= 0, ">= 0")
    check_each(args, ("num_samples",), lambda v: v >= 1, "at least 1")
    check_each(args, ("seed",), lambda v: 0 <= v < 2**63, "from 0 to 2**63 - 1")
    if not args.checkpoint.strip():
        raise UsageError("--checkpoint must not be empty; pass the file train.py saved")


def check_int8_on(device, dtype):
    """int8 weights (speedups.quantize_int8) exist on the CPU only: bench.py asks too."""
    if dtype == "int8" and device != "cpu":
        raise UsageError(f"--dtype int8 runs on the CPU only; use --device cpu, or --dtype "
                         f"bfloat16 on {device}")


def check_samples_fit(model, num_samples, device):
    """Each sample needs a KV cache (2 x n_layer x block_size x n_embd numbers) and logits for
    its prompt's positions, 4 bytes each: refuse, before sampling, what cannot fit."""
    config = model.config  # the model's shape (a GPTConfig)
    per_sample = 4 * config.block_size * (2 * config.n_layer * config.n_embd + config.vocab_size)
    check_fits_in_memory(num_samples * per_sample, device, f"--num_samples {num_samples}",
                         "ask for fewer samples")


if __name__ == "__main__":
    run_main(main)
