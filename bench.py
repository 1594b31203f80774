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
generated text (or a link to --data) and the token file to a temporary folder and deletes it
afterwards: the token files beside a --data text are never touched.
"""

import startup

startup.load_torch(__name__)  # first: Ctrl-C while it loads exits at once

import contextlib
import itertools
import json
import multiprocessing
import os
import pathlib
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import torch
from tqdm import tqdm

import checkpoint
import dataset
import generate
import runs
import train
from config import PRESETS, ArgumentParser, Config, check_each, parse_config
from model import GPTConfig, GPTModel
from speedups import compile_decode
from tokenizer import CharTokenizer
from utils import UsageError, compile_problem, pick_device, pick_dtype, run_main, use_flash

ROOT = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 65  # Tiny Shakespeare's
# Made-up characters for the untrained models timed here: what the text says changes no timing.
TOKENIZER = CharTokenizer([chr(c) for c in range(32, 32 + VOCAB_SIZE - 1)] + ["\n"])


def measure_training(flags, steps, warmup_steps, label):
    """(tokens/s, peak MiB, dict(mfu, dtype, compiled)) of training steps as train.py builds
    them from flags (its speed-ups, or none with --reference); mfu: None if the peak is unknown."""
    config, _ = parse_config(flags)
    run = runs.set_up(config)
    model = train.build_model(VOCAB_SIZE, config, run)
    optimizer = train.make_optimizer(model, config)
    train_model = train.wrap_for_training(model, config, run)
    scaler = train.make_scaler(run)
    for done in tqdm(range(warmup_steps + steps), desc=f"train ({label}, {run.dtype})",
                     file=sys.stdout):
        if done == warmup_steps:  # the first steps paid for compiling (up to a minute) and memory
            start = clock(run.device)
        windows = torch.randint(VOCAB_SIZE, (config.batch_size, config.block_size + 1),
                                device=run.device)  # random tokens: only the speed counts here
        batch = windows[:, :-1], windows[:, 1:]
        train.train_step(train_model, optimizer, scaler, [batch], config, run)
    tokens_per_sec = steps * config.batch_size * config.block_size / (clock(run.device) - start)
    mfu = runs.model_flops_utilization(model, config, run, tokens_per_sec)
    return tokens_per_sec, peak_mib(run.device), dict(mfu=mfu, dtype=run.dtype,
                                                      compiled=train_model is not model)


def generate_speed(device, use_cache, n_tokens, dtype, compile_setting, model_args=None):
    """(tokens/s, peak MiB, dict(dtype, compiled: the cached decode step)) of generating n_tokens,
    batch 1, from a one-character prompt, as generate.py does. model_args: another model shape."""
    dtype = pick_dtype(dtype, device)
    config = GPTConfig(VOCAB_SIZE, **{"flash": use_flash("auto", device), **(model_args or {})})
    model = generate.for_sampling(GPTModel(config), device, dtype)  # the attention generate.py runs
    compiled = use_cache and compile_decode(model, device, compile_setting)
    # What a user runs: generate.py's streaming loop with its default sampling, which also brings
    # the tokens to the host and decodes them (printing is not timed). The warm-up compiles, and
    # takes every path the timed tokens take (with the cache: a window slide).
    options = generate.parse_args([] if use_cache else ["--no_cache"])
    options.max_new_tokens = model.block_size + 10 if use_cache else 10
    list(generate.stream_text(model, TOKENIZER, [0], options, device))  # the warm-up
    options.max_new_tokens = n_tokens
    start = clock(device)
    with tqdm(total=n_tokens, file=sys.stdout,
              desc=f"generate ({'cache' if use_cache else 'no cache'}, {dtype})") as progress:
        for piece in generate.stream_text(model, TOKENIZER, [0], options, device):
            progress.update(len(piece))  # one character per token
    tokens_per_sec = n_tokens / (clock(device) - start)
    return tokens_per_sec, peak_mib(device), dict(dtype=dtype, compiled=compiled)


def clock(device):
    """time.time() once the device has finished the work queued so far."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.time()


def peak_mib(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def in_fresh_process(function, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


NO_ROOM = "free some disk space, or set TMPDIR to a folder on a bigger disk"


def temporary_folder():
    """A fresh folder for a benchmark's files (in TMPDIR), deleted at the end of its `with`."""
    try:
        return tempfile.TemporaryDirectory(prefix="mini-gpt-bench-")
    except OSError as err:  # TMPDIR full, read-only or not there
        raise UsageError(f"cannot make a temporary folder ({err.strerror or err}); "
                         f"{NO_ROOM}") from None


def write_or_stop(path, write, fix=NO_ROOM):
    """checkpoint.atomic_write(path, write): a full disk or a file-size limit is one line."""
    try:
        checkpoint.atomic_write(path, write)
    except (OSError, RuntimeError) as err:  # torch.save says a full disk with a RuntimeError
        raise UsageError(f"cannot write {path} ({checkpoint.write_failure(err)}); {fix}") from None


def main(argv=None):
    parser = ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    flag = parser.add_argument
    flag("what", choices=["train", "generate", "report", "curve", "prepare", "explore"])
    flag("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    flag("--steps", type=int, help="train: timed steps (default: 20 on a GPU, 3 on a CPU); "
         "prepare: the second run's (3); explore: rounds (20)")
    flag("--batch_size", type=int, default=64, help="train: the batch size")
    flag("--tokens", type=int, default=1000, help="generate, report: tokens to generate "
         "(report --quick: 50)")
    flag("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
         help="generate: the weights' number format, as generate.py's --dtype")
    flag("--compile", default="auto", choices=["auto", "true", "false"],
         help="generate: as generate.py's --compile (auto = on for CUDA)")
    flag("--quick", action="store_true",
         help="report: every row on a tiny model (under a minute on a CPU)")
    flag("--json", default="bench_report.json", help="report: where to write the table as JSON")
    flag("--preset", default="cpu", choices=sorted(PRESETS),
         help="curve: the train.py recipe to follow")
    flag("--seconds", type=int, default=120, help="curve: the wall-time budget of each run")
    flag("--points", type=int, default=6, help="curve: about how many evaluations each run makes")
    flag("--size_mb", type=int, default=100, help="prepare: MiB of text to generate (1024 = 1 GiB)")
    flag("--text", default="synthetic", choices=["synthetic", "shakespeare"],
         help="prepare: Zipf-distributed made-up words (many distinct words, as a real corpus "
              "has), or Tiny Shakespeare repeated")
    flag("--data", help="prepare: this text file or folder instead (prepared afresh in the "
         "temporary folder: its own token files are left as they are)")
    flag("--tokenizer", default="char", choices=["char", "bpe"], help="prepare: as train.py's")
    flag("--vocab_size", type=int, default=4096, help="prepare: BPE vocabulary")
    flag("--bpe_sample_chars", type=int, default=Config.bpe_sample_chars,
         help="prepare: as train.py's (default: config.py's)")
    args = parser.parse_args(argv)
    check_flags_apply(args, parser)
    check_each(args, ("steps", "tokens", "seconds", "points", "size_mb"),
               lambda value: value is None or value >= 1, "at least 1")
    # Years of work, and past 2**63 more than a progress bar can count (len(range) overflows).
    check_each(args, ("steps",), lambda value: value is None or value <= 10**9,
               "at most 1,000,000,000")
    if args.what == "prepare":  # the same checks as train.py's for these flags
        if args.data is not None and not args.data.strip():
            raise UsageError("--data must not be empty; leave it out to generate a text")
        parse_config(tokenizer_flags(args))
        return prepare_benchmark(args, pick_device(args.device))
    device = pick_device(args.device)
    flags = ["--device", device, "--batch_size", str(args.batch_size)]
    if args.what == "train":  # the default model at --batch_size: refused here if it cannot fit
        runs.check_model_fits(parse_config(flags)[0], runs.Run(device, "float32"))
    elif args.what == "report":  # minutes of work: prove first that the JSON can be saved
        checkpoint.check_outputs_spare_inputs(
            {args.json: "--json"}, {dataset.DEFAULT_DATA: "the --data file"}, "pick another --json")
        checkpoint.check_output_path(args.json, "--json", "bench_report.json")
        checkpoint.check_replaceable(args.json, "--json", "bench.py", is_report)
    else:
        generate.check_int8_on(device, args.dtype)
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
        timing = (args.steps or (20 if on_gpu else 3), 10 if on_gpu else 2)  # timed, warm-up
        variants = {name: (measure_training, flags + extra, *timing, name)
                    for name, extra in (("fast", []), ("reference", ["--reference"]))}
    else:
        variants = {name: (generate_speed, device, cache, args.tokens, args.dtype, args.compile)
                    for name, cache in (("cache", True), ("no-cache", False))}
    speeds = {name: in_fresh_process(*call)[:2] for name, call in variants.items()}
    print(f"{'variant':<10} {'tok/s':>10} {'peak MiB':>10}")
    for name, (tokens_per_sec, mib) in speeds.items():
        print(f"{name:<10} {tokens_per_sec:>10,.0f} {mib:>10,.0f}")
    (first, (first_speed, _)), (second, (second_speed, _)) = speeds.items()
    print(f"{args.what}: {first} {first_speed:,.0f} tok/s, {second} {second_speed:,.0f} tok/s, "
          f"speedup {first_speed / second_speed:.2f}x")


# The flags each benchmark reads (--device: all of them); --help says which is whose.
PREPARING = {"steps", "data", "tokenizer", "vocab_size", "bpe_sample_chars"}
FLAGS_OF = {"train": {"steps", "batch_size"}, "generate": {"tokens", "dtype", "compile"},
            "report": {"quick", "json", "tokens"}, "report --quick": {"quick", "json"},
            "curve": {"preset", "seconds", "points"}, "explore": {"steps"},
            "prepare": PREPARING | {"size_mb", "text"}, "prepare --data": PREPARING}


def check_flags_apply(args, parser):
    """Refuse a flag this benchmark would ignore: whoever gave it expects it to count."""
    data, quick = args.what == "prepare" and args.data, args.what == "report" and args.quick
    what = args.what + (" --data" if data else " --quick" if quick else "")
    for name in sorted(vars(args).keys() - {"what", "device"}):
        if getattr(args, name) != parser.get_default(name) and name not in FLAGS_OF[what]:
            raise UsageError(f"--{name} is not used by bench.py {what}; leave it out (--help "
                             f"says which benchmark reads each flag)")


# ---------------------------------------------------------------------------------------------
# python bench.py explore: the live page's server time for a keystroke and for a paste

def explore_speed(device, repeats):
    """Median server time (the model's work, the JSON answer) of the live page: a character typed
    after 255 (only it runs, through the KV cache), and 256 characters pasted at once."""
    import explore_server
    model = GPTModel(GPTConfig(VOCAB_SIZE))
    with temporary_folder() as folder:
        path = os.path.join(folder, "default.pt")
        write_or_stop(path, lambda tmp: torch.save(dict(
            model=model.state_dict(), model_args=asdict(model.config),
            tokenizer=TOKENIZER.to_dict()), tmp))
        explorer = explore_server.load_explorer(path, device)
    print(f"the default model ({explorer.model.num_params():,} parameters), "
          f"{torch.get_num_threads()} threads")
    generator = torch.Generator().manual_seed(0)
    timings = {"keystroke (255 -> 256 characters)": [], "paste (256 characters)": []}
    for _ in tqdm(range(repeats), desc="explore", unit="round"):
        prompt = TOKENIZER.decode(torch.randint(VOCAB_SIZE, (256,), generator=generator).tolist())
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

def tokenizer_flags(args):
    return [f"--tokenizer={args.tokenizer}", f"--vocab_size={args.vocab_size}",
            f"--bpe_sample_chars={args.bpe_sample_chars}"]


def prepare_benchmark(args, device):
    """Prepare a text in a fresh process (time, peak memory), then start training on it in
    another, as a second run: time to the first step, memory while training, an evaluation."""
    with temporary_folder() as folder:
        if args.data:
            size_mib = sum(map(os.path.getsize, dataset.find_sources(args.data))) / 2**20
            token_bytes = 4 if args.tokenizer == "bpe" and args.vocab_size > 2**16 else 2
            check_room(folder, token_bytes * size_mib, f"--data {args.data}", "its token file")
            data = os.path.join(folder, os.path.basename(os.path.abspath(args.data)))
            try:  # a link: prepared from scratch here, its own token files are never touched
                os.symlink(os.path.abspath(args.data), data)
            except OSError as err:  # e.g. Windows, where links need Developer Mode
                raise UsageError(f"cannot link {args.data} into {folder} ({err.strerror or err}); "
                                 f"allow symbolic links, or time train.py on it yourself") from None
        else:
            data = write_bench_text(folder, args.text, args.size_mb)
            size_mib = os.path.getsize(data) / 2**20
        shown = args.data or data  # the text as the user knows it
        flags = ["--data", data, *tokenizer_flags(args), "--device", device, "--preset", "cpu"]
        print(f"text: {shown} ({size_mib:,.0f} MiB); machine: {os.cpu_count()} cores, load "
              f"average {os.getloadavg()[0]:.1f} before")
        try:
            seconds, mib, workers_mib, meta = in_fresh_process(timed_prepare, flags)
            workers = f" (workers: at most {workers_mib:,.0f} MiB each)" if workers_mib else ""
            print(f"prepare: {seconds:.1f} s ({size_mib / seconds:.1f} MiB/s), CPU time "
                  f"{meta['cpu_seconds']:.0f} s in all processes; peak RSS {mib:,.0f} MiB"
                  f"{workers}; {meta['n_train'] + meta['n_val']:,} tokens ({args.tokenizer}, "
                  f"{meta['tokenizer_vocab']:,} in the vocabulary, {meta['dtype']})")
            result = in_fresh_process(second_run, flags, args.steps or 3, time.time())
        except UsageError as err:  # it names the link: name the text (its token files are here)
            raise UsageError(re.sub(re.escape(data) + r"(?!\.)", lambda _: shown, str(err)))
    print(f"second run: corpus mapped {result['load']:.2f} s after launch, first training "
          f"step done at {result['first_step']:.1f} s (the step-0 evaluation left out)")
    print(f"training: peak RSS {result['mib']:,.0f} MiB after {result['steps']} steps and "
          f"one evaluation; the evaluation took {result['eval']:.1f} s (val loss "
          f"{result['note']})")


def shakespeare():
    return pathlib.Path(dataset.find_sources(dataset.DEFAULT_DATA)[0]).read_text(encoding="utf-8")


def check_room(folder, mib, what, holding):
    """Refuse, before any work, files that would fill the disk (other programs failing too)."""
    free = shutil.disk_usage(folder).free // 2**20
    if mib > free:
        raise UsageError(f"{what} needs about {mib:,.0f} MiB free in {folder} ({holding}), which "
                         f"has {free:,} MiB; ask for less, or set TMPDIR to a folder on a bigger "
                         f"disk")


def write_bench_text(folder, kind, size_mb):
    path = os.path.join(folder, f"{kind}-{size_mb}mb.txt")
    size = size_mb * 2**20
    check_room(folder, 3 * size_mb, f"--size_mb {size_mb}", "the text and its token file")
    blocks = itertools.repeat(shakespeare()) if kind == "shakespeare" else synthetic_blocks()

    def write_text(tmp_path):
        with open(tmp_path, "wb") as f, tqdm(total=size, desc=f"writing {kind} text", unit="B",
                                             unit_scale=True, file=sys.stdout) as bar:
            while f.tell() < size:
                text = next(blocks)[:size - f.tell()]  # whole characters: valid UTF-8
                f.write(text.encode("utf-8"))
                bar.update(len(text))
    write_or_stop(path, write_text)
    return path


def synthetic_blocks(n_words=1_000_000):
    """Text in blocks of about 6 MB, the same every time: Zipf-drawn words from a million made-up
    ones (some accented or Chinese), with punctuation and new lines. Unlike Tiny Shakespeare
    repeated, new words keep coming, as in a real corpus: what BPE's caches and vocabulary feel."""
    import numpy as np
    rng = np.random.default_rng(0)
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
    """(seconds, peak MiB, its largest worker's, metadata) of a first run's preparing."""
    config, _ = parse_config(flags)
    settings = dataset.corpus_settings(config)
    stem = dataset.prepared_stem(config.data, settings)  # a fresh folder: as a first run
    start = time.time()
    meta = dataset.prepare(dataset.find_sources(config.data), settings, stem)
    seconds = time.time() - start
    meta["tokenizer_vocab"] = dataset.tokenizer_from_dict(meta["tokenizer"]).vocab_size
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    meta["cpu_seconds"] = sum(r.ru_utime + r.ru_stime for r in (
        resource.getrusage(resource.RUSAGE_SELF), children))  # on a busy machine: > wall / cores
    return seconds, peak_mib("cpu"), children.ru_maxrss / 2**10, meta


def second_run(flags, steps, launched):
    """As train.py on a prepared text: seconds since `launched` (before this process started) to
    the corpus mapped and the first step done; peak MiB after `steps` more and an evaluation."""
    config, _ = parse_config(flags)
    run = runs.set_up(config)
    corpus, val_data = train.load_tokens(config, run, fix="use a longer text")  # no --block_size
    loaded = time.time() - launched
    model = train.build_model(corpus.tokenizer.vocab_size, config, run)
    optimizer = train.make_optimizer(model, config)
    scaler = train.make_scaler(run)
    for done in range(steps + 1):
        batch = dataset.get_batch(corpus, config.batch_size, config.block_size, run.device)
        train.train_step(model, optimizer, scaler, [batch], config, run)
        if done == 0:
            first_step = clock(run.device) - launched
    start = time.time()
    train.evaluate(model, corpus, val_data, config, run)
    return dict(load=loaded, first_step=first_step, steps=steps + 1, mib=peak_mib("cpu"),
                eval=clock(run.device) - start, note=val_data.note)


# ---------------------------------------------------------------------------------------------
# python bench.py report: every figure of the GPU table (docs/gpu.md) in one run, minutes
# on an H100. --quick runs each row on a tiny model, so that a test can run the whole command.

TARGET_VAL_LOSS = 1.47  # about nanoGPT's best val loss on Tiny Shakespeare, characters
TARGET_TIME_LIMIT = 240  # seconds to wait for --preset fast to get there
# --quick: a tiny model on the first 30,000 characters that gets below QUICK_TARGET in ~10 steps.
QUICK_MODEL = dict(n_embd=64, n_layer=2, n_head=4, block_size=32)
QUICK_FLAGS = [f"--{name}={value}" for name, value in QUICK_MODEL.items()] + [
    "--batch_size=32", "--dropout=0", "--learning_rate=1e-2", "--warmup_iters=5"]
QUICK_TARGET = 3.2
EVAL_LINE = re.compile(r"Step (\d+): .*val loss ([\d.naif]+)\b.*\(([\d.]+)s\)")


def report(device, quick, json_path, n_tokens):
    """Run every row (speeds in fresh processes), print a Markdown table, write it as JSON."""
    speed_rows = [(f"training speed, compile {setting}", training_row, device, setting, quick)
                  for setting in ("false", "true")]
    speed_rows += [(f"generation speed, {'KV cache' if cache else 'no cache'}, compile {setting}",
                    generation_row, device, cache, setting, quick, n_tokens)
                   for cache, setting in ((True, "true"), (True, "false"), (False, "false"))]
    print("\n[1/6] time from launch to the target val loss", flush=True)
    rows = [time_to_target_row(device, quick)]
    for part, (what, *call) in enumerate(speed_rows, start=2):
        compiling = " (compiling takes up to a minute)" if what.endswith("true") else ""
        print(f"\n[{part}/6] {what}{compiling}", flush=True)
        rows.append(in_fresh_process(*call))
    info = environment(device)
    machine = (f"{info['gpu']} (compute capability {info['compute_capability']}, "
               f"{info['gpu_memory_gib']} GiB)" if "gpu" in info
               else f"{info['cpu']} ({info['cpu_cores']} cores)")
    lines = [f"Device: {machine}; torch {info['torch']}, CUDA {info['cuda'] or 'none'}, "
             f"Python {info['python']}" + (" (--quick: tiny model)" if quick else ""),
             "", "| Measurement | Result | Details |", "|---|---|---|"]
    lines += [f"| {row['measurement']} | {row['result']} | {row['details']} |" for row in rows]
    result = dict(environment=info, quick=quick, rows=rows, markdown="\n".join(lines))
    print("\n" + result["markdown"])
    replacing = os.path.exists(json_path)
    write_or_stop(json_path, lambda tmp: pathlib.Path(tmp).write_text(
        json.dumps(result, indent=2) + "\n"), "the table is above; free some disk space and run "
        "again, or pick another --json")
    print(f"\nWrote {json_path}" + (" (replacing the report that was there)" if replacing else ""))


def is_report(path):
    with contextlib.suppress(OSError):
        earlier = checkpoint.parse_json(pathlib.Path(path).read_bytes())
        return isinstance(earlier, dict) and {"environment", "rows"} <= earlier.keys()
    return False


def time_to_target_row(device, quick):
    """Launch train.py (--preset fast; --quick: the tiny model) until an eval line reaches the
    target val loss, or the time limit; its time is train.py's: since it started, imports too."""
    target = QUICK_TARGET if quick else TARGET_VAL_LOSS
    row = dict(measurement=f"time to val <= {target} "
                           f"({'tiny model' if quick else '--preset fast'})",
               value=None, unit="s", details="seconds since train.py started, imports included")
    with temporary_folder() as folder:  # the checkpoint and its logs go here
        flags = ["--device", device, "--checkpoint", os.path.join(folder, "ckpt.pt"),
                 "--sample_tokens", "0"]
        if quick:
            data = os.path.join(folder, "start.txt")
            write_or_stop(data, lambda tmp: pathlib.Path(tmp).write_text(shakespeare()[:30_000],
                                                                         encoding="utf-8"))
            flags += ["--data", data, *QUICK_FLAGS, "--max_iters", "60", "--eval_interval", "5",
                      "--eval_iters", "2", "--compile", "false"]
        else:
            flags += ["--preset", "fast"]
        try:
            points = eval_points(flags, TARGET_TIME_LIMIT, "train.py", target)
        except UsageError as failure:
            return dict(row, result=str(failure))
    if points and points[-1][2] <= target:
        seconds, step, val_loss = points[-1]
        return dict(row, value=seconds, step=step, val_loss=val_loss,
                    result=f"{seconds:.1f} s (step {step}, val {val_loss:.4f})")
    best = min(points, key=lambda point: point[2], default=None)
    return dict(row, result="not reached" + (
        f" (best val {best[2]:.4f} at step {best[1]})" if best else ""))


def launch_train_py(flags):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # lines as printed
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def eval_points(flags, seconds, name, stop_at=float("-inf")):
    """[(seconds since launch, step, val loss)] of train.py's eval lines, read as printed until it
    ends, `seconds` pass or a val loss <= stop_at; a UsageError with its last line if it fails."""
    points, last_line = [], ""
    with launch_train_py(flags) as process, tqdm(
            total=seconds, unit="s", desc=name, file=sys.stdout,
            bar_format="{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}<{remaining}{postfix}]") as bar:
        deadline = time.monotonic() + seconds
        # At the deadline: its output then ends. (Past threading's limit, 292 years: none.)
        killer = threading.Timer(min(seconds, threading.TIMEOUT_MAX), process.kill)
        killer.start()
        try:
            for line in process.stdout:
                last_line = line.strip() or last_line
                for match in EVAL_LINE.finditer(line):
                    points.append((float(match[3]), int(match[1]), float(match[2])))
                    bar.update(min(points[-1][0], seconds) - bar.n)
                    bar.set_postfix_str(f"val {points[-1][2]:.4f} at step {points[-1][1]}")
                if points and points[-1][2] <= stop_at:
                    break
            else:  # the output ended: it finished, or the deadline killed it (exit -9)
                killed_at_deadline = process.wait() == -9 and time.monotonic() >= deadline
                if process.returncode != 0 and not killed_at_deadline:
                    raise UsageError(f"{name} failed (exit {process.returncode}): "
                                     f"{last_line or 'no output'}")
        finally:
            killer.cancel()
            process.kill()
    return points


def compile_choice(asked, device, quick):
    """(--compile's value for a row, what its details say if it runs eager)."""
    if not asked:
        return "false", "eager"
    if quick and not device.startswith("cuda"):
        return "false", "eager: --quick does not compile on a CPU (it takes a minute there)"
    return "true", f"eager: {compile_problem(device) or 'compiling failed'}"


def training_row(device, compile_setting, quick):
    """Training tokens/s, MFU and peak memory of the default model (--quick: the tiny one)."""
    asked = compile_setting == "true"
    setting, eager = compile_choice(asked, device, quick)
    flags = ["--device", device, "--compile", setting] + (QUICK_FLAGS if quick else [])
    tokens_per_sec, peak, facts = measure_training(flags, *((3, 1) if quick else (50, 10)),
                                                   f"compile {compile_setting}")
    mfu = f", MFU {100 * facts['mfu']:.1f}%" if facts["mfu"] else ""
    return dict(measurement=f"training tokens/s, {'tiny' if quick else 'default'} model, "
                            f"compile {'on' if asked else 'off'}",
                value=tokens_per_sec, unit="tokens/s",
                result=f"{tokens_per_sec:,.0f} tokens/s{mfu}",
                details=f"{facts['dtype']}, {'compiled' if facts['compiled'] else eager}, "
                        f"peak {peak:,.0f} MiB", **facts, peak_mib=peak)


def generation_row(device, use_cache, compile_setting, quick, n_tokens):
    """Batch-1 generation tokens/s of the default model (--quick: the tiny one), with the
    weights' number format generate.py picks by default."""
    asked = use_cache and compile_setting == "true"
    setting, eager = compile_choice(asked, device, quick)
    tokens_per_sec, peak, facts = generate_speed(device, use_cache, n_tokens, "auto", setting,
                                                 QUICK_MODEL if quick else None)
    kind = "KV cache, compiled" if asked else "KV cache" if use_cache else "no cache"
    return dict(measurement=f"generation tokens/s, batch 1, {kind}",
                value=tokens_per_sec, unit="tokens/s", result=f"{tokens_per_sec:,.0f} tokens/s",
                details=f"{facts['dtype']}, {'compiled' if facts['compiled'] else eager}, "
                        f"{n_tokens} tokens, peak {peak:,.0f} MiB", **facts, peak_mib=peak)


def environment(device):
    """The machine and software the figures were measured with."""
    info = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), command=" ".join(sys.argv))
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_properties(device)
        return dict(info, gpu=gpu.name, compute_capability=f"{gpu.major}.{gpu.minor}",
                    gpu_memory_gib=round(gpu.total_memory / 2**30, 1))
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, TypeError), open("/proc/cpuinfo") as f:
        cpu = re.search(r"model name\s*:\s*(.*)", f.read())[1]
    return dict(info, cpu=cpu, cpu_cores=os.cpu_count())


# ---------------------------------------------------------------------------------------------
# python bench.py curve --preset cpu-2min: val loss against seconds since launch, beside
# nanoGPT's published CPU recipe run through this code for the same wall time

def curve(preset, seconds, points, device):
    """As in any train.py run, the seconds since launch include the evaluations."""
    results = {}  # preset: [(seconds since launch, step, val loss)]
    with temporary_folder() as folder:  # the checkpoints and their logs go here
        for name in (preset, "nanogpt-cpu"):
            flags = ["--preset", name, "--eval_interval",
                     str(max(1, PRESETS[name]["max_iters"] // points)), "--sample_tokens", "0",
                     "--checkpoint", os.path.join(folder, f"{name}.pt"), "--device", device]
            # A little past the budget: the last evaluation.
            results[name] = eval_points(flags, seconds + 10, f"train.py --preset {name}")
    print(f"\nval loss against seconds since launch (budget {seconds} s):")
    for name, found in results.items():
        print(f"--preset {name}: " + ", ".join(f"{val:.4f} at {elapsed:.0f}s (step {step})"
                                                 for elapsed, step, val in found))
    print(f"\n| recipe | val loss within {seconds} s | at | step |\n|---|---|---|---|")
    for name, found in results.items():
        within = [point for point in found if point[0] <= seconds]
        elapsed, step, val = within[-1] if within else (float("nan"), 0, float("nan"))
        print(f"| --preset {name} | {val:.4f} | {elapsed:.1f} s | {step} |")


if __name__ == "__main__":
    run_main(main)
