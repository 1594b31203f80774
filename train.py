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

startup.exit_at_once_on_ctrl_c(__name__)  # while torch loads: before any other import

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

import runs
import speedups
from config import Config, parse_config
from dataset import Corpus, ValSet, get_batch, load_corpus, val_set
from model import GPTConfig, GPTModel
from tokenizer import start_tokens
from utils import UsageError, autocast, bits_per_char, run_main, use_compile, use_flash


def main(argv=None):
    config, preset = parse_config(argv)  # every setting (config.py's fields), from the flags
    run = runs.start(config, preset)  # this process's device, number format, rank; checks
    run.log("Loading data...")
    corpus, val_data = load_tokens(config, run)  # the text as tokens, and its tokenizer
    model = build_model(corpus.tokenizer.vocab_size, config, run)
    runs.note_sizes(corpus, model, config, run)  # characters, vocabulary, parameters
    optimizer = make_optimizer(model, config)
    training = Training(config, run, corpus, val_data, model, optimizer)  # what helpers share
    start_step = runs.resume(training) if config.resume else 0  # --resume: where it stopped
    train_model = wrap_for_training(model, config, run)  # compiled; DDP under torchrun
    scaler = make_scaler(run)  # float16 only: scales the loss so small gradients survive
    stop_requested = runs.catch_ctrl_c(run)  # Ctrl-C, SIGTERM: finish the step, save, stop
    training.progress = runs.Progress(config, run, model, start_step)  # bar, tokens/s, log

    for step in range(start_step, config.max_iters + 1):  # + 1: evaluate after the last step
        stopping = stop_requested()  # under torchrun, every rank stops at the same step
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
    finish(training, step, stopping)  # where the checkpoint is, its best weights; a sample


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
    best: "BestEvaluation" = field(default_factory=lambda: BestEvaluation())
    val_loss: float = math.nan  # the latest evaluation's (NaN on ranks other than 0)
    progress: runs.Progress = None  # made once the first step is known


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
        model = runs.compiled_or_eager(model)
    if run.world_size > 1:  # DDP: averages the gradients of all ranks during backward
        model = DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
        # The only buffers, the causal masks, never change: rank 0 need not send them to every
        # rank before every forward, DDP's default. (Set here: PyTorch 2.13 renamed the flag.)
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


# ---------------------------------------------------------------------------------------------
# Evaluating: the loss on both splits, the best weights, samples

def evaluate_and_save(t, step, last_step):
    """Rank 0 evaluates and prints the eval line (marked when its val loss is the best yet);
    every rank's random state goes into the checkpoint, which rank 0 saves (atomically) after
    step 0, with the best evaluation's weights. t: main()'s Training."""
    config, run, model, progress = t.config, t.run, t.model, t.progress
    if run.is_master:
        train_loss, t.val_loss = evaluate(model, t.corpus, t.val_data, config, run)
        val_bpc = bits_per_char(t.val_loss, t.val_data.n_predictions, t.val_data.n_chars)
        elapsed = time.time() - startup.STARTED_AT
        improved = t.best.update(step, t.val_loss, model)
        progress.write(f"Step {step}: train loss {train_loss:.4f}, val loss {t.val_loss:.4f} "
                       f"({t.val_data.note}), val bpc {val_bpc:.4f} ({elapsed:.1f}s)"
                       + (" new best" if improved else ""))
        if not (math.isfinite(train_loss) and math.isfinite(t.val_loss)):
            runs.stop_on_nan(progress, config.checkpoint)
        metrics = dict(step=step, train_loss=train_loss, val_loss=t.val_loss, val_bpc=val_bpc,
                       elapsed=elapsed)
        if config.eval_sample_tokens > 0:
            metrics["sample"] = eval_sample(model, t.corpus.tokenizer, config, run)
            progress.write(f"Sample at step {step}:\n{metrics['sample'].strip()}\n")
    # Taken after rank 0's evaluation (which draws batches), so --resume continues exactly.
    rng_states = runs.gather_from_all_ranks(runs.rng_state(), run)
    if run.is_master and step > 0:
        runs.save_or_stop(dict(model=model.state_dict(),
                          model_args=asdict(model.config),
                          tokenizer=t.corpus.tokenizer.to_dict(), config=asdict(config),
                          optimizer=t.optimizer.state_dict(), step=step, val_loss=t.val_loss,
                          val_bpc=val_bpc, rng=rng_states, text_sha256=t.corpus.sha256,
                          **t.best.in_checkpoint(step)),
                     config.checkpoint, progress)
    if run.is_master:  # after saving: a fresh run's log replaces an earlier run's only then
        progress.record(metrics, draw_curve=last_step, saved=step > 0)
    progress.restart_timer()  # keep evaluation time out of tokens/s


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


def finish(training, step, stopping):
    """Say where the checkpoint is and which weights in it are the best, print a sample, and
    let every rank leave together."""
    config, run, best = training.config, training.run, training.best
    training.progress.close()
    if run.is_master:
        if stopping and step == 0:
            print("Stopped before the first step; no checkpoint saved")
        elif stopping:
            print(f"Stopped at step {step}; checkpoint saved to {config.checkpoint}")
        else:
            print(f"Saved checkpoint to {config.checkpoint} (val loss {training.val_loss:.4f})")
        if step > 0 and best.step == step:
            print(f"Best: val loss {best.val_loss:.4f} at step {best.step}, the last step")
        elif step > 0:
            print(f"Best: val loss {best.val_loss:.4f} at step {best.step}, kept in the checkpoint "
                  f"too: generate.py samples it (--weights last: step {step}'s)")
        if config.sample_tokens > 0:
            sample = sample_text(training.model, training.corpus.tokenizer, config.sample_tokens,
                                 run.device)
            print("\nSample:\n" + sample)
            training.progress.record(dict(step=step, sample=sample))
    runs.end_distributed()  # under torchrun: once rank 0 has saved


def sample_text(model, tokenizer, n_tokens, device, generator=None):
    model.eval()
    idx = torch.tensor([start_tokens(tokenizer)], dtype=torch.long, device=device)
    tokens = model.generate(idx, n_tokens, temperature=0.8, top_k=200, generator=generator)
    return tokenizer.decode(tokens[0].tolist())


if __name__ == "__main__":
    run_main(main)
