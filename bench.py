"""Benchmarks of the default model (10,788,929 parameters) on this machine.

    python bench.py train --device cpu        # train.py's defaults vs train.py --reference
    python bench.py generate --device cpu     # KV cache vs re-running the whole context
    python bench.py explore --device cpu      # explore.py --serve: a keystroke, a paste
    python bench.py report --device cuda      # every figure of the GPU table (docs/gpu.md)
    python bench.py report --device cpu --quick   # the same rows, tiny, in under a minute
    python bench.py prepare --size_mb 1024    # preparing a 1 GiB text (dataset.py), then
                                              # a second run's start on it; --tokenizer bpe

Each variant runs in a fresh process, so the peak memory printed is its own. The token ids are
random: what the text says does not change how long the arithmetic takes. `prepare` writes its
generated text (and the prepared token file) to a temporary folder and deletes it afterwards.
"""

import startup

startup.exit_at_once_on_ctrl_c(__name__)  # while torch loads: before any other import

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from tqdm import tqdm

import dataset
import runs
import train
from checkpoint import atomic_write, check_output_path, check_outputs_spare_inputs
from config import PRESETS, ArgumentParser, parse_config
from generate import for_sampling, stream_text
from model import GPTConfig, GPTModel
from speedups import compile_decode
from tokenizer import CharTokenizer
from utils import UsageError, compile_problem, pick_device, pick_dtype, run_main, use_flash

VOCAB_SIZE = 65  # Tiny Shakespeare's


def train_speed(device, fast, steps, warmup_steps, batch_size):
    """(tokens/s, peak MiB) of training steps, built exactly as train.py builds them: fast =
    its defaults (bf16/fp16 autocast, SDPA attention on GPUs, torch.compile on CUDA, fused
    AdamW, and on CPUs the cheaper dropout and freed memory kept for reuse); else --reference
    (float32, the written-out attention, eager, plain AdamW, nn.Dropout, glibc's malloc)."""
    flags = ["--device", device, "--batch_size", str(batch_size)]
    measured = measure_training(flags if fast else flags + ["--reference"], steps, warmup_steps,
                                "fast" if fast else "reference")
    return measured["tokens_per_sec"], measured["peak_mib"]


def measure_training(flags, steps, warmup_steps, label):
    """Time training steps of the model that train.py builds from these flags: a dict of
    tokens_per_sec, peak_mib, mfu (None where the GPU's peak is unknown), dtype, compiled."""
    config, _ = parse_config(flags)
    run = runs.set_up(config)
    model = train.build_model(VOCAB_SIZE, config, run)
    optimizer = train.make_optimizer(model, config)
    train_model = train.wrap_for_training(model, config, run)
    scaler = train.make_scaler(run)

    def step():
        windows = torch.randint(VOCAB_SIZE, (config.batch_size, config.block_size + 1),
                                device=run.device)  # random tokens: only the speed counts here
        batch = windows[:, :-1], windows[:, 1:]
        train.train_step(train_model, optimizer, scaler, [batch], config, run)

    # The first steps pay for compilation (up to a minute) and memory allocation.
    for _ in tqdm(range(warmup_steps), desc=f"warm-up ({label})", file=sys.stdout):
        step()
    synchronize(run.device)
    start = time.time()
    for _ in tqdm(range(steps), desc=f"train ({label}, {run.dtype})", file=sys.stdout):
        step()
    synchronize(run.device)
    tokens_per_sec = steps * config.batch_size * config.block_size / (time.time() - start)
    mfu = runs.model_flops_utilization(model, config, run, tokens_per_sec)
    return dict(tokens_per_sec=tokens_per_sec, peak_mib=peak_mib(run.device), mfu=mfu,
                dtype=run.dtype, compiled=train_model is not model)


def generate_speed(device, use_cache, n_tokens, dtype, compile_setting, model_args=None):
    """(tokens/s, peak MiB) of generating n_tokens, batch 1, from a one-character prompt; the
    cached run compiles its decode step as generate.py does (--compile). model_args: another
    shape than the default model's."""
    dtype = pick_dtype(dtype, device)
    config = GPTConfig(VOCAB_SIZE, **{"flash": use_flash("auto", device), **(model_args or {})})
    model = for_sampling(GPTModel(config), device, dtype)  # the attention generate.py runs
    if use_cache:
        compile_decode(model, device, compile_setting)
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    # Warm-up: compilation, and every path the timed tokens take (with the cache: a window slide).
    model.generate(prompt, model.block_size + 10 if use_cache else 10, use_cache=use_cache)
    synchronize(device)
    # What a user runs: generate.py's streaming loop, which also brings the tokens to the host
    # and decodes them (into a string here; a terminal's printing is not timed).
    tokenizer = CharTokenizer([chr(ord("!") + i) for i in range(VOCAB_SIZE)])
    options = argparse.Namespace(max_new_tokens=n_tokens, temperature=1.0, top_k=None,
                                 top_p=None, no_cache=not use_cache)
    start = time.time()
    text = ""
    with tqdm(total=n_tokens, file=sys.stdout,
              desc=f"generate ({'cache' if use_cache else 'no cache'}, {dtype})") as progress:
        for piece in stream_text(model, tokenizer, [0], options, device):
            text += piece
            progress.update(len(piece))  # one character per token
    synchronize(device)
    return n_tokens / (time.time() - start), peak_mib(device)


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mib(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def in_fresh_process(function, *args):
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(function, *args).result()


def main(argv=None):
    parser = ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["train", "generate", "report", "curve", "prepare",
                                              "explore"])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps (default: 20 on a GPU, 3 on a CPU); explore: "
                             "rounds (default: 20)")
    parser.add_argument("--batch_size", type=int, default=64, help="training batch size")
    parser.add_argument("--tokens", type=int, default=1000, help="tokens to generate")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "int8"],
                        help="generate: the weights' number format, as generate.py's --dtype")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="generate: as generate.py's --compile (auto = on for CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="report: every row on a tiny model (under a minute on a CPU)")
    parser.add_argument("--json", default="bench_report.json",
                        help="report: where to write the table as JSON")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="curve: the train.py recipe to follow")
    parser.add_argument("--seconds", type=int, default=120,
                        help="curve: the wall-time budget of each run")
    parser.add_argument("--points", type=int, default=6,
                        help="curve: about how many evaluations each run makes")
    add_prepare_flags(parser)
    args = parser.parse_args(argv)
    for name in ("steps", "tokens", "seconds", "points", "size_mb"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.what == "prepare":  # the same checks as train.py's for these flags
        if args.data is not None and not args.data.strip():
            raise UsageError("--data must not be empty; leave it out to generate a text")
        prepare_flags = ["--tokenizer", args.tokenizer, "--vocab_size", str(args.vocab_size)]
        if args.bpe_sample_chars is not None:
            prepare_flags += ["--bpe_sample_chars", str(args.bpe_sample_chars)]
        parse_config(prepare_flags)
    device = pick_device(args.device)
    if args.what == "prepare":
        return prepare_benchmark(args, device)
    if args.what == "train":  # the default model at --batch_size: refused here if it cannot fit
        config, _ = parse_config(["--device", device, "--batch_size", str(args.batch_size)])
        runs.check_model_fits(config, runs.Run(device, "float32"))
    elif args.what == "report":  # minutes of work: prove first that the JSON can be saved
        check_report_path(args.json)
    elif args.dtype == "int8" and device != "cpu":
        raise UsageError(f"--dtype int8 runs on the CPU only; use --device cpu, or --dtype "
                         f"bfloat16 on {device}")
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                 if device.startswith("cuda") else ""))
    if args.what == "report":
        return report(device, args.quick, args.json, 50 if args.quick else args.tokens)
    if args.what == "curve":
        return curve(args.preset, args.seconds, args.points, device)
    if args.what == "explore":
        return explore_speed(device, args.steps or 20)

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


# ---------------------------------------------------------------------------------------------
# python bench.py explore: the live page's server time for a keystroke and for a paste

def explore_speed(device, repeats):
    """Median server time (the model's work and the JSON answer) of the live page with the
    default model: one character typed at the end of a 255-character prompt (only the new
    position runs, through the KV cache), and a whole 256-character prompt pasted at once."""
    import explore_server
    from checkpoint import save_checkpoint
    from tokenizer import CharTokenizer
    tokenizer = CharTokenizer([chr(c) for c in range(32, 32 + VOCAB_SIZE - 1)] + ["\n"])
    model_args = dict(vocab_size=VOCAB_SIZE, n_embd=384, n_layer=6, n_head=6, block_size=256,
                      dropout=0.2)
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "default.pt")
        save_checkpoint(dict(model=GPTModel(GPTConfig(**model_args)).state_dict(), model_args=model_args,
                             tokenizer=tokenizer.to_dict()), path)
        explorer = explore_server.load_explorer(path, device)
    print(f"the default model ({explorer.model.num_params():,} parameters), "
          f"{torch.get_num_threads()} threads")
    timings = {"keystroke (255 -> 256 characters)": [], "paste (256 characters)": []}
    for _ in tqdm(range(repeats), desc="explore", unit="round"):
        ids = torch.randint(VOCAB_SIZE, (256,), generator=generator).tolist()
        prompt = tokenizer.decode(ids)
        before = explore_server.look(explorer, prompt[:255], [])["ids"]
        for name, known in zip(timings, (before, [])):
            start = time.perf_counter()
            json.dumps(explore_server.look(explorer, prompt, known))
            timings[name].append(time.perf_counter() - start)
    for name, seconds in timings.items():
        print(f"{name}: median {1000 * sorted(seconds)[len(seconds) // 2]:.0f} ms of server "
              f"time over {repeats} rounds")


# ---------------------------------------------------------------------------------------------
# python bench.py prepare: a big text prepared into a token file, then a second run's start

def add_prepare_flags(parser):
    parser.add_argument("--size_mb", type=int, default=100,
                        help="prepare: MiB of text to generate (1024 = 1 GiB)")
    parser.add_argument("--text", default="synthetic", choices=["synthetic", "shakespeare"],
                        help="prepare: Zipf-distributed made-up words (many distinct words, as "
                             "a real corpus has), or Tiny Shakespeare repeated")
    parser.add_argument("--data", help="prepare: this text file or folder instead (its token "
                        "file is kept beside it, as train.py would)")
    parser.add_argument("--tokenizer", default="char", choices=["char", "bpe"])
    parser.add_argument("--vocab_size", type=int, default=4096, help="prepare: BPE vocabulary")
    parser.add_argument("--bpe_sample_chars", type=int, default=None,
                        help="prepare: as train.py's (default: config.py's)")


def prepare_benchmark(args, device):
    """Prepare a text in a fresh process (time, peak memory), then, as a second run would,
    start training on it in another: time from launch to the first step, memory while training,
    the cost of an evaluation."""
    folder = None if args.data else tempfile.mkdtemp(prefix="mini-gpt-bench-")
    try:
        data = args.data or write_bench_text(folder, args.text, args.size_mb)
        flags = ["--data", data, "--tokenizer", args.tokenizer, "--vocab_size",
                 str(args.vocab_size), "--device", device, "--preset", "cpu"]
        if args.bpe_sample_chars is not None:
            flags += ["--bpe_sample_chars", str(args.bpe_sample_chars)]
        size_mib = sum(os.path.getsize(p) for p in dataset.find_sources(data)) / 2**20
        print(f"text: {data} ({size_mib:,.0f} MiB); machine: {os.cpu_count()} cores, load "
              f"average {os.getloadavg()[0]:.1f} before")
        seconds, mib, workers_mib, meta = in_fresh_process(timed_prepare, flags)
        workers = f" (workers: at most {workers_mib:,.0f} MiB each)" if workers_mib else ""
        print(f"prepare: {seconds:.1f} s ({size_mib / seconds:.1f} MiB/s), CPU time "
              f"{meta['cpu_seconds']:.0f} s in all processes; peak RSS {mib:,.0f} MiB{workers}; "
              f"{meta['n_train'] + meta['n_val']:,} tokens ({args.tokenizer}, "
              f"{meta['tokenizer_vocab']:,} in the vocabulary, {meta['dtype']})")
        result = in_fresh_process(second_run, flags, args.steps or 3, time.time())
        print(f"second run: corpus mapped {result['load']:.2f} s after launch, first training "
              f"step done at {result['first_step']:.1f} s (the step-0 evaluation left out)")
        print(f"training: peak RSS {result['mib']:,.0f} MiB after {result['steps']} steps and "
              f"one evaluation; the evaluation took {result['eval']:.1f} s (val loss "
              f"{result['note']})")
    finally:
        if folder:
            shutil.rmtree(folder)


def write_bench_text(folder, kind, size_mb):
    """A generated text of about size_mb MiB in folder; returns its path."""
    path = os.path.join(folder, f"{kind}-{size_mb}mb.txt")
    size = size_mb * 2**20
    blocks = shakespeare_blocks() if kind == "shakespeare" else synthetic_blocks()
    with open(path, "wb") as f, tqdm(total=size, desc=f"writing {kind} text", unit="B",
                                     unit_scale=True, file=sys.stdout) as bar:
        while f.tell() < size:
            text = next(blocks)[:size - f.tell()]  # whole characters: valid UTF-8
            f.write(text.encode("utf-8"))
            bar.update(len(text))
    return path


def shakespeare_blocks():
    with open(dataset.find_sources(dataset.DEFAULT_DATA)[0], encoding="utf-8") as f:
        text = f.read()
    while True:
        yield text


def synthetic_blocks(n_words=1_000_000, seed=0):
    """Text in blocks of about 6 MB, the same every time: words drawn by Zipf's law from a
    million made-up words (a few with accents or Chinese characters), with commas, full stops
    and a new line every ten words or so. Unlike Tiny Shakespeare repeated, the distinct words
    keep coming, as in a real corpus, which is what BPE's caches and vocabularies feel."""
    import numpy as np
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    frequency = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4,
                          2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    lengths = 1 + rng.poisson(4.0, n_words)
    spelled = rng.choice(letters, size=lengths.sum(), p=frequency / frequency.sum())
    words = np.array(["".join(w) for w in np.split(spelled, np.cumsum(lengths)[:-1])],
                     dtype=object)
    words[7::50] += "é"
    words[11::400] = "中文" + words[11::400]
    separators = np.array([" ", ", ", ". ", "\n"], dtype=object)
    while True:
        ranks = (rng.zipf(1.1, 1_000_000) - 1) % n_words
        kinds = rng.choice(4, size=len(ranks), p=[0.82, 0.06, 0.04, 0.08])
        yield "".join(words[ranks] + separators[kinds])


def timed_prepare(flags):
    """(seconds, peak MiB of this process, of its largest worker, metadata) of preparing the
    text that flags name, as train.py's first run does."""
    config, _ = parse_config(flags)
    sources = dataset.find_sources(config.data)
    settings = dataset.corpus_settings(config)
    stem = dataset.prepared_stem(config.data, settings)
    for path in (f"{stem}.tokens", f"{stem}.tokens.json"):  # measure a first run
        if os.path.exists(path):
            os.remove(path)
    start = time.time()
    meta = dataset.prepare(sources, settings, stem)
    seconds = time.time() - start
    meta["tokenizer_vocab"] = dataset.tokenizer_from_dict(meta["tokenizer"]).vocab_size
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    meta["cpu_seconds"] = sum(r.ru_utime + r.ru_stime for r in (
        resource.getrusage(resource.RUSAGE_SELF), children))  # on a busy machine: > wall / cores
    return seconds, peak_mib("cpu"), children.ru_maxrss / 2**10, meta


def second_run(flags, steps, launched):
    """As train.py on an already prepared text: seconds from launch (`launched`, taken before
    this process started) to the corpus being mapped and to the first training step done, peak
    MiB after `steps` more steps and one evaluation, and that evaluation's seconds."""
    config, _ = parse_config(flags)
    run = runs.set_up(config)
    corpus, val_data = train.load_tokens(config, run)
    loaded = time.time() - launched
    model = train.build_model(corpus.tokenizer.vocab_size, config, run)
    optimizer = train.make_optimizer(model, config)
    scaler = torch.amp.GradScaler(run.device_type, enabled=(run.dtype == "float16"))

    def step():
        batch = dataset.get_batch(corpus, config.batch_size, config.block_size, run.device)
        train.train_step(model, optimizer, scaler, [batch], config, run)

    step()
    synchronize(run.device)
    first_step = time.time() - launched
    for _ in range(steps):
        step()
    start = time.time()
    train.evaluate(model, corpus, val_data, config, run)
    synchronize(run.device)
    return dict(load=loaded, first_step=first_step, steps=steps + 1, mib=peak_mib("cpu"),
                eval=time.time() - start, note=val_data.note)


def print_table(rows):
    print(f"{'variant':<10} {'tok/s':>10} {'peak MiB':>10}")
    for name, tokens_per_sec, mib in rows:
        print(f"{name:<10} {tokens_per_sec:>10,.0f} {mib:>10,.0f}")


# ---------------------------------------------------------------------------------------------
# python bench.py report: every figure of the GPU table (docs/gpu.md) in one run, minutes
# on an H100. --quick runs each row on a tiny model, so that a test can run the whole command.

ROOT = os.path.dirname(os.path.abspath(__file__))
TARGET_VAL_LOSS = 1.47  # about nanoGPT's best val loss on Tiny Shakespeare, characters
TARGET_TIME_LIMIT = 240  # seconds to wait for --preset fast to get there
# --quick: a tiny model on the first 30,000 characters that gets below QUICK_TARGET in ~10 steps.
QUICK_MODEL = dict(n_embd=64, n_layer=2, n_head=4, block_size=32)
QUICK_FLAGS = [f"--{name}={value}" for name, value in QUICK_MODEL.items()] + [
    "--batch_size=32", "--dropout=0", "--learning_rate=1e-2", "--warmup_iters=5"]
QUICK_TARGET = 3.2
EVAL_LINE = re.compile(r"Step (\d+): .*val loss ([\d.naif]+)\b.*\(([\d.]+)s\)")


def report(device, quick, json_path, n_tokens):
    """Run every row, print them as a Markdown table, and write the same as JSON. Each speed
    row runs in a fresh process, so that its peak memory is its own."""
    announce(1, "time from launch to the target val loss")
    rows = [time_to_target_row(device, quick)]
    for part, compile_setting in enumerate(("false", "true"), start=2):
        announce(part, f"training speed, compile {compile_setting}"
                       + (" (compiling takes up to a minute)" if compile_setting == "true" else ""))
        rows.append(in_fresh_process(training_row, device, compile_setting, quick))
    generation = ((True, "true"), (True, "false"), (False, "false"))
    for part, (use_cache, compile_setting) in enumerate(generation, start=4):
        announce(part, f"generation speed, {'KV cache' if use_cache else 'no cache'}, "
                       f"compile {compile_setting}"
                       + (" (compiling takes up to a minute)" if compile_setting == "true" else ""))
        rows.append(in_fresh_process(generation_row, device, use_cache, compile_setting, quick,
                                     n_tokens))
    result = dict(environment=environment(device), quick=quick, rows=rows)
    print("\n" + markdown_report(result))
    replacing = os.path.exists(json_path)
    atomic_write(json_path, lambda tmp: write_json(tmp, result))
    print(f"\nWrote {json_path}" + (" (replacing the report that was there)" if replacing else ""))


def check_report_path(path):
    """--json can be written, is not the text the report trains on, and holds no file but an
    earlier report (which it replaces)."""
    check_outputs_spare_inputs({path: "--json"}, {dataset.DEFAULT_DATA: "the --data file"},
                               "pick another --json")
    check_output_path(path, "--json", "bench_report.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and {"environment", "rows"} <= earlier.keys()):
            raise UsageError(f"--json {path} is a file that bench.py did not write; pick "
                             f"another --json, or move that file away")


def announce(part, what):
    print(f"\n[{part}/6] {what}", flush=True)


def time_to_target_row(device, quick):
    """Launch train.py (--preset fast; --quick: the tiny model) and read its eval lines until
    one reaches the target val loss, or the time limit; the time is the one train.py prints:
    seconds since it started, imports included."""
    target = QUICK_TARGET if quick else TARGET_VAL_LOSS
    with tempfile.TemporaryDirectory() as folder:  # the checkpoint and its logs go here
        flags = ["--device", device, "--checkpoint", os.path.join(folder, "ckpt.pt"),
                 "--sample_tokens", "0"]
        if quick:
            data = os.path.join(folder, "start.txt")
            with open(data, "w", encoding="utf-8") as out, \
                    open(dataset.find_sources(dataset.DEFAULT_DATA)[0], encoding="utf-8") as f:
                out.write(f.read(30_000))
            flags += ["--data", data, *QUICK_FLAGS, "--max_iters", "60", "--eval_interval", "5",
                      "--eval_iters", "2", "--compile", "false"]
            max_iters = 60
        else:
            flags += ["--preset", "fast"]
            max_iters = PRESETS["fast"]["max_iters"]
        reached, best, exit_code, tail = watch_training(flags, target, max_iters)
    name = f"time to val <= {target}" + (" (tiny model)" if quick else " (--preset fast)")
    row = dict(measurement=name, value=reached and reached[0], unit="s",
               details="seconds since train.py started, imports included")
    if reached:
        elapsed, step, val_loss = reached
        row.update(step=step, val_loss=val_loss, result=f"{elapsed:.1f} s (step {step}, "
                                                         f"val {val_loss:.4f})")
    elif exit_code:
        row.update(result=f"train.py failed (exit {exit_code}): {tail}")
    else:
        row.update(result="not reached" + (f" (best val {best[1]:.4f} at step {best[0]})"
                                           if best else ""))
    return row


def watch_training(flags, target, max_iters):
    """Run train.py with flags; stop it at the first val loss <= target, or after
    TARGET_TIME_LIMIT seconds. (elapsed, step, val loss) or None, the best (step, val loss)
    seen, train.py's exit code if it failed, and its last line."""
    process, lines = launch_train_py(flags)
    reached, best, tail = None, None, collections.deque(maxlen=1)
    deadline = time.time() + TARGET_TIME_LIMIT
    with tqdm(total=max_iters, unit="step", desc="train.py", file=sys.stdout) as progress:
        for line in lines_until(lines, deadline):
            tail.extend(line.strip().splitlines()[-1:])
            match = EVAL_LINE.search(line)
            if not match:
                continue
            step, val_loss, elapsed = int(match[1]), float(match[2]), float(match[3])
            progress.update(step - progress.n)
            progress.set_postfix_str(f"val {val_loss:.4f} at {elapsed:.1f}s")
            if best is None or val_loss < best[1]:
                best = (step, val_loss)
            if val_loss <= target:
                reached = (elapsed, step, val_loss)
                break
    process.kill()
    exit_code = process.wait()
    failed = exit_code if reached is None and exit_code not in (0, -9) else 0
    return reached, best, failed, tail[0] if tail else ""


def launch_train_py(flags):
    """Start train.py with flags: (the process, a queue of its output lines, None at the end).
    A thread reads the lines, so the caller can stop waiting at a deadline."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # eval lines as they are printed
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
    return process, lines


def lines_until(lines, deadline):
    """The lines of launch_train_py's queue as they come, until train.py ends or the deadline
    (time.time()) passes."""
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:  # train.py ended
            return
        yield line


def read_lines(stream, lines):
    for line in stream:
        lines.put(line)
    lines.put(None)


def training_row(device, compile_setting, quick):
    """Training tokens/s, MFU and peak memory of the default model (--quick: the tiny one)."""
    asked = compile_setting == "true"
    skip_compile = quick and not device.startswith("cuda")  # compiling takes a minute there
    flags = ["--device", device, "--compile", "true" if asked and not skip_compile else "false"]
    steps, warmup = (3, 1) if quick else (50, 10)
    measured = measure_training(flags + QUICK_FLAGS if quick else flags, steps, warmup,
                                f"compile {compile_setting}")
    tokens_per_sec, mfu = measured["tokens_per_sec"], measured["mfu"]
    how = compiled_note(measured["compiled"], asked, device, skip_compile)
    result = f"{tokens_per_sec:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")
    return dict(measurement=f"training tokens/s, {'tiny' if quick else 'default'} model, "
                            f"compile {'on' if asked else 'off'}",
                value=tokens_per_sec, unit="tokens/s", result=result,
                details=f"{measured['dtype']}, {how}, peak {measured['peak_mib']:,.0f} MiB",
                mfu=mfu, dtype=measured["dtype"], compiled=measured["compiled"],
                peak_mib=measured["peak_mib"])


def generation_row(device, use_cache, compile_setting, quick, n_tokens):
    """Batch-1 generation tokens/s of the default model (--quick: the tiny one), with the
    weights' number format generate.py picks by default."""
    asked = use_cache and compile_setting == "true"
    skip_compile = quick and not device.startswith("cuda")
    setting = "true" if asked and not skip_compile else "false"
    dtype = pick_dtype("auto", device)
    tokens_per_sec, peak = generate_speed(device, use_cache, n_tokens, dtype, setting,
                                          QUICK_MODEL if quick else None)
    compiled = setting == "true" and not compile_problem(device)
    kind = "KV cache, compiled" if asked else "KV cache" if use_cache else "no cache"
    how = compiled_note(compiled, asked, device, skip_compile)
    return dict(measurement=f"generation tokens/s, batch 1, {kind}",
                value=tokens_per_sec, unit="tokens/s", result=f"{tokens_per_sec:,.0f} tokens/s",
                details=f"{dtype}, {how}, {n_tokens} tokens, peak {peak:,.0f} MiB",
                dtype=dtype, compiled=compiled, peak_mib=peak)


def compiled_note(compiled, asked, device, skip_compile):
    if compiled:
        return "compiled"
    if not asked:
        return "eager"
    if skip_compile:
        return "eager: --quick does not compile on a CPU (it takes a minute there)"
    return f"eager: {compile_problem(device) or 'compiling failed'}"


def environment(device):
    """The machine and software the figures were measured with."""
    info = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), command=" ".join(sys.argv))
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_properties(device)
        info.update(gpu=gpu.name, compute_capability=f"{gpu.major}.{gpu.minor}",
                    gpu_memory_gib=round(gpu.total_memory / 2**30, 1))
    else:
        info.update(cpu=cpu_name(), cpu_cores=os.cpu_count())
    return info


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read())[1]
    except (OSError, TypeError):
        return platform.processor() or "unknown"


def markdown_report(result):
    info = result["environment"]
    machine = (f"{info['gpu']} (compute capability {info['compute_capability']}, "
               f"{info['gpu_memory_gib']} GiB)" if "gpu" in info
               else f"{info['cpu']} ({info['cpu_cores']} cores)")
    lines = [f"Device: {machine}; torch {info['torch']}, CUDA {info['cuda'] or 'none'}, "
             f"Python {info['python']}" + (" (--quick: tiny model)" if result["quick"] else ""),
             "", "| Measurement | Result | Details |", "|---|---|---|"]
    lines += [f"| {row['measurement']} | {row['result']} | {row['details']} |"
              for row in result["rows"]]
    return "\n".join(lines)


def write_json(path, result):
    with open(path, "w") as f:
        json.dump({**result, "markdown": markdown_report(result)}, f, indent=2)
        f.write("\n")




# ---------------------------------------------------------------------------------------------
# python bench.py curve --preset cpu-2min: val loss against seconds since launch, beside
# nanoGPT's published CPU recipe run through this code for the same wall time

def curve(preset, seconds, points, device):
    """Run `train.py --preset P` with about `points` evaluations, then nanoGPT's CPU recipe
    (--preset nanogpt-cpu) for at most the same wall time, each in its own process, and print
    the val loss against the seconds since launch of both. The evaluations' own time is
    included in those seconds (a few seconds each), as in any train.py run."""
    results = {name: loss_curve(name, seconds, points, device)
               for name in (preset, "nanogpt-cpu")}
    print(f"\nval loss against seconds since launch (budget {seconds} s):")
    for name, curve_points in results.items():
        print(f"--preset {name}: " + ", ".join(f"{val:.4f} at {elapsed:.0f}s (step {step})"
                                                 for elapsed, step, val in curve_points))
    print(f"\n| recipe | val loss within {seconds} s | at | step |\n|---|---|---|---|")
    for name, curve_points in results.items():
        within = [p for p in curve_points if p[0] <= seconds]
        elapsed, step, val = within[-1] if within else (float("nan"), 0, float("nan"))
        print(f"| --preset {name} | {val:.4f} | {elapsed:.1f} s | {step} |")
    return results


def loss_curve(preset, seconds, points, device):
    """[(seconds since launch, step, val loss)] of one train.py run, stopped at the budget."""
    eval_interval = max(1, PRESETS[preset]["max_iters"] // points)
    with tempfile.TemporaryDirectory() as folder:
        flags = ["--preset", preset, "--eval_interval", str(eval_interval), "--sample_tokens",
                 "0", "--checkpoint", os.path.join(folder, "ckpt.pt"), "--device", device]
        process, lines = launch_train_py(flags)
        found, deadline = [], time.time() + seconds + 10  # a little past: the last evaluation
        tail = collections.deque(maxlen=1)
        with tqdm(total=seconds, unit="s", desc=f"--preset {preset}", file=sys.stdout,
                  bar_format="{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}]") as bar:
            for line in lines_until(lines, deadline):
                tail.extend(line.strip().splitlines()[-1:])
                for match in EVAL_LINE.finditer(line):
                    step, val_loss, elapsed = int(match[1]), float(match[2]), float(match[3])
                    found.append((elapsed, step, val_loss))
                    bar.update(min(elapsed, seconds) - bar.n)
                    bar.set_postfix_str(f"val {val_loss:.4f} at step {step}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)  # when the output ended, train.py did
        failed = process.returncode not in (None, 0)
        process.kill()
        process.wait()
    if failed:
        raise UsageError(f"train.py --preset {preset} failed (exit {process.returncode}): "
                         f"{tail[0] if tail else 'no output'}")
    return found


if __name__ == "__main__":
    run_main(main)
