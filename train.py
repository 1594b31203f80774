"""Train Mini-GPT on a text file, token by token (characters, or BPE with --tokenizer bpe).

    python train.py                      # the default model on data/input.txt (a GPU run)
    python train.py --preset cpu         # a small model for a laptop CPU: about half a minute
    python train.py --max_iters 2000 --dropout 0.1   # any config.py field as --name value
    python train.py --reference          # every speed-up off: the plain code, for a debugger

main() is the whole loop: load data, build the model, then repeat {set the learning rate,
sample a batch, forward, backward, step}, evaluating and saving every eval_interval steps, and
print a sample at the end. Below it, one helper per job; below those, the parts a first read
can skip: speed figures, several processes (DDP), exact resume. Metrics (JSONL, loss
curve, W&B) are recorded by tracking.py.
"""

import os
import signal
import time

START_TIME = time.time()  # "elapsed" in the eval lines counts from launch, imports included

# Ctrl-C while torch loads (seconds): exit at once with 130, no traceback. os._exit, as nothing
# is open yet, and an exception could be swallowed by a library's bare `except:` mid-import.
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

import atexit
import contextlib
import datetime
import math
import random
import re
import sys
import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import speedups
from checkpoint import (
    MODEL_SHAPE,
    check_output_path,
    check_outputs_spare_inputs,
    load_checkpoint,
    remove_leftover_tmp,
    same_file,
    save_checkpoint,
    write_failure,
)
from config import PRESETS, parse_config
from dataset import corpus_settings, find_sources, get_batch, load_corpus, prepared_stem, val_set
from model import GPTConfig, GPTModel
from tokenizer import start_tokens
from tracking import log_paths, metrics_recorder
from utils import (
    UsageError,
    autocast,
    bits_per_char,
    check_fits_in_memory,
    hold_lock,
    mps_has_bf16,
    pick_device,
    pick_dtype,
    regular_file_problem,
    run_main,
    use_compile,
)


def main(argv=None):
    config, preset = parse_config(argv)
    run = set_up(config)  # device, number format, this process's rank; seeds; CPU speed-ups
    check_model_fits(config, run)  # before any work: a model too big for this machine
    check_paths(config, run)  # the checkpoint to resume exists; the new one can be saved
    log = print if run.is_master else (lambda *args, **kwargs: None)
    log(what_runs(config, run, preset))  # which number format, attention, optimizer, and why
    log("Loading data...")
    corpus, val_data = load_tokens(config, run)  # a token file, prepared once, memory-mapped
    tokenizer = corpus.tokenizer
    log(f"Dataset length: {corpus.n_chars} characters")
    log(f"Vocabulary size: {tokenizer.vocab_size}")
    model = build_model(tokenizer.vocab_size, config, run)
    log(f"Model parameters: {model.num_params():,}")
    warn_if_gpu_sized(model, config, run, log)
    optimizer = make_optimizer(model, config)
    start_step, val_loss = 0, float("nan")
    best = BestEvaluation()  # the weights generate.py samples: those of the lowest val loss
    if config.resume:
        start_step, val_loss = resume(config, model, optimizer, corpus, run, best)
    train_model = wrap_for_training(model, config, run)  # torch.compile, DDP
    scaler = make_scaler(run)  # float16 only: scales the loss so small gradients survive
    record = metrics_recorder(config) if run.is_master else None
    stop_requested = catch_ctrl_c(run)  # and SIGTERM; under torchrun: every rank, a step later

    log(f"\nStarting training for {config.max_iters} iterations...")
    progress = tqdm(total=config.max_iters, initial=start_step, unit="step", dynamic_ncols=True,
                    file=sys.stdout, disable=not run.is_master)
    timer = StepTimer()
    for step in range(start_step, config.max_iters + 1):  # + 1: evaluate after the last step
        stopping = stop_requested()  # Ctrl-C; under torchrun, every rank stops at the same step
        last_step = step == config.max_iters or stopping
        # A resumed run's checkpoint was saved just after evaluating this step: no need again.
        just_resumed = config.resume and step == start_step
        if (step % config.eval_interval == 0 or last_step) and not just_resumed:
            val_loss = evaluate_and_save(step, model, optimizer, tokenizer, corpus, val_data,
                                         config, run, progress, record, last_step, best)
            timer.restart()  # keep evaluation time out of tokens/s
        if last_step:
            break

        lr = set_learning_rate(optimizer, step, config)
        micro_batches = [get_batch(corpus, config.batch_size, config.block_size, run.device)
                         for _ in range(config.gradient_accumulation_steps)]
        loss = train_step(train_model, optimizer, scaler, micro_batches, config, run)
        progress.update(1)
        timer.count_step()
        if run.is_master and (step + 1) % config.log_interval == 0:  # .item() waits for a GPU
            report_progress(step + 1, loss.item(), lr, timer, model, config, run, progress,
                            record)
    progress.close()
    finish(step, stopping, val_loss, best, model, tokenizer, config, run, record)


# ---------------------------------------------------------------------------------------------
# The steps of main(), roughly in the order it calls them

@dataclass
class Run:
    """Where this process runs: its device and number format, and its rank under torchrun."""
    device: str  # "cpu", "cuda", "cuda:N" or "mps"
    dtype: str  # autocast's number format: float32, bfloat16 or float16
    rank: int = 0  # this process's number (0 without torchrun): only rank 0 prints and saves
    local_rank: int = 0  # its number on this machine: which GPU it uses
    world_size: int = 1  # how many processes train together

    @property
    def is_master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]


def set_up(config):
    """Pick the device, start DDP if torchrun launched us, seed, pick the number format,
    switch on CPU speed-ups."""
    device = pick_device(config.device)
    rank, local_rank, world_size, device = start_distributed(device)  # (0, 0, 1, device) alone
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # the current GPU: whose random state rng_state saves
    torch.manual_seed(config.seed + rank)  # each rank draws its own batches and dropout masks
    dtype = pick_dtype(config.dtype, device)  # --reference: float32
    # torch.optim.Muon runs its iteration in bfloat16, whatever --dtype says.
    if device == "mps" and (dtype == "bfloat16" or config.optimizer == "muon") \
            and not mps_has_bf16():
        raise UsageError("bfloat16 (--dtype bfloat16, or Muon's iteration) needs macOS 14 or "
                         "newer on an Apple GPU; update macOS, or pass --dtype float32 and "
                         "--optimizer adamw")
    if device == "cpu" and not config.reference:
        speedups.keep_freed_memory()  # reuse freed activations' memory: no page faults
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 0):
        # TF32: float32 matmuls on the tensor cores of Ampere and newer GPUs (A100, RTX 30xx,
        # H100); older ones (T4, V100) have no TF32 and would ignore the switch anyway.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(device, dtype, rank, local_rank, world_size)


def what_runs(config, run, preset):
    """The first lines train.py prints: the number format, attention and optimizer that run,
    each with why (the flag that chose it, or the default's reason) and how to change it."""
    if config.reference:
        return "--reference: float32, written-out attention and AdamW: the code on the page"
    chip, flash = ("CPU" if run.device == "cpu" else "GPU"), use_flash(config.flash, run.device)
    number = dict(float32="float32", bfloat16="bf16 autocast", float16="fp16 autocast")[run.dtype]
    if config.dtype != "auto":
        number += f": --dtype {config.dtype}"
    else:  # utils.pick_dtype: bf16 where the chip has it, else fp16 on GPUs, float32 on CPUs
        has = "has" if run.dtype == "bfloat16" else "has no"
        number += f": this {chip} {has} native bf16" + (
            "" if run.dtype == "float32" else " (--dtype float32 to turn off)")
    attention = ("SDPA" if flash else "written-out") + " attention: " + (
        f"--flash {config.flash}" if config.flash != "auto" else
        f"faster on {chip}s (--flash {str(not flash).lower()} for the other)")
    optimizer = "AdamW (--optimizer muon: Muon, which learns more per step)"
    if config.optimizer == "muon":
        chosen_by = f"--preset {preset}" if "optimizer" in PRESETS.get(preset, {}) else \
            "--optimizer muon"
        optimizer = f"Muon for the matrices in the blocks, AdamW for the rest: {chosen_by}"
    return f"{number}\n{attention}\n{optimizer}"


def check_model_fits(config, run):
    """Refuse a model that cannot fit in this device's memory before allocating anything (a
    huge flag would otherwise end in an allocator's traceback, or in hours of swapping). What
    one step needs at least: weights, gradients and an optimizer moment (3 x 4 bytes a
    parameter), each block's (T, T) causal mask, the micro-batches of token ids, and the
    activations backward keeps (the residual stream per block, the logits). The vocabulary is
    not known yet, so it counts the fewest tokens there can be: 256 for BPE, 1 for characters."""
    vocab_size = 256 if config.tokenizer == "bpe" else 1
    C, L, T, B = config.n_embd, config.n_layer, config.block_size, config.batch_size
    n_bytes = (12 * param_count(vocab_size, C, L, T) + 4 * L * T * T
               + 8 * config.gradient_accumulation_steps * B * (T + 1) + 2 * B * T * L * C
               + 4 * B * T * vocab_size)
    check_fits_in_memory(n_bytes, run.device, "training this model",
                         "lower --n_embd, --n_layer, --block_size or --batch_size")


def check_paths(config, run):
    """Before any work: the checkpoint to resume from exists, and the new one can be saved (by
    rank 0, which saves): no file the run writes is one it reads, the checkpoint is not a
    folder, its folder exists (it is created) and a file can be written there, and no other
    run is saving to it. Saving can then fail only for lack of space."""
    if config.resume:
        source = config.checkpoint if config.resume == "true" else config.resume
        problem = regular_file_problem(source)
        if problem == "does not exist":
            raise UsageError(f"--resume: no checkpoint at {source}; train one first, or drop "
                             f"--resume")
        if problem:
            raise UsageError(f"--resume {source} {problem}; pass the checkpoint file to go on "
                             f"from")
    if not run.is_master:
        return
    path = config.checkpoint
    metrics_log, loss_curve = log_paths(path)
    outputs = {path: "--checkpoint", f"{path}.lock": "its lock file",
               metrics_log: "its metrics log", loss_curve: "its loss curve"}
    check_outputs_spare_inputs(outputs, run_inputs(config), "pick another --checkpoint")
    check_output_path(path, "--checkpoint", "ckpt.pt")
    claim_checkpoint(path)


def run_inputs(config):
    """{path: what it is} of every file the run reads: the text, its token files, and the
    checkpoint to resume, unless that is the one to save (which is meant to be replaced)."""
    inputs = {source: "a file of the --data folder" for source in find_sources(config.data)}
    inputs[config.data] = "the --data folder" if os.path.isdir(config.data) else "the --data file"
    stem = prepared_stem(config.data, corpus_settings(config))
    inputs.update({f"{stem}.tokens": "the token file", f"{stem}.tokens.json": "the token file"})
    resumed = config.checkpoint if config.resume == "true" else config.resume
    if resumed and not same_file(resumed, config.checkpoint):
        inputs[resumed] = "the checkpoint to resume"
    return inputs


def claim_checkpoint(path):
    """Lock the checkpoint for this run, so that a second run saving to the same file at the
    same time is refused (the lock goes when this run ends, however it ends), then remove the
    temporary files that killed runs left beside it."""
    holder = hold_lock(f"{path}.lock")
    if holder:
        raise UsageError(f"another run ({holder}) is saving to --checkpoint {path}; wait for "
                         f"it to end, or pick another --checkpoint")
    remove_leftover_tmp(path)


def load_tokens(config, run):
    """(corpus, val set): the text's tokens, prepared once into a file that every rank maps
    (dataset.py), and the val tokens evaluate() scores, on the device."""
    corpus = load_corpus(config, run.rank, run.world_size)
    if corpus.n_train <= config.block_size or corpus.n_val < 2:
        need = math.ceil((config.block_size + 2) / 0.9)
        raise UsageError(f"{config.data} has {corpus.n_chars} characters, too few for block_size "
                         f"{config.block_size}: need at least {need}; use a longer text or a "
                         f"smaller --block_size")
    return corpus, val_set(corpus, config.eval_tokens, config.block_size, run.device)


def build_model(vocab_size, config, run):
    """The model of the shape config asks for; its GPTConfig goes into every checkpoint."""
    model = GPTModel(GPTConfig(vocab_size, config.n_embd, config.n_layer, config.n_head,
                               config.block_size, config.dropout,
                               use_flash(config.flash, run.device))).to(run.device)
    if run.device == "cpu" and not config.reference:
        speedups.use_fast_cpu_dropout(model)  # a quarter of the random numbers per mask
    return model


def use_flash(setting, device):
    """SDPA or the written-out attention. On CPUs the written-out one trains faster (SDPA's
    CPU kernels, with dropout a slower fallback, lose to plain matmuls; docs/results.md); on
    GPUs SDPA's fused kernels win."""
    if setting == "auto":
        return device != "cpu"
    return setting == "true"


def warn_if_gpu_sized(model, config, run, log):
    total_flops = flops_per_token(model, config) * tokens_per_step(config, run) * config.max_iters
    if run.device == "cpu" and total_flops > 1e15:
        log("Note: this is a GPU-sized run; on a CPU it will take hours. "
            "For a model that trains on a CPU in half a minute, use --preset cpu.")


def make_optimizer(model, config):
    """AdamW, decaying the weight matrices only (biases and LayerNorm gains are not shrunk);
    with --optimizer muon, Muon for the blocks' matrices and AdamW for the rest (speedups.py)."""
    named = list(model.named_parameters())
    for_muon = [p for name, p in named
                if config.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks.")]
    rest = [p for _, p in named if all(p is not q for q in for_muon)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    betas = (config.beta1, config.beta2)
    fused = {} if config.reference else {"fused": True}  # one kernel for the whole update
    try:
        adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, **fused)
    except (RuntimeError, TypeError):  # a device or PyTorch version without fused AdamW
        adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas)
    if not for_muon:
        return adamw
    return speedups.MuonAdamW(adamw, for_muon, config.muon_lr, config.weight_decay)


def wrap_for_training(model, config, run):
    """The model that train_step calls: compiled (--compile), and wrapped in DDP under
    torchrun. Evaluation and saving use the plain model, which shares its weights."""
    if use_compile(config.compile, run.device, "running"):
        model = compiled_or_eager(model)
    if run.world_size > 1:  # DDP: averages the gradients of all ranks during backward
        model = DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
        # The only buffers, the causal masks, never change: rank 0 need not send them to every
        # rank before every forward, DDP's default. (Set here: PyTorch 2.13 renamed the flag.)
        model.broadcast_buffers = False
    return model


def compiled_or_eager(model):
    """torch.compile(model), which compiles at its first call; if compiling fails there (a
    compiler that will not run, an unsupported GPU), a note says so and it runs eager."""
    compiled = torch.compile(model)
    compiled_forward = compiled.forward

    def forward(*args, **kwargs):
        try:
            return compiled_forward(*args, **kwargs)
        except Exception as error:
            print(f"\nNote: running without torch.compile: it failed with "
                  f"{type(error).__name__} (see TROUBLESHOOTING.md)", flush=True)
            compiled.forward = model.__call__  # every later step: eager
            return model(*args, **kwargs)

    compiled.forward = forward
    return compiled


def make_scaler(run):
    """float16 (GPUs without bf16: T4, V100) needs loss scaling: the loss is multiplied before
    backward so small gradients do not underflow to 0, and divided out before the step.
    bfloat16 has float32's range and float32 needs nothing, so there the scaler is a no-op."""
    return torch.amp.GradScaler(run.device_type, enabled=run.dtype == "float16")


def evaluate_and_save(step, model, optimizer, tokenizer, corpus, val_data, config, run,
                      progress, record, last_step, best):
    """Rank 0 evaluates and prints the eval line (marked when its val loss is the best yet);
    every rank's random state goes into the checkpoint, which rank 0 saves (atomically) after
    step 0, with the best evaluation's weights. Returns the val loss (NaN on the other ranks)."""
    val_loss = float("nan")
    if run.is_master:
        train_loss, val_loss = evaluate(model, corpus, val_data, config, run)
        val_bpc = bits_per_char(val_loss, val_data.n_predictions, val_data.n_chars)
        elapsed = time.time() - START_TIME
        improved = best.update(step, val_loss, model)
        progress.write(f"Step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                       f"({val_data.note}), val bpc {val_bpc:.4f} ({elapsed:.1f}s)"
                       + (" new best" if improved else ""))
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            stop_on_nan(progress, config.checkpoint)
        metrics = dict(step=step, train_loss=train_loss, val_loss=val_loss, val_bpc=val_bpc,
                       elapsed=elapsed)
        if config.eval_sample_tokens > 0:
            metrics["sample"] = eval_sample(model, tokenizer, config, run)
            progress.write(f"Sample at step {step}:\n{metrics['sample'].strip()}\n")
    # Taken after rank 0's evaluation (which draws batches), so --resume continues exactly.
    rng_states = gather_from_all_ranks(rng_state(), run)
    if run.is_master and step > 0:
        save_or_stop(dict(model=model.state_dict(),
                          model_args=asdict(model.config),
                          tokenizer=tokenizer.to_dict(), config=asdict(config),
                          optimizer=optimizer.state_dict(), step=step, val_loss=val_loss,
                          val_bpc=val_bpc, rng=rng_states, text_sha256=corpus.sha256,
                          **best.in_checkpoint(step)),
                     config.checkpoint, progress)
    if run.is_master:  # after saving: a fresh run's log replaces an earlier run's only then
        record(metrics, draw_curve=last_step, saved=step > 0)
    return val_loss


@dataclass
class BestEvaluation:
    """The evaluation with the lowest val loss so far. A model trained too long on a small text
    gets worse on the val split (it overfits): the checkpoint keeps these weights too, as
    best_model, and generate.py samples them unless asked for --weights last."""
    step: int = -1
    val_loss: float = math.inf
    weights: dict = None  # a copy on the CPU, taken when they became the best

    def update(self, step, val_loss, model):
        """Remember this evaluation if its val loss is the lowest yet; True if it beat an
        earlier one."""
        if not val_loss < self.val_loss:  # also False for NaN
            return False
        improved = self.step >= 0
        self.step, self.val_loss = step, val_loss
        self.weights = {name: w.detach().to("cpu", copy=True)
                        for name, w in model.state_dict().items()}
        return improved

    def in_checkpoint(self, step):
        """The checkpoint's entries: the best step and val loss, and its weights unless they
        are those of this step (then they are the checkpoint's model already)."""
        entries = dict(best=dict(step=self.step, val_loss=self.val_loss))
        if self.step != step:
            entries["best_model"] = self.weights
        return entries

    def restore(self, checkpoint):
        """From a checkpoint being resumed; one saved before best weights were kept has only
        its last weights, the best known then."""
        last = dict(step=checkpoint["step"], val_loss=checkpoint["val_loss"])
        record = checkpoint.get("best", last)
        weights = checkpoint.get("best_model", checkpoint["model"])
        self.step = record["step"]
        self.val_loss = record["val_loss"] if math.isfinite(record["val_loss"]) else math.inf
        self.weights = {name: w.to("cpu", copy=True) for name, w in weights.items()}


def evaluate(model, corpus, val_data, config, run):
    """(train loss estimated on eval_iters random batches, val loss: exact over the whole split
    when it is small, else over a fixed subset: dataset.val_set decides)."""
    model.eval()
    with torch.no_grad(), autocast(run.device, run.dtype):
        train_losses = [model(*get_batch(corpus, config.batch_size, config.block_size,
                                         run.device))[1]
                        for _ in range(config.eval_iters)]
        train_loss = torch.stack(train_losses).mean().item()
        if val_data.exact:
            val_loss = exact_loss(model, val_data.tokens, config.block_size, config.batch_size)
        else:
            val_loss = windows_loss(model, val_data.tokens, config.batch_size)
    model.train()
    return train_loss, val_loss


def eval_sample(model, tokenizer, config, run):
    """--eval_sample_tokens: a short sample to watch the text go from noise to Shakespeare.

    Drawn from its own generator, seeded the same at every evaluation: the samples of a run
    differ only by what the model has learned in between, and the training's random stream
    (batches, dropout), and so --resume, is left exactly as it was.
    """
    generator = torch.Generator(run.device).manual_seed(config.seed)
    sample = sample_text(model, tokenizer, config.eval_sample_tokens, run.device, generator)
    model.train()
    return sample


def exact_loss(model, data, block_size, batch_size):
    """Mean loss over every next-token prediction in data, cut into consecutive blocks.

    Each token is predicted exactly once (from the tokens before it in its block), so this is
    the split's true loss rather than a noisy estimate from random batches.
    """
    n_blocks = (len(data) - 1) // block_size
    batch_size = eval_rows(model, batch_size, block_size)
    inputs = data[:n_blocks * block_size].view(n_blocks, block_size)
    targets = data[1:n_blocks * block_size + 1].view(n_blocks, block_size)
    pieces = [(inputs[i:i + batch_size], targets[i:i + batch_size])
              for i in range(0, n_blocks, batch_size)]
    rest = data[n_blocks * block_size:]
    if len(rest) > 1:  # the last partial block
        pieces.append((rest[None, :-1], rest[None, 1:]))
    return mean_loss(model, pieces)


def windows_loss(model, windows, batch_size):
    """Mean loss over every prediction in windows (N, T + 1): each row's last T tokens are
    predicted from the ones before them, as in exact_loss's blocks."""
    batch_size = eval_rows(model, batch_size, windows.shape[1] - 1)
    return mean_loss(model, [(rows[:, :-1], rows[:, 1:]) for rows in windows.split(batch_size)])


def eval_rows(model, batch_size, block_size):
    """Sequences per forward pass when evaluating. No gradients are kept, so more than in
    training: 16,384 tokens, fewer with a big vocabulary, whose logits (tokens x vocab) would
    take most of the memory: at most 2**24 of them (64 MB in float32)."""
    tokens = min(16384, 2**24 // model.lm_head.out_features)
    return max(batch_size, tokens // block_size)


def mean_loss(model, pieces):
    """The mean loss over every target in the (x, y) pieces, whatever their sizes."""
    total_loss, n_tokens = 0.0, 0
    for x, y in pieces:
        _, loss = model(x, y)
        total_loss += loss.item() * y.numel()
        n_tokens += y.numel()
    return total_loss / n_tokens


def learning_rate_at(step, config):
    """Linear warmup to learning_rate, then cosine decay to min_lr, then flat at min_lr."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / config.warmup_iters
    if step >= decay_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # goes 1 -> 0
    return config.min_lr + cosine * (config.learning_rate - config.min_lr)


def set_learning_rate(optimizer, step, config):
    """Set every parameter group's rate for this step, and return it."""
    lr = learning_rate_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(train_model, optimizer, scaler, micro_batches, config, run):
    """One optimizer step on the summed gradients of the micro-batches; returns the last loss.

    The gradients stay in .grad until the next step (they are cleared first, not last).
    """
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(micro_batches):
        with sync_gradients_only_if(i == len(micro_batches) - 1, train_model):
            with autocast(run.device, run.dtype):  # forward in bf16/fp16 where chosen
                _, loss = train_model(x, y)
            # Gradients add up over micro-batches; dividing makes the sum their mean.
            # (scaler.scale multiplies by the loss scale in float16, else does nothing.)
            scaler.scale(loss / len(micro_batches)).backward()
    if config.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), config.grad_clip)
    scaler.step(optimizer)  # optimizer.step(), skipped if float16 gradients overflowed
    scaler.update()
    return loss  # the last micro-batch's, for the progress bar


def sync_gradients_only_if(is_last, train_model):
    """Under DDP, all-reduce the gradients once, after the last micro-batch, not after each;
    elsewhere a context that does nothing."""
    if is_last or not hasattr(train_model, "no_sync"):
        return contextlib.nullcontext()
    return train_model.no_sync()


class StepTimer:
    """Tokens per second over the steps since the last restart (evaluations excluded)."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.start, self.steps = time.time(), 0

    def count_step(self):
        self.steps += 1

    def steps_per_sec(self):
        return self.steps / (time.time() - self.start)


def report_progress(step, loss, lr, timer, model, config, run, progress, record):
    """Loss, learning rate, tokens/s (and MFU on known GPUs) on the progress bar and in the log."""
    if not math.isfinite(loss):
        stop_on_nan(progress, config.checkpoint)
    tokens_per_sec = timer.steps_per_sec() * tokens_per_step(config, run)
    stats = f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s"
    peak_flops = gpu_peak_flops(run)
    if peak_flops:
        stats += f", MFU {100 * flops_per_token(model, config) * tokens_per_sec / peak_flops:.1f}%"
    progress.set_postfix_str(stats)
    record(dict(step=step, loss=loss, lr=lr, tokens_per_sec=tokens_per_sec,
                elapsed=time.time() - START_TIME))


def finish(step, stopping, val_loss, best, model, tokenizer, config, run, record):
    """Say where the checkpoint is and which weights in it are the best, print a sample, and
    let every rank leave together."""
    if run.is_master:
        if stopping and step == 0:
            print("Stopped before the first step; no checkpoint saved")
        elif stopping:
            print(f"Stopped at step {step}; checkpoint saved to {config.checkpoint}")
        else:
            print(f"Saved checkpoint to {config.checkpoint} (val loss {val_loss:.4f})")
        if step > 0 and best.step == step:
            print(f"Best: val loss {best.val_loss:.4f} at step {best.step}, the last step")
        elif step > 0:
            print(f"Best: val loss {best.val_loss:.4f} at step {best.step}, kept in the checkpoint "
                  f"too: generate.py samples it (--weights last: step {step}'s)")
        if config.sample_tokens > 0:
            sample = sample_text(model, tokenizer, config.sample_tokens, run.device)
            print("\nSample:\n" + sample)
            record(dict(step=step, sample=sample))
    if torch.distributed.is_initialized():  # under torchrun, even with one process
        torch.distributed.barrier()  # let rank 0 finish saving before any rank tears down
        torch.distributed.destroy_process_group()


def sample_text(model, tokenizer, n_tokens, device, generator=None):
    model.eval()
    idx = torch.tensor([start_tokens(tokenizer)], dtype=torch.long, device=device)
    tokens = model.generate(idx, n_tokens, temperature=0.8, top_k=200, generator=generator)
    return tokenizer.decode(tokens[0].tolist())


def catch_ctrl_c(run):
    """First Ctrl-C: finish the current step, save, stop. A second one, a second or more later,
    stops at once (torchrun passes the terminal's Ctrl-C on to its processes, which so get it
    twice). SIGTERM, which a cluster's scheduler or `timeout` sends some time before killing,
    does the same. Returns whether to stop, asked once a step; under torchrun the same on every
    rank."""
    first_at = []

    def on_signal(signum, frame):
        if first_at and time.time() - first_at[0] > 1:
            raise KeyboardInterrupt
        if not first_at:
            first_at.append(time.time())
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            if run.is_master:
                print(f"\n{name}: stopping after this step and saving ({name} again to quit now)",
                      flush=True)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return on_any_rank(lambda: bool(first_at), run)


def stop_on_nan(progress, checkpoint_path):
    progress.close()
    raise UsageError(f"the loss became NaN or infinite; {checkpoint_on_disk(checkpoint_path)}. "
                     f"Lower --learning_rate, keep --grad_clip on, or try --dtype float32")


def save_or_stop(checkpoint, path, progress):
    """Save atomically; if that fails (a full or read-only disk), stop with one line naming
    the checkpoint still on disk, which the failed save left as it was (checkpoint.atomic_write)."""
    try:
        save_checkpoint(checkpoint, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        progress.close()
        raise UsageError(f"could not save the checkpoint to {path} ({write_failure(err)}); "
                         f"{checkpoint_on_disk(path)}. Free some disk space, or pass a "
                         f"--checkpoint in another folder") from None


def checkpoint_on_disk(path):
    """What a stopped run leaves behind, in words: the step of the checkpoint at path, if any."""
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:  # no file there, or not a checkpoint
        return f"no checkpoint was saved to {path}"
    return f"the last good checkpoint, {path}, is kept (step {step})"


# ---------------------------------------------------------------------------------------------
# Speed and size figures: tokens per step, FLOPs per token, MFU, parameters

# Dense peak FLOP/s of known GPUs for MFU: (bf16/fp16 tensor cores, float32: TF32 tensor cores
# where the GPU has them (A100 and newer), plain float32 on the V100 and T4).
GPU_PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12), "H100": (989e12, 495e12), "H200": (989e12, 495e12),
    "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "L40": (181e12, 90.5e12),
    "L4": (121e12, 60e12), "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12), "V100": (125e12, 16e12), "T4": (65e12, 8e12),
}


def tokens_per_step(config, run):
    return config.batch_size * config.block_size * config.gradient_accumulation_steps \
        * run.world_size


def flops_per_token(model, config):
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4), plus attention's
    scores and weighted sums, which depend on the context length (PaLM's appendix B)."""
    return 6 * model.num_params() + 12 * config.n_layer * config.n_embd * config.block_size


def param_count(vocab_size, n_embd, n_layer, block_size):
    """GPTModel's parameter count, without building it: the two embeddings; per block
    12 C^2 + 10 C (Q, K, V 3 C^2; projection C^2 + C; MLP 8 C^2 + 5 C; two LayerNorms 4 C);
    the final LayerNorm 2 C; the head C V + V."""
    C = n_embd
    return ((vocab_size + block_size) * C + n_layer * (12 * C * C + 10 * C) + 2 * C
            + C * vocab_size + vocab_size)


def gpu_peak_flops(run):
    """The peak FLOP/s of all the run's GPUs together (one per process), which the run's
    tokens/s (every process's tokens) is measured against; None for GPUs not in the table.
    Names match as whole words: "L4" is not the L40 of "NVIDIA L40S"."""
    if run.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(run.device)
    for gpu, (half_peak, float32_peak) in GPU_PEAK_FLOPS.items():
        if re.search(rf"\b{gpu}\b", name):
            return run.world_size * (float32_peak if run.dtype == "float32" else half_peak)
    return None


# ---------------------------------------------------------------------------------------------
# Several GPUs (or CPU processes): PyTorch DDP, launched by torchrun

def start_distributed(device):
    """(rank, local_rank, world_size, device): torchrun sets RANK and friends, and each process
    takes the GPU numbered by its LOCAL_RANK. Without torchrun: (0, 0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "mps":  # gloo, torchrun's only backend on a Mac, moves CPU and CUDA tensors
        raise UsageError("torchrun cannot train on an Apple GPU (MPS): run python train.py, "
                         "one process, or pass --device cpu for several CPU processes")
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device} under torchrun would put every process on one "
                         f"GPU; pass --device cuda (each process takes GPU LOCAL_RANK; choose "
                         f"the GPUs with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and local_rank >= torch.cuda.device_count():
        raise UsageError(f"torchrun started more processes than the {torch.cuda.device_count()} "
                         f"GPU(s) here; pass --nproc_per_node {torch.cuda.device_count()}")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    torch.distributed.init_process_group(backend="nccl" if device != "cpu" else "gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world_size > 1:
        stop_with_rank_0(rank, world_size)
    return rank, local_rank, world_size, device


def stop_with_rank_0(rank, world_size):
    """Only rank 0 evaluates and saves, so only it can meet a NaN loss or a failed save, and
    stop with its one-line error (exit code 2). The other ranks may then be waiting for it
    inside a collective that never returns, until torchrun kills them (with a traceback).
    Instead they listen, on a thread, at torchrun's key-value store: rank 0, leaving while the
    process group is still open (finish() closes it), posts "stop" there and waits a few
    seconds for them; they leave at once, quietly, with exit code 2. (torchrun then reports
    the failed run in its own words, and exits with 1.)"""
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    if rank == 0:
        def tell_the_others():
            if torch.distributed.is_initialized():
                store.set("mini-gpt/stop", "1")
                with contextlib.suppress(Exception):  # a rank already gone cannot answer
                    store.wait([f"mini-gpt/stopped/{r}" for r in range(1, world_size)],
                               datetime.timedelta(seconds=10))

        atexit.register(tell_the_others)
        return

    def listen():
        while torch.distributed.is_initialized():
            if store.check(["mini-gpt/stop"]):
                store.set(f"mini-gpt/stopped/{rank}", "1")
                os._exit(2)
            time.sleep(0.5)

    threading.Thread(target=listen, daemon=True).start()


def on_any_rank(flag, run):
    """flag() asked on every rank, as a function whose answer is the same on every rank: was
    flag() True on any rank at the call before? Every rank calls it once a step.

    Asking the others is a collective, and waiting for its answer would hold up every step
    (on GPUs: a sync). So each call sends this step's question without waiting (over gloo, CPU
    to CPU: the GPU never waits) and reads the answer to the one sent a step earlier, long
    arrived by now. Ctrl-C so stops every rank at the same step, one step later than alone.
    """
    if run.world_size == 1:
        return flag
    group = torch.distributed.new_group(backend="gloo")  # its own: DDP's traffic is apart
    sent = []  # (the all-reduce under way, the tensor it fills)

    def any_rank_said_yes():
        answer = False
        if sent:
            all_reduce, flags = sent.pop()
            all_reduce.wait()
            answer = flags.item() > 0
        flags = torch.tensor(float(flag()))
        sent.append((torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX,
                                                  group=group, async_op=True), flags))
        return answer

    return any_rank_said_yes


def gather_from_all_ranks(value, run):
    """[value of rank 0, value of rank 1, ...]; every rank must call it at the same step."""
    if run.world_size == 1:
        return [value]
    values = [None] * run.world_size
    torch.distributed.all_gather_object(values, value)
    return values


# ---------------------------------------------------------------------------------------------
# Exact resume: weights, optimizer, step and the random state that picks batches and dropout

def resume(config, model, optimizer, corpus, run, best):
    """Load the checkpoint named by --resume into model and optimizer, restore this rank's
    random state and the best evaluation so far: (step to go on from, its val loss)."""
    path = config.checkpoint if config.resume == "true" else config.resume
    checkpoint = load_checkpoint(path, run.device)
    check_same_tokens(checkpoint, corpus, config, path)
    saved, wanted = checkpoint["model_args"], asdict(model.config)
    changed = ", ".join(f"{k} {saved[k]} -> {wanted[k]}" for k in MODEL_SHAPE if saved[k] != wanted[k])
    if changed:
        raise UsageError(f"cannot resume {path}: the model shape differs ({changed}); "
                         f"drop those flags or start a fresh run")
    if not ({"optimizer", "rng", "step", "config", "val_loss"} <= checkpoint.keys()
            and isinstance(checkpoint["config"], dict) and type(checkpoint["step"]) is int
            and checkpoint["step"] >= 0 and isinstance(checkpoint["val_loss"], float)
            and isinstance(checkpoint["rng"], list) and checkpoint["rng"]):
        raise UsageError(f"cannot resume {path}: it has no optimizer or random state, or a "
                         f"damaged one; start a fresh run")
    saved_optimizer = checkpoint["config"].get("optimizer", "adamw")
    if saved_optimizer != config.optimizer:
        raise UsageError(f"cannot resume {path}: it was trained with --optimizer "
                         f"{saved_optimizer}; pass --optimizer {saved_optimizer}")
    step = checkpoint["step"]
    if step >= config.max_iters:  # nothing to train, nothing to save
        raise UsageError(f"{path} is at step {step}, {'past' if step > config.max_iters else 'at'} "
                         f"--max_iters {config.max_iters}; pass a larger --max_iters to train on")
    model.load_state_dict(checkpoint["model"])
    best.restore(checkpoint)
    rng_states = checkpoint["rng"]  # one per rank of the run that saved it
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if len(rng_states) == run.world_size:
            restored = restore_rng(rng_states[run.rank])
        elif run.rank == 0:  # another number of processes: only rank 0 can go on where it was
            restored = restore_rng(rng_states[0])
        else:
            torch.manual_seed(torch.initial_seed() + step)  # seeded per rank in set_up
            restored = True
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise UsageError(f"cannot resume {path}: its optimizer or random state is damaged "
                         f"({type(err).__name__}: {str(err)[:80]}); start a fresh run") from None
    if not restored:
        print(f"Note: {path} holds no random state for this GPU (saved on another machine): "
              f"dropout goes on from a fresh one, so the run is not exactly the one it resumes")
    if run.is_master:
        print(f"Resuming from step {step} of {path}")
    return step, checkpoint["val_loss"]


def check_same_tokens(checkpoint, corpus, config, path):
    """Refuse to go on with other tokens than the checkpoint learned from, naming the cause:
    another --tokenizer or --vocab_size, or another text (its sha256, recorded at each save:
    the same characters in another text would give the same vocabulary)."""
    saved = checkpoint["tokenizer"]
    if saved.get("kind") != config.tokenizer:
        raise UsageError(f"cannot resume {path}: it was trained with --tokenizer "
                         f"{saved.get('kind')}; pass --tokenizer {saved.get('kind')}")
    saved_vocab = checkpoint.get("config", {}).get("vocab_size") if isinstance(
        checkpoint.get("config"), dict) else None
    if config.tokenizer == "bpe" and saved_vocab not in (None, config.vocab_size):
        raise UsageError(f"cannot resume {path}: it was trained with --vocab_size "
                         f"{saved_vocab}; pass --vocab_size {saved_vocab}")
    if checkpoint.get("text_sha256", corpus.sha256) != corpus.sha256 or \
            saved != corpus.tokenizer.to_dict():
        raise UsageError(f"cannot resume {path}: it was trained on another text than --data "
                         f"{config.data}; pass the --data it was trained on, or start a fresh "
                         f"run")


def rng_state():
    """Every random state that decides what comes next, as tensors and plain values: Python's,
    NumPy's, the CPU's, and the GPU's this process draws on (CUDA's current one, or MPS)."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    gpu = (("cuda", torch.cuda.get_rng_state()) if torch.cuda.is_initialized() else
           ("mps", torch.mps.get_rng_state()) if torch.backends.mps.is_available() else None)
    return dict(python=random.getstate(),
                numpy=(name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                       cached_gauss),
                torch=torch.get_rng_state(), gpu=gpu)


def restore_rng(state):
    """Put back rng_state()'s states; returns False where the GPU's could not be: saved on
    another kind of device, or (an older checkpoint's list, one per GPU of the machine that
    saved it) for a GPU this machine lacks."""
    # .cpu(): a checkpoint resumed on a GPU is loaded onto it, but random states are CPU bytes.
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), position, has_gauss,
                         cached_gauss))
    torch.set_rng_state(state["torch"].cpu())
    gpu = state.get("gpu")
    if state.get("cuda"):  # the older list: this process's GPU is the current one
        index = torch.cuda.current_device() if torch.cuda.is_available() else len(state["cuda"])
        gpu = ("cuda", state["cuda"][index]) if index < len(state["cuda"]) else ("", None)
    if gpu is None:
        return True
    kind, gpu_state = gpu
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(gpu_state.cpu())
    elif kind == "mps" and torch.backends.mps.is_available():
        torch.mps.set_rng_state(gpu_state.cpu())
    else:
        return False
    return True


if __name__ == "__main__":
    run_main(main)
