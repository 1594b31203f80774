"""Benchmarks of the default model (10,788,929 parameters) on this machine.

    python bench.py train --device cpu        # train.py's defaults vs train.py --reference
    python bench.py generate --device cpu     # KV cache vs re-running the whole context
    python bench.py prepare --size_mb 1024    # preparing a 1 GiB text (dataset.py), then
                                              # a second run's start on it; --tokenizer bpe

Each variant runs in a fresh process, so the peak memory printed is its own. The token ids are
random: what the text says does not change how long the arithmetic takes. `prepare` writes its
generated text (and the prepared token file) to a temporary folder and deletes it afterwards.
"""

import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from tqdm import tqdm

import dataset
import train
from config import ArgumentParser, parse_config
from generate import for_sampling, pick_sampling_dtype
from model import GPTModel
from speedups import compile_decode
from utils import DEFAULT_DATA, get_batch, pick_device, run_main

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
    parser.add_argument("what", choices=["train", "generate", "prepare"])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps (default: 20 on a GPU, 3 on a CPU)")
    parser.add_argument("--batch_size", type=int, default=64, help="training batch size")
    parser.add_argument("--tokens", type=int, default=1000, help="tokens to generate")
    parser.add_argument("--dtype", default="auto", help="generate: the weights' number format, "
                        "as generate.py's --dtype (auto, float32, bfloat16, float16, int8)")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="generate: as generate.py's --compile (auto = on for CUDA)")
    add_prepare_flags(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.what == "prepare":
        return prepare_benchmark(args, device)
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
    with open(dataset.find_sources(DEFAULT_DATA)[0], encoding="utf-8") as f:
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
    run = train.set_up(config)
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


if __name__ == "__main__":
    run_main(main)
