"""Train Mini-GPT on a text file, token by token (characters, or BPE with --tokenizer bpe).

    python train.py                      # the default model on data/input.txt (a GPU run)
    python train.py --preset cpu         # a small model for a laptop CPU: about half a minute
    python train.py --max_iters 2000 --dropout 0.1   # any config.py field as --name value
    python train.py --reference          # every speed-up off: the plain code, for a debugger

main() is the whole story: load the data, build the model, then repeat {set the learning
rate, sample a batch, forward, backward, step}, evaluating and saving every eval_interval
steps, and print a sample. Below it, in the order main() calls them, the steps a learner reads.
What runs around the loop (devices, several processes, checks, progress bar and speed figures,
Ctrl-C, exact resume) is in runs.py, which a first read can skip; tracking.py records metrics.
"""

import startup

startup.load_torch(__name__)  # first: Ctrl-C while it loads exits at once

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

import runs
import speedups
from config import Config, parse_config
from dataset import Corpus, ValSet, get_batch, load_corpus, too_short, val_set
from model import GPTConfig, GPTModel
from tokenizer import start_tokens
from utils import UsageError, autocast, bits_per_char, run_main, use_compile, use_flash


def main(argv=None):
    config, preset = parse_config(argv)  # every setting (config.py's fields), from the flags
    run = runs.start(config, preset)  # this process's device, number format, rank; checks
    run.log("Loading data...")
    corpus, val_data = load_tokens(config, run)  # the text as tokens, and its tokenizer
    model = build_model(corpus.tokenizer.vocab_size, config, run)
    optimizer = make_optimizer(model, config)
    training = Training(config, run, corpus, val_data, model, optimizer)  # what helpers share
    start_step = runs.resume(training) if config.resume else 0  # --resume: where it stopped
    runs.note_sizes(corpus, model, config, run, start_step)  # characters, vocabulary, parameters
    train_model = wrap_for_training(model, config, run)  # compiled; DDP under torchrun
    scaler = make_scaler(run)  # float16 only: scales the loss so small gradients survive
    stop_requested = runs.catch_ctrl_c(run)  # Ctrl-C, SIGTERM: finish the step, save, stop
    training.progress = runs.Progress(config, run, model, start_step)  # bar, tokens/s, log

    for step in range(start_step, config.max_iters + 1):  # + 1: evaluate after the last step
        stopping = stop_requested()  # under torchrun, every rank stops at the same step
        if stopping == runs.STOP_UNSAVED:  # asked before this run's first step was done:
            break  # nothing to save, the checkpoint on disk (if any) is kept as it was
        last_step = step == config.max_iters or stopping
        # A resumed run's checkpoint was saved just after evaluating this step: no need again.
        just_resumed = config.resume and step == start_step
        if (step % config.eval_interval == 0 or last_step) and not just_resumed:
            evaluate_and_save(training, step, last_step)
        if last_step:
            break

        lr = set_learning_rate(optimizer, step, config)
        micro_batches = [get_batch(corpus, config.batch_size, config.block_size, run.device)
                         for _ in range(config.gradient_accumulation_steps)]
        loss = train_step(train_model, optimizer, scaler, micro_batches, config, run)
        training.progress.step_done(step + 1, loss, lr)  # loss, tokens/s every log_interval
    runs.finish(training, step, stopping)  # where the checkpoint is, its best weights
    if run.is_master and config.sample_tokens > 0 and stopping != runs.STOP_UNSAVED:
        sample = sample_text(training, config.sample_tokens)
        print("\nSample:\n" + sample)
        training.progress.record(dict(step=step, sample=sample))
    runs.end_distributed()  # under torchrun: once rank 0 has saved


# ---------------------------------------------------------------------------------------------
# The steps of main(), in the order it calls them

@dataclass
class Training:
    """What main() hands its helpers, made once: one object instead of long argument lists."""
    config: Config  # every setting: config.py's fields, from the flags
    run: runs.Run  # where this process runs: device, number format, rank (runs.py)
    corpus: Corpus  # the text's tokens, a memory-mapped file, and its tokenizer (dataset.py)
    val_data: ValSet  # the val tokens evaluate() scores, on the device
    model: GPTModel  # the plain model, which evaluation, saving and sampling use
    optimizer: torch.optim.Optimizer  # AdamW; with Muon, speedups.MuonAdamW, used the same way
    val_loss: float = math.nan  # the latest evaluation's (NaN on ranks other than 0)
    # The evaluation with the lowest val loss yet (BestEvaluation is below, with evaluating).
    best: "BestEvaluation" = field(default_factory=lambda: BestEvaluation())
    progress: runs.Progress = None  # made once the first step is known


def load_tokens(config, run, fix="use a longer text or a smaller --block_size"):
    """The text's tokens, prepared once into a file every rank maps (dataset.py), and the val
    tokens evaluate() scores, on the device. fix: what to do about a text too short."""
    corpus = load_corpus(config, run.rank, run.world_size)
    short = too_short(corpus, config.block_size)  # a block to train on, and a val score?
    if short:
        raise UsageError(f"{config.data} {short}; {fix}")
    return corpus, val_set(corpus, config.eval_tokens, config.block_size, run.device)


def build_model(vocab_size, config, run):
    """The model of the shape config asks for; its GPTConfig goes into every checkpoint."""
    model = GPTModel(GPTConfig(vocab_size, config.n_embd, config.n_layer, config.n_head,
                               config.block_size, config.dropout,
                               use_flash(config.flash, run.device))).to(run.device)
    if run.device == "cpu" and config.dropout > 0 and not config.reference:
        speedups.use_fast_cpu_dropout(model)  # same job, a quarter of the random numbers
    return model


def make_optimizer(model, config):
    """AdamW, decaying the weight matrices only (biases and LayerNorm gains are not shrunk);
    with --optimizer muon, Muon for the blocks' matrices and AdamW for the rest (speedups.py)."""
    muon = config.optimizer == "muon"
    named = list(model.named_parameters())
    for_muon = [p for name, p in named if muon and p.dim() == 2 and name.startswith("blocks.")]
    rest = [p for _, p in named if all(p is not q for q in for_muon)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    betas = (config.beta1, config.beta2)
    fused = {} if config.reference else {"fused": True}  # one kernel for the whole update
    try:
        adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, **fused)
    except (RuntimeError, TypeError):  # a device or PyTorch version without fused AdamW
        adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas)
    if muon:
        return speedups.MuonAdamW(adamw, for_muon, config.muon_lr, config.weight_decay)
    return adamw


def wrap_for_training(model, config, run):
    """The model that train_step calls: compiled (--compile), and wrapped in DDP under
    torchrun. Evaluation and saving use the plain model, which shares its weights."""
    if use_compile(config.compile, run.device, "running"):
        model = runs.compiled_or_eager(model)
    if run.world_size > 1:  # DDP: averages the gradients of all ranks during backward
        model = DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
        # The only buffers, the causal masks, never change: rank 0 need not send them to every
        # rank before every forward, DDP's default. (Set as an attribute, which every PyTorch
        # reads: as DDP's argument, this name warns from PyTorch 2.13, which renamed it.)
        model.broadcast_buffers = False
    return model


def make_scaler(run):
    """float16 (GPUs without bf16: T4, V100) needs loss scaling: the loss is multiplied before
    backward so small gradients do not underflow to 0, and divided out before the step.
    bfloat16 has float32's range and float32 needs nothing, so there the scaler is a no-op."""
    return torch.amp.GradScaler(run.device_type, enabled=run.dtype == "float16")


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
    """Set every parameter group's rate for this step, and return it. (With Muon,
    speedups.MuonAdamW scales this rate for its matrices when it steps.)"""
    lr = learning_rate_at(step, config)
    for group in optimizer.param_groups:  # with Muon, its groups too: rescaled in its step()
        group["lr"] = lr
    return lr


def train_step(train_model, optimizer, scaler, micro_batches, config, run):
    """One optimizer step on the summed gradients of the micro-batches; returns the last loss.
    The gradients stay in .grad until the next step (they are cleared first, not last)."""
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
    # optimizer.step() (MuonAdamW's too: it has the step and param_groups the scaler uses),
    # skipped if float16 gradients overflowed
    scaler.step(optimizer)
    scaler.update()
    return loss  # the last micro-batch's, for the progress bar


def sync_gradients_only_if(is_last, train_model):
    """Under DDP, all-reduce the gradients once, after the last micro-batch, not after each;
    elsewhere a context that does nothing."""
    if is_last or not hasattr(train_model, "no_sync"):
        return contextlib.nullcontext()
    return train_model.no_sync()


# ---------------------------------------------------------------------------------------------
# Evaluating: the loss on both splits, the best weights, samples

def evaluate_and_save(t, step, last_step):
    """Rank 0 evaluates, prints the eval line ("new best" when it beats every earlier one) and
    saves the checkpoint (atomically) after step 0, with every rank's random state and the best
    evaluation's weights. t: main()'s Training."""
    config, run, model, progress = t.config, t.run, t.model, t.progress
    if run.is_master:
        train_loss, t.val_loss = evaluate(model, t.corpus, t.val_data, config, run)
        val_bpc = bits_per_char(t.val_loss, t.val_data.n_predictions, t.val_data.n_chars)
        elapsed = time.time() - startup.STARTED_AT
        new_best = t.best.update(step, t.val_loss, val_bpc, model)
        progress.write(f"Step {step}: train loss {train_loss:.4f}, val loss {t.val_loss:.4f} "
                       f"({t.val_data.note}), val bpc {val_bpc:.4f} ({elapsed:.1f}s)"
                       + (" new best" if new_best else ""))
        if not (math.isfinite(train_loss) and math.isfinite(t.val_loss)):
            runs.stop_on_nan(progress)
        metrics = dict(step=step, train_loss=train_loss, val_loss=t.val_loss, val_bpc=val_bpc,
                       elapsed=elapsed)
        if config.eval_sample_tokens > 0:  # watch the text go from noise to Shakespeare
            # A generator of its own, seeded alike each time: the samples differ only by what
            # the model learned, and training's random stream (so --resume) is untouched.
            generator = torch.Generator(run.device).manual_seed(config.seed)
            metrics["sample"] = sample_text(t, config.eval_sample_tokens, generator)
            progress.write(f"Sample at step {step}:\n{metrics['sample'].strip()}\n")
    # Taken after rank 0's evaluation (which draws batches), so --resume continues exactly.
    rng_states = runs.gather_from_all_ranks(runs.rng_state(), run)
    if run.is_master and step > 0:
        runs.save_or_stop(dict(model=model.state_dict(), model_args=asdict(model.config),
                               tokenizer=t.corpus.tokenizer.to_dict(), config=asdict(config),
                               optimizer=t.optimizer.state_dict(), step=step,
                               val_loss=t.val_loss, val_bpc=val_bpc, rng=rng_states,
                               text_sha256=t.corpus.sha256, **t.best.in_checkpoint(step)),
                          config.checkpoint, progress)
    if run.is_master:  # after saving: a fresh run's log replaces an earlier run's only then
        progress.record(metrics, draw_curve=last_step, saved=step > 0)
    progress.restart_timer()  # keep evaluation time out of tokens/s


@dataclass
class BestEvaluation:
    """The evaluation with the lowest val loss yet. A model trained too long on a small text gets
    worse on the val split (it overfits): the checkpoint keeps these weights too, as best_model,
    and generate.py samples them unless asked for --weights last."""
    step: int = -1
    val_loss: float = math.inf
    val_bpc: float = math.nan  # its bits per character (NaN: not known, as in older checkpoints)
    weights: dict = None  # a copy on the CPU, taken when they became the best

    def update(self, step, val_loss, val_bpc, model):
        """Keep this evaluation if its val loss is the lowest yet; True if it beat earlier ones."""
        if not val_loss < self.val_loss:  # a NaN is never lower: never the best
            return False
        beat_an_earlier_one = self.step >= 0
        self.step, self.val_loss, self.val_bpc = step, val_loss, val_bpc
        self.weights = {name: w.detach().to("cpu", copy=True)
                        for name, w in model.state_dict().items()}
        return beat_an_earlier_one

    def in_checkpoint(self, step):
        """The checkpoint's entries: the best step, val loss and bits per character, and its
        weights unless they are this step's (then they are the checkpoint's model already)."""
        best = dict(step=self.step, val_loss=self.val_loss, val_bpc=self.val_bpc)
        return dict(best=best) if self.step == step else dict(best=best, best_model=self.weights)

    def restore(self, checkpoint):
        """From the checkpoint being resumed; one saved before best weights were kept has only
        its last weights, the best known then."""
        last = dict(step=checkpoint["step"], val_loss=checkpoint["val_loss"],
                    val_bpc=checkpoint.get("val_bpc", math.nan))
        best = checkpoint.get("best", last)  # (older checkpoints: no val_bpc in best)
        self.step = best["step"]
        self.val_bpc = best.get("val_bpc", last["val_bpc"] if best["step"] == last["step"] else
                                math.nan)
        self.val_loss = best["val_loss"] if math.isfinite(best["val_loss"]) else math.inf
        self.weights = {name: w.to("cpu", copy=True)
                        for name, w in checkpoint.get("best_model", checkpoint["model"]).items()}


def evaluate(model, corpus, val_data, config, run):
    """(train loss estimated on eval_iters random batches, val loss: exact over the whole split
    when it is small, else over a fixed subset: dataset.val_set decides)."""
    model.eval()
    with torch.no_grad(), autocast(run.device, run.dtype):
        batches = (get_batch(corpus, config.batch_size, config.block_size, run.device)
                   for _ in range(config.eval_iters))
        train_loss = torch.stack([model(x, y)[1] for x, y in batches]).mean().item()
        if val_data.exact:
            val_loss = exact_loss(model, val_data.tokens, config.block_size, config.batch_size)
        else:
            val_loss = windows_loss(model, val_data.tokens, config.batch_size)
    model.train()
    return train_loss, val_loss


def exact_loss(model, data, block_size, batch_size):
    """Mean loss over every next-token prediction in data, cut into consecutive blocks. Each
    token is predicted exactly once (from the tokens before it in its block), so this is the
    split's true loss rather than a noisy estimate from random batches."""
    n_blocks = (len(data) - 1) // block_size
    inputs = data[:n_blocks * block_size].view(n_blocks, block_size)  # views: nothing is copied
    targets = data[1:n_blocks * block_size + 1].view(n_blocks, block_size)
    total_loss = summed_loss(model, inputs, targets, batch_size)
    rest = data[n_blocks * block_size:]
    if len(rest) > 1:  # the last, partial block
        total_loss += summed_loss(model, rest[None, :-1], rest[None, 1:], batch_size)
    return total_loss / (len(data) - 1)  # every token but the first is predicted once


def windows_loss(model, windows, batch_size):
    """Mean loss over every prediction in windows (N, T + 1): each row's last T tokens are
    predicted from the ones before them, as in exact_loss's blocks."""
    targets = windows[:, 1:]
    return summed_loss(model, windows[:, :-1], targets, batch_size) / targets.numel()


def summed_loss(model, inputs, targets, batch_size):
    """The loss summed over every target in targets (N, T), predicted from inputs (N, T)."""
    # No gradients are kept, so a pass takes more rows than training: 16,384 tokens, fewer with
    # a big vocabulary, whose logits (tokens x vocab) would fill the memory: 2**24 (64 MB) at most.
    tokens_per_pass = min(16384, 2**24 // model.lm_head.out_features)
    n_rows = max(batch_size, tokens_per_pass // inputs.shape[1])
    total_loss = 0.0
    for first in range(0, len(inputs), n_rows):  # no pass at all when there are no rows
        x, y = inputs[first:first + n_rows], targets[first:first + n_rows]
        _, loss = model(x, y)
        total_loss += loss.item() * y.numel()
    return total_loss


def sample_text(t, n_tokens, generator=None):
    t.model.eval()
    idx = torch.tensor([start_tokens(t.corpus.tokenizer)], dtype=torch.long, device=t.run.device)
    tokens = t.model.generate(idx, n_tokens, temperature=0.8, top_k=200, generator=generator)
    t.model.train()
    return t.corpus.tokenizer.decode(tokens[0].tolist())


if __name__ == "__main__":
    run_main(main, torchrun=True)
