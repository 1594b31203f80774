"""What runs around train.py's loop: where this process runs (device, number format, its rank
under torchrun), the checks before any work, the progress bar and speed figures, Ctrl-C and the
other stop signals, and exact resume. None of it changes what is learned. A first read needs
only Run, start, set_up and what_runs, at the top; the rest can wait."""

import atexit
import contextlib
import datetime
import errno
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import speedups
import utils
from config import PRESETS, Config
from dataset import corpus_settings, find_sources, prepared_stem
from startup import STARTED_AT
from tracking import check_side_files, log_paths, metrics_recorder
from utils import UsageError

# ---------------------------------------------------------------------------------------------
# Where this process runs, checked before any work

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

    def log(self, *args, **kwargs):  # print, on rank 0 only: the other ranks train quietly
        if self.is_master:
            print(*args, **kwargs)


def start(config, preset):
    """Set up this process, refuse what cannot work before any work is done, say what runs."""
    run = set_up(config)
    check_model_fits(config, run)
    check_paths(config, run)
    run.log(what_runs(config, run, preset))
    return run


def set_up(config):
    """Pick the device, start DDP under torchrun, seed, pick the number format, CPU speed-ups."""
    device = utils.pick_device(config.device)
    rank, local_rank, world_size, device = start_distributed(device)  # (0, 0, 1, device) alone
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # the current GPU: whose random state rng_state saves
    torch.manual_seed(config.seed + rank)  # each rank draws its own batches and dropout masks
    dtype = utils.pick_dtype(config.dtype, device)  # --reference: float32
    if device == "mps" and dtype == "bfloat16" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UsageError("--dtype bfloat16 needs macOS 14 or newer on an Apple GPU; update "
                         "macOS, or pass --dtype float32")
    if device == "cpu" and not config.reference:
        speedups.keep_freed_memory()  # reuse freed activations' memory: no page faults
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) >= (8, 0):
        # TF32: float32 matmuls on the tensor cores of Ampere and newer GPUs (A100, RTX 30xx,
        # H100); older ones (T4, V100) have no TF32 and would ignore the switch anyway.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(device, dtype, rank, local_rank, world_size)


def what_runs(config, run, preset):
    """train.py's first lines: the number format, attention and optimizer that run, each with
    why (the flag that chose it, or the default's reason) and how to change it."""
    if config.reference:
        return "--reference: float32, written-out attention and AdamW: the code on the page"
    chip = "CPU" if run.device == "cpu" else "GPU"
    flash = utils.use_flash(config.flash, run.device)
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


def note_sizes(corpus, model, config, run, start_step=0):
    """The text's, vocabulary's and model's sizes; a warning where a CPU is given hours of work
    (the steps from start_step on)."""
    run.log(f"Dataset length: {corpus.n_chars} characters")
    run.log(f"Vocabulary size: {corpus.tokenizer.vocab_size}")
    run.log(f"Model parameters: {model.num_params():,}")
    steps = config.max_iters - start_step
    total_flops = flops_per_token(model, config) * tokens_per_step(config, run) * steps
    if run.device == "cpu" and total_flops > 1e15:
        run.log("Note: this is a GPU-sized run; on a CPU it will take hours. "
                "For a model that trains on a CPU in half a minute, use --preset cpu.")


def compiled_or_eager(model):
    """torch.compile(model); if compiling fails at its first call (a compiler that will not
    run, an unsupported GPU), a note says so and it runs eager."""
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


def check_model_fits(config, run):
    """Refuse a model too big for the device before allocating anything. A step needs at least
    weights, gradients and an optimizer moment (12 bytes a parameter), each block's (T, T) mask,
    the token ids, the activations backward keeps (the residual stream per block, the logits),
    at the fewest tokens there can be (the vocabulary is not known yet): 256 BPE, 1 char."""
    vocab_size = 256 if config.tokenizer == "bpe" else 1
    C, L, T, B = config.n_embd, config.n_layer, config.block_size, config.batch_size
    token_ids = 8 * config.gradient_accumulation_steps * B * (T + 1)  # a step's micro-batches
    n_bytes = (12 * param_count(vocab_size, C, L, T) + 4 * L * T * T + token_ids
               + 2 * B * T * L * C + 4 * B * T * vocab_size)
    utils.check_fits_in_memory(n_bytes, run.device, "training this model", "lower " + (
        "--gradient_accumulation_steps (each step makes all its micro-batches first)"
        if token_ids > n_bytes / 2 else "--n_embd, --n_layer, --block_size or --batch_size"))


def check_paths(config, run):
    """Before any work: the checkpoint to resume exists, and rank 0 can save the new one where
    no input, side file or other run's save is: saving can then fail only for lack of space."""
    path, resumed = config.checkpoint, resume_path(config)
    if resumed:
        utils.check_regular_file(resumed, "--resume", "pass the checkpoint file to go on from",
                                 f"--resume: no checkpoint at {resumed}; train one first, or "
                                 f"drop --resume")
    if not run.is_master:
        return
    inputs = {source: "a file of the --data folder" for source in find_sources(config.data)}
    inputs[config.data] = "the --data folder" if os.path.isdir(config.data) else "the --data file"
    stem = prepared_stem(config.data, corpus_settings(config))
    inputs.update({f"{stem}.tokens": "the token file", f"{stem}.tokens.json": "the token file"})
    if resumed and not checkpoint.same_file(resumed, path):  # else it is meant to be replaced
        inputs[resumed] = "the checkpoint to resume"
    metrics_log, loss_curve = log_paths(path)
    outputs = {path: "--checkpoint", f"{path}.lock": "its lock file",
               metrics_log: "its metrics log", loss_curve: "its loss curve"}
    checkpoint.check_outputs_spare_inputs(outputs, inputs, "pick another --checkpoint")
    for suffix in (".lock", ".tmp", ".metrics.jsonl", ".loss.png", ".tokens", ".tokens.json"):
        if path.endswith(suffix):  # it would take the side file of a run named without it
            raise UsageError(f"--checkpoint {path} ends in {suffix}, as a run's own side files "
                             f"do; pick another name, e.g. --checkpoint run.pt")
    checkpoint.check_output_path(path, "--checkpoint", "ckpt.pt", outputs)
    checkpoint.check_replaceable(path, "--checkpoint", "train.py", checkpoint.is_checkpoint)
    check_side_files(path)
    # Lock it, so that a second run saving to the same file at the same time is refused (the
    # lock goes when this run ends, however it ends; taking it removes the half-written files a
    # killed run left: checkpoint, log, picture).
    holder = utils.hold_lock(f"{path}.lock", [path, metrics_log, loss_curve])
    if holder:
        raise UsageError(f"another run ({holder}) is saving to --checkpoint {path}; wait for "
                         f"it to end, or pick another --checkpoint")


def resume_path(config):  # plain --resume goes on from --checkpoint
    return config.checkpoint if config.resume == "true" else config.resume


# ---------------------------------------------------------------------------------------------
# Progress, speed figures, stopping: Ctrl-C, NaN, a failed save

class Progress(tqdm):
    """The progress bar: every log_interval steps the loss, learning rate, tokens/s (and MFU on
    known GPUs); on rank 0, record(metrics) writes the metrics log (tracking.py)."""

    def __init__(self, config, run, model, start_step):
        self.config, self.run, self.model = config, run, model
        resumed = (resume_path(config), start_step) if config.resume else None
        self.record = metrics_recorder(config, resumed) if run.is_master else None
        run.log(f"\nStarting training for {config.max_iters} iterations..." if not start_step else
                f"\nStarting training from step {start_step} to {config.max_iters}...")
        super().__init__(total=config.max_iters, initial=start_step, unit="step",
                         dynamic_ncols=True, file=sys.stdout, disable=not run.is_master)
        self.restart_timer()

    def restart_timer(self):  # after each evaluation, to keep it out of tokens/s
        self.started, self.steps = time.time(), 0

    def step_done(self, step, loss, lr):
        """After the step numbered step (from 1): loss is the last micro-batch's, on the device."""
        self.update(1)
        self.steps += 1
        if not (self.run.is_master and step % self.config.log_interval == 0):
            return
        loss = loss.item()  # waits for a GPU to finish the step: only every log_interval steps
        if not math.isfinite(loss):
            stop_on_nan(self)
        tokens_per_sec = self.steps / (time.time() - self.started) \
            * tokens_per_step(self.config, self.run)
        mfu = model_flops_utilization(self.model, self.config, self.run, tokens_per_sec)
        self.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s"
                             + (f", MFU {100 * mfu:.1f}%" if mfu else ""))
        self.record(dict(step=step, loss=loss, lr=lr, tokens_per_sec=tokens_per_sec,
                         elapsed=time.time() - STARTED_AT))


STOP, STOP_UNSAVED = 1, 2  # catch_ctrl_c's answers but 0 (go on); the larger wins on any rank


def catch_ctrl_c(run):
    """First Ctrl-C or other stop signal (utils.STOP_SIGNALS: SIGTERM, SIGHUP, SIGXCPU): finish
    the step, save, stop; before this run's first step is done, stop and save nothing (a mistyped
    fresh run keeps the earlier run's checkpoint it names). Another, a second or more later,
    stops at once (torchrun passes on the terminal's Ctrl-C, so it comes twice). Output that
    fails stops the run the same way: a closed terminal makes writes fail before its SIGHUP
    comes, and `| tee` may be gone. Returns the question asked before each step, answered the
    same on every rank: 0, STOP or STOP_UNSAVED."""
    steps_begun, first_stop_at, answer_now = 0, None, 0

    def ask_to_stop(why, again=""):
        nonlocal first_stop_at, answer_now
        first_stop_at = time.time()
        unsaved = steps_begun <= 1  # this run's first step is not done yet
        answer_now = STOP_UNSAVED if unsaved else STOP
        then = "without saving: no step of this run is done yet" if unsaved else \
            "after this step and saving"
        run.log(f"\n{why}: stopping {then}{again}", flush=True)

    def on_signal(signum, frame):
        if first_stop_at is not None:  # another: quit now, unless it is the same Ctrl-C,
            if time.time() - first_stop_at > 1:  # passed on by torchrun within a second
                raise KeyboardInterrupt
            return
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        ask_to_stop(name, f" ({name} again to quit now)")
        if name == "SIGXCPU":  # past its soft CPU-time limit the kernel sends it every second:
            import resource  # lift that limit to the hard one, which kills (Unix only)
            resource.setrlimit(resource.RLIMIT_CPU, [resource.getrlimit(resource.RLIMIT_CPU)[1]] * 2)
        if name == "SIGHUP":  # its terminal is gone: what is left to write there goes nowhere
            for stream in sys.stdout, sys.stderr:
                utils.send_nowhere(stream, terminal_only=True)

    def on_failed_output():
        if first_stop_at is None:
            ask_to_stop("the output failed")

    def answer():
        nonlocal steps_begun
        steps_begun += 1
        return answer_now

    utils.on_stop_signals(on_signal)
    sys.stdout, sys.stderr = (OutputThatMayFail(stream, on_failed_output)
                              for stream in (sys.stdout, sys.stderr))
    return on_any_rank(answer, run)


class OutputThatMayFail:
    """sys.stdout or sys.stderr while training: a write that fails (a closed terminal: EIO; a
    reader gone: EPIPE) calls on_failure (stop and save) instead of ending the run unsaved, and
    what is left to write there goes nowhere, as it has nowhere to go."""

    def __init__(self, stream, on_failure):
        self.stream, self.on_failure, self.error = stream, on_failure, None

    def write(self, text):
        return self.guarded(self.stream.write, text) or len(text)

    def flush(self):
        self.guarded(self.stream.flush)

    def guarded(self, write, *text):
        try:
            return write(*text)
        except OSError as err:
            self.error = self.error or err
            utils.send_nowhere(self.stream)
            self.on_failure()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


def stop_on_nan(progress):
    stop(progress, "the loss became NaN or infinite",
         "Lower --learning_rate, keep --grad_clip on, or try --dtype float32")


def save_or_stop(state, path, progress):
    """Save atomically: a failed save (a full or read-only disk) leaves the file as it was."""
    try:
        checkpoint.save_checkpoint(state, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        fix = "Free some disk space" if checkpoint.out_of_room(err) else \
            f"Make {path} and its folder writable"
        stop(progress, f"could not save the checkpoint to {path} ({checkpoint.write_failure(err)})",
             f"{fix}, or pass a --checkpoint in another folder")


def stop(progress, problem, fix):
    """Close the bar; stop with one line: the problem, the checkpoint left on disk, the fix."""
    progress.close()
    path = progress.config.checkpoint
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
        left = f"the last good checkpoint, {path}, is kept (step {step})"
    except Exception:  # no file there, or not a checkpoint
        left = f"no checkpoint was saved to {path}"
    raise UsageError(f"{problem}; {left}. {fix}") from None


def finish(training, step, stopping):
    """Close the progress bar; say where the checkpoint is and which weights in it are best."""
    config, best = training.config, training.best
    training.progress.close()
    utils.quit_on_signals()  # saved: a signal during the sample need not wait for its end
    failed = [stream.error for stream in (sys.stdout, sys.stderr) if getattr(stream, "error", None)]
    if failed and not isinstance(failed[0], BrokenPipeError):  # (a pipe's reader had enough)
        raise UsageError(utils.cannot_write_output(failed[0]))  # a full disk: exit code 2
    if not training.run.is_master:
        return
    first = training.progress.initial  # the step this run started from: 0, or --resume's
    if stopping == STOP_UNSAVED or stopping and step == first:  # nothing trained to save
        resumed = resume_path(config)
        kept = f" ({resumed} is as it was: --resume {resumed} to go on)" if config.resume else \
            f" ({config.checkpoint} is as it was)" if os.path.exists(config.checkpoint) else ""
        print(f"Stopped: asked before this run's first step was done; no checkpoint saved{kept}")
        return
    if stopping:
        print(f"Stopped at step {step}; checkpoint saved to {config.checkpoint}")
    else:
        print(f"Saved checkpoint to {config.checkpoint} (val loss {training.val_loss:.4f})")
    if step > first:
        kept = "the last step" if best.step == step else \
            f"kept in the checkpoint too: generate.py samples it (--weights last: step {step}'s)"
        print(f"Best: val loss {best.val_loss:.4f} at step {best.step}, {kept}")


# Dense peak FLOP/s of known GPUs for MFU: (bf16/fp16 tensor cores, float32: TF32 tensor cores
# where the GPU has them (A100 and newer), plain float32 on the V100 and T4).
GPU_PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12), "H100": (989e12, 495e12), "H200": (989e12, 495e12),
    "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "L40": (181e12, 90.5e12),
    "L4": (121e12, 60e12), "RTX 4090": (165e12, 83e12), "RTX 3090": (71e12, 36e12),
    "V100": (125e12, 16e12), "T4": (65e12, 8e12)}


def tokens_per_step(config, run):
    return config.batch_size * config.block_size * config.gradient_accumulation_steps \
        * run.world_size


def flops_per_token(model, config):
    """6 per parameter (forward 2, backward 4), plus attention's scores and weighted sums, which
    depend on the context length (PaLM's appendix B)."""
    return 6 * model.num_params() + 12 * config.n_layer * config.n_embd * config.block_size


def param_count(vocab_size, n_embd, n_layer, block_size):
    """GPTModel's, without building it: the two embeddings; per block 12 C^2 + 10 C (Q, K, V
    3 C^2; projection C^2 + C; MLP 8 C^2 + 5 C; two LayerNorms 4 C); final LayerNorm; head."""
    C = n_embd
    return ((vocab_size + block_size) * C + n_layer * (12 * C * C + 10 * C) + 2 * C
            + C * vocab_size + vocab_size)


def model_flops_utilization(model, config, run, tokens_per_sec):
    """MFU: the fraction of the GPUs' peak FLOP/s the training uses; None if it is unknown."""
    peak_flops = gpu_peak_flops(run)
    return flops_per_token(model, config) * tokens_per_sec / peak_flops if peak_flops else None


def gpu_peak_flops(run):
    """The peak FLOP/s of all the run's GPUs (one per process), as tokens/s counts all of their
    tokens; None for GPUs not in the table. Whole words: "L4" is not the L40 of "NVIDIA L40S"."""
    name = torch.cuda.get_device_name(run.device) if run.device_type == "cuda" else ""
    for gpu, (half_peak, float32_peak) in GPU_PEAK_FLOPS.items():
        if re.search(rf"\b{gpu}\b", name):
            return run.world_size * (float32_peak if run.dtype == "float32" else half_peak)
    return None


# ---------------------------------------------------------------------------------------------
# Several GPUs (or CPU processes): PyTorch DDP, launched by torchrun

def start_distributed(device):
    """(rank, local_rank, world_size, device): torchrun sets RANK and friends; each process
    takes GPU LOCAL_RANK. Without torchrun: (0, 0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    problem = utils.torchrun_problem()  # before the process group, which would wait for ever
    if problem:
        raise UsageError(f"{problem}; unset RANK to train in one process, or start with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
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
    meet_the_others(backend="nccl" if device != "cpu" else "gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world_size > 1:
        stop_with_rank_0(rank, world_size)
    return rank, local_rank, world_size, device


def meet_the_others(backend):
    """Start the process group: every process meets at MASTER_ADDR:MASTER_PORT. Under torchrun,
    torchrun listens there and has met the others already; with the variables set by hand, rank
    0 listens there itself, so an address of another machine would be retried for 30 minutes and
    a port in use is torch's traceback: both are one line, before any wait."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # not torchrun
        family = socket.getaddrinfo(address, port)[0][0]  # IPv4 or IPv6
        try:
            socket.create_server((address, port), family=family).close()  # listen, as torch will
        except OSError as err:
            raise UsageError(f"rank 0 cannot listen at MASTER_ADDR:MASTER_PORT, {address}:{port} "
                             f"({os.strerror(err.errno)}); " + (
                                 "set MASTER_ADDR to an address of this machine (127.0.0.1 when "
                                 "every process runs here)" if err.errno == errno.EADDRNOTAVAIL
                                 else "set MASTER_PORT to a free port")) from None
        if world_size > 1:
            print(f"Waiting at {address}:{port} until all {world_size} processes (WORLD_SIZE) "
                  f"have started; Ctrl-C stops", flush=True)
    # torch waits in C++, where Python's Ctrl-C handler never runs: until the group stands, a
    # Ctrl-C or another stop signal ends the process at once (nothing is open or written yet).
    utils.on_stop_signals(signal.SIG_DFL)
    try:
        torch.distributed.init_process_group(backend=backend)
    except torch.distributed.DistError as err:  # e.g. the others never came (after 30 minutes)
        raise UsageError(f"the processes could not meet at {address}:{port} "
                         f"({str(err).splitlines()[0][:200]}); start every one with the same "
                         f"MASTER_ADDR and MASTER_PORT, as torchrun does") from None
    finally:
        utils.quit_on_signals()


def stop_with_rank_0(rank, world_size):
    """Only rank 0 evaluates and saves, so only it can stop on a NaN loss or a failed save; the
    others would wait in a collective until torchrun kills them, with a traceback. So they
    listen on a thread at torchrun's key-value store, where rank 0, leaving with the process
    group open, posts "stop": they leave at once, quietly, with exit code 2, as rank 0 does."""
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
    """A function, called by every rank once a step, whose answer is the same on every rank:
    the largest flag() (a small whole number; True is 1) of any rank at the call before.
    Waiting for the others would hold up every step (on GPUs: a sync), so each call sends its
    question (over gloo, CPU to CPU) and reads the answer to the one a step earlier: every rank
    stops at the same step, one step later."""
    if run.world_size == 1:
        return flag
    group = torch.distributed.new_group(backend="gloo")  # its own: DDP's traffic is apart
    sent = []  # (the all-reduce under way, the tensor it fills)

    def largest_on_any_rank():
        answer = 0
        if sent:
            all_reduce, flags = sent.pop()
            all_reduce.wait()
            answer = int(flags.item())
        flags = torch.tensor(float(flag()))
        sent.append((torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX,
                                                  group=group, async_op=True), flags))
        return answer

    return largest_on_any_rank


def gather_from_all_ranks(value, run):  # [rank 0's value, rank 1's, ...]: called by all ranks
    values = [value] * run.world_size
    if run.world_size > 1:
        torch.distributed.all_gather_object(values, value)
    return values


def end_distributed():  # every rank leaves together, once rank 0 has saved
    if torch.distributed.is_initialized():  # under torchrun, even with one process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Exact resume: weights, optimizer, step and the random state of batches and dropout

def resume(training):
    """Load the --resume checkpoint into train.py's Training (model, optimizer, best evaluation,
    val loss) and this rank's random state; returns the step to go on from."""
    config, model, run = training.config, training.model, training.run
    path = resume_path(config)
    ckpt = checkpoint.load_checkpoint(path, run.device, "--resume")
    check_same_tokens(ckpt, training.corpus, config, path)
    model_args, wanted = ckpt["model_args"], asdict(model.config)
    differs = [k for k in checkpoint.MODEL_SHAPE if model_args[k] != wanted[k]]
    if differs:
        changed = ", ".join(f"{k} {model_args[k]} -> {wanted[k]}" for k in differs)
        raise UsageError(f"cannot resume {path}: the model shape differs ({changed}); give the "
                         f"flags it was trained with ({flags_for_shape(model_args, differs)}), "
                         f"or start a fresh run")
    kinds = dict(optimizer=dict, rng=list, config=dict, val_loss=float)  # and a step >= 0
    if not (all(isinstance(ckpt.get(key), kind) for key, kind in kinds.items()) and ckpt["rng"]
            and checkpoint.is_step(ckpt.get("step"))):
        raise UsageError(f"cannot resume {path}: it has no optimizer or random state, or a "
                         f"damaged one; start a fresh run")
    saved_optimizer = ckpt["config"].get("optimizer") or "adamw"  # None: not saved
    if saved_optimizer != config.optimizer:
        fix = "drop --reference (it means AdamW)" if config.reference else \
            f"pass --optimizer {saved_optimizer}"
        raise UsageError(f"cannot resume {path}: it was trained with --optimizer "
                         f"{saved_optimizer}; {fix}")
    problem = checkpoint.optimizer_problem(ckpt["optimizer"], training.optimizer)
    if problem:
        raise UsageError(f"cannot resume {path}: its optimizer state is damaged ({problem}); "
                         f"start a fresh run")
    step = ckpt["step"]
    if step >= config.max_iters:  # nothing to train, nothing to save
        raise UsageError(f"{path} is at step {step}, {'past' if step > config.max_iters else 'at'} "
                         f"--max_iters {config.max_iters}; pass a larger --max_iters to train on")
    model.load_state_dict(ckpt["model"])
    training.best.restore(ckpt)
    training.val_loss = ckpt["val_loss"]
    # This run's settings (--weight_decay, --beta2, ...), not the saved ones, which
    # load_state_dict would put in their place: flags given to a resumed run take effect.
    settings = [{k: v for k, v in group.items() if k != "params"}
                for group in training.optimizer.param_groups]
    try:
        training.optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(training.optimizer.param_groups, settings):
            group.update(own)
        # One random state per rank of the run that saved it. Another number of processes:
        # only rank 0 can go on where it was; the others go on from a seed.
        if len(ckpt["rng"]) == run.world_size or run.rank == 0:
            restored = restore_rng(ckpt["rng"][run.rank])
        else:
            torch.manual_seed(torch.initial_seed() + step)  # seeded per rank in set_up
            restored = True
    except Exception as err:  # whatever damaged values raise: a TypeError, OverflowError, ...
        raise UsageError(f"cannot resume {path}: its optimizer or random state is damaged "
                         f"({type(err).__name__}: {str(err)[:80]}); start a fresh run") from None
    if not restored:
        print(f"Note: {path} holds no random state for this GPU (saved on another machine): "
              f"dropout goes on from a fresh one, so the run is not exactly the one it resumes")
    note_changed_flags(ckpt["config"], config, path, run, step)
    run.log(f"Resuming from step {step} of {path}")
    return step


def flags_for_shape(shape, names):
    """The flags that give these fields of shape, and the presets that give its whole shape (no
    --preset: the defaults): "--n_embd 192 --n_layer 3; --preset cpu or --preset cpu-2min gives
    it"."""
    presets = {"no --preset": {}, **{f"--preset {name}": set_ for name, set_ in PRESETS.items()}}
    fields = [name for name in checkpoint.MODEL_SHAPE if name != "vocab_size"]  # the text's
    givers = [giver for giver, overrides in presets.items()
              if all(overrides.get(name, getattr(Config, name)) == shape[name] for name in fields)]
    flags = " ".join(f"--{name} {shape[name]}" for name in names)
    return flags + (f"; {' or '.join(givers)} gives it" if givers else "")


# The flags that change the training's maths: given to a resumed run, they take effect.
STEPPING_FLAGS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay",
                  "beta1", "beta2", "grad_clip", "batch_size", "gradient_accumulation_steps",
                  "dropout", "dtype")


def note_changed_flags(saved, config, path, run, step):
    """One note naming the stepping flags that differ from the run that saved the checkpoint
    (a flag left out is back at its default; one it did not record is skipped), each compared as
    it takes effect: --dtype auto as the format it picks here, the learning rate's decay length
    as --lr_decay_iters, or --max_iters when that is 0 (a longer run stretches it), and neither
    it nor the warmup once the resumed step is past both runs' (the rate is min_lr from there)."""
    now = asdict(config)

    def in_effect(settings, name):
        if name == "dtype":
            return utils.pick_dtype(settings[name], run.device)
        if name == "lr_decay_iters":
            return settings[name] or settings.get("max_iters")
        return settings[name]

    schedule = ("warmup_iters", "lr_decay_iters")
    ends = [in_effect(s, name) for s in (saved, now) for name in schedule if name in s]
    decayed = all(type(end) is int for end in ends) and step >= max(ends)  # (saved: any value)
    names = [name for name in STEPPING_FLAGS if not (decayed and name in schedule)]
    names += ["muon_lr"] if config.optimizer == "muon" else []
    changed = [f"--{name} {saved[name]} -> {now[name]}" if name != "lr_decay_iters" else
               f"the learning rate's decay over {in_effect(saved, name)} -> "
               f"{in_effect(now, name)} steps (--lr_decay_iters {in_effect(saved, name)} keeps it)"
               for name in names if name in saved
               and in_effect(saved, name) not in (None, in_effect(now, name))]  # None: unknown
    if changed:
        run.log(f"Note: {', '.join(changed)}: this run goes on with the new values, not those "
                f"{path} was trained with (repeat the old flags to go on exactly)")


def check_same_tokens(ckpt, corpus, config, path):
    """Refuse other tokens than the checkpoint learned: another --tokenizer, --vocab_size (BPE's),
    or --bpe_sample_chars (a BPE sample of the same text that learned other merges), or another
    text (its sha256: the same characters in another text give the same vocabulary)."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}  # hand-made: none
    saved = dict(saved, tokenizer=ckpt["tokenizer"]["kind"])
    same_text = ckpt.get("text_sha256", corpus.sha256) == corpus.sha256
    same_tokens = ckpt["tokenizer"] == corpus.tokenizer.to_dict()
    for flag, matters in (("tokenizer", True), ("vocab_size", config.tokenizer == "bpe"),
                          ("bpe_sample_chars", same_text and not same_tokens)):
        if matters and saved.get(flag) not in (None, getattr(config, flag)):  # None: unknown
            raise UsageError(f"cannot resume {path}: it was trained with --{flag} {saved[flag]}; "
                             f"pass --{flag} {saved[flag]}")
    if not (same_text and same_tokens):
        raise UsageError(f"cannot resume {path}: it was trained on another text than --data "
                         f"{config.data}; pass the --data it was trained on, or start a fresh run")


def rng_state():
    """Every random state, as tensors and plain values: Python's, NumPy's, the CPU's, and the
    GPU's this process draws on (CUDA's current one, or MPS)."""
    name, keys, *rest = np.random.get_state()
    gpu = (("cuda", torch.cuda.get_rng_state()) if torch.cuda.is_initialized() else
           ("mps", torch.mps.get_rng_state()) if torch.backends.mps.is_available() else None)
    return dict(python=random.getstate(), torch=torch.get_rng_state(), gpu=gpu,
                numpy=(name, torch.from_numpy(keys.astype(np.int64)), *rest))


def restore_rng(state):
    """Put back rng_state()'s states; False where the GPU's could not be: saved on another kind
    of device, or (an older checkpoint's list, one per GPU that saved it) for a GPU not here."""
    # .cpu(): a checkpoint resumed on a GPU is loaded onto it, but random states are CPU bytes.
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
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
