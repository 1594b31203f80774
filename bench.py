"""Benchmarks of the default model (10,788,929 parameters) on this machine.

    python bench.py train --device cpu        # train.py's defaults vs train.py --reference
    python bench.py generate --device cpu     # KV cache vs re-running the whole context

Each variant runs in a fresh process, so the peak memory printed is its own. The token ids are
random: what the text says does not change how long the arithmetic takes.
"""

import multiprocessing
import os
import resource
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# Ctrl-C while torch loads (seconds): exit at once with 130, no traceback. os._exit, as nothing
# is open yet, and an exception could be swallowed by a library's bare `except:` mid-import.
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

import torch
from tqdm import tqdm

import train
from config import ArgumentParser, parse_config
from generate import for_sampling, pick_sampling_dtype
from model import GPTModel
from speedups import compile_decode
from utils import UsageError, get_batch, pick_device, run_main

VOCAB_SIZE = 65  # Tiny Shakespeare's


def train_speed(device, fast, steps, warmup_steps, batch_size):
    """(tokens/s, peak MiB) of training steps, built exactly as train.py builds them: fast =
    its defaults (bf16/fp16 autocast, SDPA attention on GPUs, torch.compile on CUDA, fused
    AdamW, and on CPUs the cheaper dropout and freed memory kept for reuse); else --reference
    (float32, the written-out attention, eager, plain AdamW, nn.Dropout, glibc's malloc)."""
    flags = ["--device", device, "--batch_size", str(batch_size)]
    config, _ = parse_config(flags if fast else flags + ["--reference"])
    run = train.set_up(config)
    model = train.build_model(VOCAB_SIZE, config, run)
    optimizer = train.make_optimizer(model, config)
    train_model = train.wrap_for_training(model, config, run)
    scaler = torch.amp.GradScaler(run.device_type, enabled=(run.dtype == "float16"))
    data = torch.randint(VOCAB_SIZE, (1_000_000,), device=run.device)

    def step():
        batch = get_batch(data, config.batch_size, config.block_size)
        train.train_step(train_model, optimizer, scaler, [batch], config, run)

    for _ in range(warmup_steps):  # first steps pay for compilation and memory allocation
        step()
    synchronize(device)
    start = time.time()
    for _ in tqdm(range(steps), desc=f"train ({'fast' if fast else 'reference'}, {run.dtype})",
                  file=sys.stdout):
        step()
    synchronize(device)
    return steps * config.batch_size * config.block_size / (time.time() - start), peak_mib(device)


def generate_speed(device, use_cache, n_tokens, dtype, compile_setting):
    """(tokens/s, peak MiB) of generating n_tokens, batch 1, from a one-character prompt; the
    cached run compiles its decode step as generate.py does (--compile)."""
    dtype = pick_sampling_dtype(dtype, device)
    model = for_sampling(GPTModel(VOCAB_SIZE), device, dtype)
    if use_cache:
        compile_decode(model, device, compile_setting)
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    model.generate(prompt, 10, use_cache=use_cache)  # warm-up (and compilation)
    synchronize(device)
    start = time.time()
    stream = model.stream(prompt, n_tokens, use_cache=use_cache)
    for _ in tqdm(stream, total=n_tokens, file=sys.stdout,
                  desc=f"generate ({'cache' if use_cache else 'no cache'}, {dtype})"):
        pass
    synchronize(device)
    return n_tokens / (time.time() - start), peak_mib(device)


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mib(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def in_fresh_process(function, *args):
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(function, *args).result()


def main(argv=None):
    parser = ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["train", "generate"])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps (default: 20 on a GPU, 3 on a CPU)")
    parser.add_argument("--batch_size", type=int, default=64, help="training batch size")
    parser.add_argument("--tokens", type=int, default=1000, help="tokens to generate")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "int8"],
                        help="generate: the weights' number format, as generate.py's --dtype")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="generate: as generate.py's --compile (auto = on for CUDA)")
    args = parser.parse_args(argv)
    for name in ("steps", "tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    device = pick_device(args.device)
    if args.what == "train":  # the default model at --batch_size: refused here if it cannot fit
        config, _ = parse_config(["--device", device, "--batch_size", str(args.batch_size)])
        train.check_model_fits(config, train.Run(device, "float32"))
    elif args.dtype == "int8" and device != "cpu":
        raise UsageError(f"--dtype int8 runs on the CPU only; use --device cpu, or --dtype "
                         f"bfloat16 on {device}")
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.startswith("cuda") else ""))

    if args.what == "train":
        on_gpu = device.startswith("cuda")
        steps = args.steps or (20 if on_gpu else 3)
        warmup = 10 if on_gpu else 2
        fast = in_fresh_process(train_speed, device, True, steps, warmup, args.batch_size)
        reference = in_fresh_process(train_speed, device, False, steps, warmup, args.batch_size)
        print_table([("fast", *fast), ("reference", *reference)])
        print(f"train: fast {fast[0]:,.0f} tok/s, reference {reference[0]:,.0f} tok/s, "
              f"speedup {fast[0] / reference[0]:.2f}x")
    else:
        cache = in_fresh_process(generate_speed, device, True, args.tokens, args.dtype,
                                 args.compile)
        no_cache = in_fresh_process(generate_speed, device, False, args.tokens, args.dtype,
                                    args.compile)
        print_table([("cache", *cache), ("no-cache", *no_cache)])
        print(f"generate: cache {cache[0]:,.0f} tok/s, no-cache {no_cache[0]:,.0f} tok/s, "
              f"speedup {cache[0] / no_cache[0]:.2f}x")


def print_table(rows):
    print(f"{'variant':<10} {'tok/s':>10} {'peak MiB':>10}")
    for name, tokens_per_sec, mib in rows:
        print(f"{name:<10} {tokens_per_sec:>10,.0f} {mib:>10,.0f}")


if __name__ == "__main__":
    run_main(main)
