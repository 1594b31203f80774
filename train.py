"""Train Mini-GPT on a text file, token by token (characters, or BPE with --tokenizer bpe).

    python train.py                      # the brief's model on data/input.txt (a GPU run)
    python train.py --preset cpu         # a small model that trains on a laptop CPU in ~30 s
    python train.py --max_iters 2000 --dropout 0.1   # any config.py field as --name value

The loop: load data, build model, then repeat {sample a batch, forward, backward, step},
evaluating and saving every eval_interval steps, and print a sample at the end.
"""

import time

START_TIME = time.time()  # "elapsed" in the eval lines counts from launch, imports included

import contextlib
import importlib.util
import json
import math
import os
import random
import signal
import sys
from dataclasses import asdict

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import parse_config
from model import GPTModel
from utils import (UsageError, autocast, bits_per_char, get_batch, keep_freed_memory,
                   load_checkpoint, pick_device, pick_dtype, read_text, run_main, save_checkpoint,
                   start_tokens, tokenize, use_compile)

# Dense peak FLOP/s of known GPUs for MFU: (bf16/fp16 tensor cores, float32 via TF32).
GPU_PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12), "H100": (989e12, 495e12), "H200": (989e12, 495e12),
    "A100": (312e12, 156e12), "L4": (121e12, 60e12), "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12), "V100": (125e12, 16e12), "T4": (65e12, 8e12),
}


def main(argv=None):
    config, _ = parse_config(argv)
    rank, local_rank, world_size = start_distributed(config.device)  # (0, 0, 1) without torchrun
    is_master = rank == 0  # only rank 0 prints, evaluates and saves
    log = print if is_master else (lambda *args, **kwargs: None)
    torch.manual_seed(config.seed + rank)  # each rank draws its own batches and dropout masks
    device = pick_device(config.device)
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dtype = pick_dtype(config.dtype, device)
    if device == "cpu":
        keep_freed_memory()  # reuse freed activations' memory: ~20% faster steps (see utils.py)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    log("Loading data...")
    text = read_text(config.data)
    tokenizer, train_data, val_data = load_tokens(text, config, device)
    val_chars = len(tokenizer.decode(val_data[1:].tolist()))  # what the val predictions cover
    log(f"Dataset length: {len(text)} characters")
    log(f"Vocabulary size: {tokenizer.vocab_size}")

    model_args = dict(vocab_size=tokenizer.vocab_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head,
                      block_size=config.block_size, dropout=config.dropout,
                      flash=use_flash(config.flash, device))
    model = GPTModel(**model_args).to(device)
    n_params = model.num_params()
    log(f"Model parameters: {n_params:,}")
    tokens_per_step = (config.batch_size * config.block_size * config.gradient_accumulation_steps
                       * world_size)
    flops_per_token = 6 * n_params + 12 * config.n_layer * config.n_embd * config.block_size
    if device == "cpu" and flops_per_token * tokens_per_step * config.max_iters > 1e15:
        log("Note: this is a GPU-sized run; on a CPU it will take hours. "
            "For a model that trains on a CPU in half a minute, use --preset cpu.")
    optimizers = make_optimizers(model, config)
    start_step, val_loss = 0, float("nan")
    if config.resume:
        resume_path = config.checkpoint if config.resume == "true" else config.resume
        start_step, val_loss = resume(resume_path, model, optimizers, model_args, tokenizer,
                                      device, rank, world_size)
        if start_step > config.max_iters:
            raise UsageError(f"{resume_path} is at step {start_step}, past --max_iters "
                             f"{config.max_iters}; pass a larger --max_iters to train on")
        log(f"Resuming from step {start_step} of {resume_path}")
    train_model = maybe_compile(model, config.compile, device)
    if world_size > 1:  # DDP: averages the gradients of all ranks during backward
        train_model = DistributedDataParallel(
            train_model, device_ids=[local_rank] if device.startswith("cuda") else None)
    # float16 needs loss scaling so small gradients do not underflow; bf16 has float32's range.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=(dtype == "float16"))
    peak_flops = gpu_peak_flops(device, dtype)
    record = metrics_recorder(config, resumed=bool(config.resume)) if is_master else None

    stop_requested = catch_ctrl_c()
    log(f"\nStarting training for {config.max_iters} iterations...")
    progress = tqdm(total=config.max_iters, initial=start_step, unit="step", dynamic_ncols=True,
                    file=sys.stdout, disable=not is_master)
    interval_start, interval_steps = time.time(), 0
    for step in range(start_step, config.max_iters + 1):
        # Under torchrun all ranks must stop at the same step: stop if any rank got Ctrl-C.
        stopping = on_any_rank(stop_requested(), world_size, device)
        is_eval_step = step % config.eval_interval == 0 or step == config.max_iters or stopping
        just_resumed = bool(config.resume) and step == start_step  # evaluated before that save
        if is_eval_step and not just_resumed:
            if is_master:
                train_loss, val_loss = evaluate(model, train_data, val_data, config, device,
                                                dtype)
                val_bpc = bits_per_char(val_loss, len(val_data) - 1, val_chars)
                elapsed = time.time() - START_TIME
                progress.write(f"Step {step}: train loss {train_loss:.4f}, val loss "
                               f"{val_loss:.4f}, val bpc {val_bpc:.4f} ({elapsed:.1f}s)")
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    stop_on_nan(progress, config.checkpoint)
                record(dict(step=step, train_loss=train_loss, val_loss=val_loss,
                            val_bpc=val_bpc, elapsed=elapsed),
                       draw_curve=step == config.max_iters or stopping)
            # Every rank's random state, taken after rank 0's evaluation (which draws batches),
            # so that --resume continues every rank exactly.
            rng_states = gather_from_all_ranks(rng_state(), world_size)
            if is_master and step > 0:
                save_checkpoint(dict(model=model.state_dict(), model_args=model_args,
                                     tokenizer=tokenizer.to_dict(), config=asdict(config),
                                     optimizer=[o.state_dict() for o in optimizers], step=step,
                                     val_loss=val_loss, val_bpc=val_bpc, rng=rng_states),
                                config.checkpoint)
            interval_start, interval_steps = time.time(), 0  # keep eval time out of tok/s
        if step == config.max_iters or stopping:
            break

        lr = learning_rate_at(step, config)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]  # Muon's peak is muon_lr, not learning_rate
        micro_batches = [get_batch(train_data, config.batch_size, config.block_size)
                         for _ in range(config.gradient_accumulation_steps)]
        loss = train_step(model, train_model, optimizers, scaler, micro_batches, config, device,
                          dtype)
        progress.update(1)
        interval_steps += 1

        if is_master and (step + 1) % config.log_interval == 0:  # .item() waits for the GPU
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                stop_on_nan(progress, config.checkpoint)
            tokens_per_sec = interval_steps * tokens_per_step / (time.time() - interval_start)
            stats = f"loss {loss_value:.4f}, lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s"
            if peak_flops:
                stats += f", MFU {100 * flops_per_token * tokens_per_sec / peak_flops:.1f}%"
            progress.set_postfix_str(stats)
            record(dict(step=step + 1, loss=loss_value, lr=lr, tokens_per_sec=tokens_per_sec,
                        elapsed=time.time() - START_TIME))
    progress.close()

    if is_master:
        if stopping and step == 0:
            print("Stopped before the first step; no checkpoint saved")
        elif stopping:
            print(f"Stopped at step {step}; checkpoint saved to {config.checkpoint}")
        else:
            print(f"Saved checkpoint to {config.checkpoint} (val loss {val_loss:.4f})")
        if config.sample_tokens > 0:
            sample = sample_text(model, tokenizer, config.sample_tokens, device)
            print("\nSample:\n" + sample)
            record(dict(step=step, sample=sample))
    if world_size > 1:
        torch.distributed.barrier()  # let rank 0 finish saving before any rank tears down
        torch.distributed.destroy_process_group()


def load_tokens(text, config, device):
    """(tokenizer, train tokens, val tokens): 1-D tensors on the device, sampled there."""
    tokenizer, train_ids, val_ids = tokenize(text, config.tokenizer, config.vocab_size,
                                             cache_dir=os.path.dirname(config.data))
    if len(train_ids) <= config.block_size or len(val_ids) < 2:
        raise UsageError(f"{config.data} has {len(text)} characters, too few for block_size "
                         f"{config.block_size}: need at least {math.ceil((config.block_size + 2) / 0.9)}; "
                         f"use a longer text or a smaller --block_size")
    return (tokenizer, torch.tensor(train_ids, dtype=torch.long, device=device),
            torch.tensor(val_ids, dtype=torch.long, device=device))


def train_step(model, train_model, optimizers, scaler, micro_batches, config, device, dtype):
    """One optimizer step on the summed gradients of the micro-batches; returns the last loss.

    The gradients stay in .grad until the next step (they are cleared first, not last).
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(micro_batches):
        # DDP: all-reduce the gradients once, after the last micro-batch, not after each.
        is_last = i == len(micro_batches) - 1
        no_sync = getattr(train_model, "no_sync", None)
        with (contextlib.nullcontext() if is_last or no_sync is None else no_sync()):
            with autocast(device, dtype):
                _, loss = train_model(x, y)
            # Gradients add up over micro-batches; dividing makes the sum their mean.
            scaler.scale(loss / len(micro_batches)).backward()
    if config.grad_clip > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    return loss


def evaluate(model, train_data, val_data, config, device, dtype):
    """(train loss estimated on eval_iters random batches, exact val loss over the whole split)."""
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        train_losses = [model(*get_batch(train_data, config.batch_size, config.block_size))[1]
                        for _ in range(config.eval_iters)]
        train_loss = torch.stack(train_losses).mean().item()
        val_loss = exact_loss(model, val_data, config.block_size, config.batch_size)
    model.train()
    return train_loss, val_loss


def exact_loss(model, data, block_size, batch_size):
    """Mean loss over every next-token prediction in data, cut into consecutive blocks.

    Each token is predicted exactly once (from the tokens before it in its block), so this is
    the split's true loss rather than a noisy estimate from random batches.
    """
    n_blocks = (len(data) - 1) // block_size
    batch_size = max(batch_size, 16384 // block_size)  # no gradients to keep: bigger batches
    inputs = data[:n_blocks * block_size].view(n_blocks, block_size)
    targets = data[1:n_blocks * block_size + 1].view(n_blocks, block_size)
    pieces = [(inputs[i:i + batch_size], targets[i:i + batch_size])
              for i in range(0, n_blocks, batch_size)]
    rest = data[n_blocks * block_size:]
    if len(rest) > 1:  # the last partial block
        pieces.append((rest[None, :-1], rest[None, 1:]))
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


def make_optimizers(model, config, fused=True):
    """[AdamW], or with --optimizer muon [Muon for the blocks' weight matrices, AdamW for the
    rest]. AdamW decays weight matrices only (biases and LayerNorm gains are not shrunk).

    Muon (momentum, then each matrix's update orthogonalised by a few Newton-Schulz steps, so
    that every direction of the matrix moves about as much) learns far more per step in short
    runs: the CPU preset reaches val 1.88 in about 200 steps instead of 450. It is made for the
    hidden matrices only; embeddings, the output head and vectors stay with AdamW.
    """
    named = list(model.named_parameters())
    for_muon = {name for name, p in named
                if config.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks.")}
    rest = [p for name, p in named if name not in for_muon]
    # The loop sets each group's lr to the schedule's value times its lr_scale.
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay,
               "lr_scale": 1.0},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    optimizers = [adamw(groups, config, fused)]
    if for_muon:
        hidden = [p for name, p in named if name in for_muon]
        optimizers.append(torch.optim.Muon(
            [{"params": hidden, "lr_scale": config.muon_lr / config.learning_rate}],
            lr=config.muon_lr, weight_decay=config.weight_decay))
    return optimizers


def adamw(groups, config, fused):
    betas = (config.beta1, config.beta2)
    if fused:
        try:
            # One fused kernel for the whole update instead of several per parameter.
            return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, fused=True)
        except (RuntimeError, TypeError):  # a device or PyTorch version without fused AdamW
            pass
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas)


def use_flash(setting, device):
    """SDPA or the written-out attention. On CPUs the written-out one trains faster (measured in
    bf16 on a 2-core EPYC: 1.4x for the CPU preset, 1.8x for the default model with dropout,
    whose SDPA falls back to a slower path); on GPUs SDPA's fused kernels win."""
    if setting == "auto":
        return device != "cpu"
    return setting == "true"


def maybe_compile(model, setting, device):
    return torch.compile(model) if use_compile(setting, device, "running") else model


def gpu_peak_flops(device, dtype):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for gpu, (half_peak, float32_peak) in GPU_PEAK_FLOPS.items():
        if gpu in name:
            return float32_peak if dtype == "float32" else half_peak
    return None


def catch_ctrl_c():
    """First Ctrl-C: finish the current step, save, stop. A second one stops at once."""
    requested = []

    def on_sigint(signum, frame):
        requested.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: stopping after this step and saving (Ctrl-C again to quit now)",
              flush=True)

    signal.signal(signal.SIGINT, on_sigint)
    return lambda: bool(requested)


def stop_on_nan(progress, checkpoint_path):
    progress.close()
    kept = f"the last good checkpoint is {checkpoint_path}" if os.path.exists(checkpoint_path) \
        else "no checkpoint was written"
    raise UsageError(f"the loss became NaN or infinite; {kept}. Lower --learning_rate, keep "
                     f"--grad_clip on, or try --dtype float32")


def sample_text(model, tokenizer, n_tokens, device):
    model.eval()
    idx = torch.tensor([start_tokens(tokenizer)], dtype=torch.long, device=device)
    return tokenizer.decode(model.generate(idx, n_tokens, temperature=0.8, top_k=200)[0].tolist())


# ---------------------------------------------------------------------------------------------
# Several GPUs (or CPU processes): PyTorch DDP, launched by torchrun

def start_distributed(device):
    """(rank, local_rank, world_size). torchrun sets RANK and friends; without it: (0, 0, 1)."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    backend = "gloo" if device in ("cpu", "mps") or not torch.cuda.is_available() else "nccl"
    torch.distributed.init_process_group(backend=backend)
    return (torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", 0)),
            torch.distributed.get_world_size())


# ---------------------------------------------------------------------------------------------
# Exact resume: weights, optimizer, step and the random state that picks batches and dropout

def resume(path, model, optimizers, model_args, tokenizer, device, rank=0, world_size=1):
    """Load a checkpoint into model and optimizers, and restore this rank's random state:
    (step, val loss)."""
    checkpoint = load_checkpoint(path, device)
    shape = ("vocab_size", "n_embd", "n_layer", "n_head", "block_size")
    saved_shape = {k: checkpoint["model_args"].get(k) for k in shape}
    wanted_shape = {k: model_args[k] for k in shape}
    if checkpoint["tokenizer"] != tokenizer.to_dict():
        raise UsageError(f"cannot resume {path}: it was trained on text with another vocabulary; "
                         f"pass the same --data it was trained on")
    if saved_shape != wanted_shape:
        changed = ", ".join(f"{k} {saved_shape[k]} -> {wanted_shape[k]}" for k in shape
                            if saved_shape[k] != wanted_shape[k])
        raise UsageError(f"cannot resume {path}: the model shape differs ({changed}); "
                         f"drop those flags or start a fresh run")
    if "optimizer" not in checkpoint or "rng" not in checkpoint:
        raise UsageError(f"cannot resume {path}: it has no optimizer or random state")
    model.load_state_dict(checkpoint["model"])
    saved_optimizers = checkpoint["optimizer"]
    if isinstance(saved_optimizers, dict):  # saved before --optimizer muon: AdamW alone
        saved_optimizers = [{**saved_optimizers, "param_groups": [
            {"lr_scale": 1.0, **group} for group in saved_optimizers["param_groups"]]}]
    if len(saved_optimizers) != len(optimizers):
        saved = checkpoint["config"].get("optimizer", "adamw")
        raise UsageError(f"cannot resume {path}: it was trained with --optimizer {saved}; "
                         f"pass --optimizer {saved}")
    for optimizer, state in zip(optimizers, saved_optimizers):
        optimizer.load_state_dict(state)
    rng_states = checkpoint["rng"]  # one per rank of the run that saved it
    if isinstance(rng_states, dict):  # saved before there was one per rank: rank 0's
        rng_states = [rng_states]
    if len(rng_states) == world_size:
        restore_rng(rng_states[rank])
    elif rank == 0:  # another number of processes: only rank 0 can go on where it was
        restore_rng(rng_states[0])
    else:
        torch.manual_seed(torch.initial_seed() + checkpoint["step"])  # seeded per rank in main
    return checkpoint["step"], checkpoint["val_loss"]


def on_any_rank(flag, world_size, device):
    """True on every rank if flag is True on any rank; every rank must call it at the same step."""
    if world_size == 1:
        return flag
    flag = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() > 0


def gather_from_all_ranks(value, world_size):
    """[value of rank 0, value of rank 1, ...]; every rank must call it at the same step."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    torch.distributed.all_gather_object(values, value)
    return values


def rng_state():
    """Every random state that decides what comes next, as tensors and plain values."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return dict(python=random.getstate(),
                numpy=(name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                       cached_gauss),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def restore_rng(state):
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Experiment tracking: a JSONL log and a loss-curve PNG beside the checkpoint, and W&B on request

def metrics_recorder(config, resumed):
    """Return record(dict): appends to <checkpoint>.metrics.jsonl and logs to W&B with --wandb;
    record(dict, draw_curve=True) also draws <checkpoint>.loss.png (if matplotlib is installed).

    The curve is drawn once, after the last evaluation: drawing takes ~0.5 s, which at every
    evaluation would slow short runs measurably."""
    stem = os.path.splitext(config.checkpoint)[0]
    jsonl_path, png_path = f"{stem}.metrics.jsonl", f"{stem}.loss.png"
    if not resumed and os.path.exists(jsonl_path):
        os.remove(jsonl_path)  # a fresh run overwrites the checkpoint, so its log starts anew
    can_draw = importlib.util.find_spec("matplotlib") is not None  # imported only to draw
    if not can_draw:
        print("Note: matplotlib is not installed, so no loss-curve PNG (pip install matplotlib)")
    wandb_run = start_wandb(config) if config.wandb else None

    def record(metrics, draw_curve=False):
        with open(jsonl_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if wandb_run is not None:
            if "sample" in metrics:
                wandb_run.summary["sample"] = metrics["sample"]
                wandb_run.finish()
            else:
                wandb_run.log({k: v for k, v in metrics.items() if k != "step"},
                              step=metrics["step"])
        if can_draw and draw_curve:
            plot_losses(jsonl_path, png_path)

    return record


def start_wandb(config):
    try:
        import wandb  # optional extra, needed only for --wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb")
    return wandb.init(project=config.wandb_project, config=asdict(config))


def plot_losses(jsonl_path, png_path):
    import matplotlib
    matplotlib.use("Agg")  # draw to files; no window
    import matplotlib.pyplot as plt
    with open(jsonl_path) as f:
        rows = [json.loads(line) for line in f]
    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows if "loss" in r]
    axes.plot(steps, [r["loss"] for r in rows if "loss" in r], alpha=0.3, label="batch loss")
    evals = [r for r in rows if "val_loss" in r]
    axes.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train loss")
    axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    run_main(main)
