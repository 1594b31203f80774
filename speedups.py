"""The speed-ups: tricks that make Mini-GPT faster without changing what it computes (or, for
int8 weights and Muon, changing it a little, measurably). model.py, train.py and generate.py
are the whole GPT without them; `--reference` runs them with every speed-up off. Skip this file
on a first read, but for its Muon section: the CPU presets train with Muon.

Each speed-up says why it pays; docs/results.md (CPU) and docs/gpu.md (GPU) have what it gained
and the command that measures it. Mixed precision, SDPA attention and compiling training are
PyTorch switches (train.py).
"""

import ctypes
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPTModel, sample_next_token
from utils import UsageError, has_native_bf16, use_compile

# ---------------------------------------------------------------------------------------------
# Training on a CPU

def keep_freed_memory():
    """Let the C library's malloc keep freed memory for the next allocation instead of handing
    it back to the operating system; True if it could (Linux with glibc), else does nothing.
    Why: glibc gives every allocation over 32 MB (most activations of the default model at
    batch 64) fresh pages and unmaps them on free, so every training step the kernel maps and
    zeroes gigabytes again: hundreds of thousands of page faults. The cost: the process keeps
    its peak memory until it exits (and a little more: freed blocks do not always fit)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's; other C libraries have none
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # option numbers from glibc's malloc.h
    never_mmap = mallopt(M_MMAP_MAX, 0)  # serve big blocks from the heap, which is reused
    never_trim = mallopt(M_TRIM_THRESHOLD, -1)  # never shrink the heap back
    return bool(never_mmap and never_trim)


class FastCPUDropout(nn.Dropout):
    """nn.Dropout (zero each element with probability p, scale the rest by 1/(1-p)) for CPUs.
    Why: on a CPU, torch's dropout draws one random number per element, and with dropout 0.2
    those draws took a large part of a training step of the default model (the attention
    weights alone are (B, n_head, T, T): 25M elements per layer at batch 64). Here one 64-bit
    random number gives four 16-bit ones. GPUs keep torch's own."""

    def forward(self, x):
        if x.device.type != "cpu" or not self.training or self.p == 0:
            return super().forward(x)
        dropped_values = round(self.p * 65536)  # out of 65536: p, rounded to a multiple of 2^-16
        random_words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64)
        random_words.random_(-2**63, 2**63 - 1)  # every 64-bit pattern, about equally likely
        random_16bit = random_words.view(torch.int16)[:x.numel()].view(x.shape)  # -32768..32767
        # 0 where dropped, 1/(1-p) where kept, in x's dtype so the multiply needs no casts.
        mask = (random_16bit >= dropped_values - 32768).to(x.dtype)
        return x * mask.mul_(65536 / (65536 - dropped_values))


def use_fast_cpu_dropout(model):
    """Replace every nn.Dropout in model by FastCPUDropout (same p); weights are untouched."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastCPUDropout(child.p))
    return model


# ---------------------------------------------------------------------------------------------
# Muon: an optimizer that learns more per step (the CPU presets train with it; read this part)
#
# What it does. For each weight matrix W (C_out, C_in) of the blocks, Muon keeps a momentum M,
# a running mean of the gradients (as SGD with momentum keeps one), but steps along the
# orthogonal matrix closest to M: for M = U S V^T (its singular value decomposition: U and V
# rotations, S the strengths of its directions), the update is U V^T, every strength set to 1.
# A few Newton-Schulz iterations (a handful of matmuls) get close enough to U V^T without
# computing an SVD.
#
# Why it learns more per step. A weight matrix's gradient is dominated by a few directions:
# its largest singular values are far above the rest. AdamW's update, element by element, keeps
# that imbalance, so the learning rate must stay small enough for the strongest direction, and
# the weak directions, which also lower the loss, barely move. Muon's update moves every
# direction equally, so each step makes progress on all of them. A step costs a little more
# (the Newton-Schulz matmuls); in short runs the steps saved repay it (docs/results.md).
# It suits the hidden matrices only (an embedding's rows are not directions of a linear map):
# the embeddings, the output head, biases and LayerNorm gains stay with AdamW.
# The training runs the code below: muon_direction and nearly_orthogonal give a matrix's step
# direction, and Muon.step applies it with the weight decay and the learning rate. Where the
# chip computes in bf16, its numbers are torch.optim.Muon's (PyTorch 2.9 and newer) to the last
# bit (tests/test_speedups.py); elsewhere its iteration runs in float32, which is faster there.

def muon_direction(momentum, grad, beta=0.95, matmul_dtype=torch.bfloat16):
    """Muon's step for one weight matrix, before the learning rate: the momentum (updated in
    place), one step ahead (Nesterov), made nearly orthogonal, its matmuls in matmul_dtype."""
    momentum.lerp_(grad, 1 - beta)  # M = beta M + (1 - beta) g: a running mean of gradients
    return nearly_orthogonal(grad.lerp(momentum, beta), matmul_dtype)  # a step ahead


def nearly_orthogonal(M, matmul_dtype=torch.bfloat16, steps=5):
    """About U V^T for M = U S V^T, without an SVD: scaled so that every singular value is at
    most 1, then each pass maps every singular value s to a s + b s^3 + c s^5, which pushes
    them towards 1: after 5 passes all but the tiniest lie between about 0.7 and 1.2, close
    enough for a step direction."""
    a, b, c = 3.4445, -4.7750, 2.0315  # chosen to lift small singular values fast
    X = M.to(matmul_dtype)  # matmuls only, so bfloat16 suffices where the chip has it
    tall = X.size(0) > X.size(1)
    if tall:  # work on the wide shape: X X^T is then the smaller matrix
        X = X.T
    X = X / X.norm().clamp(min=1e-7)  # the Frobenius norm bounds the largest singular value
    for _ in range(steps):
        gram = X @ X.T  # (rows, rows); (X X^T)^k X has X's singular vectors, values s^(2k+1)
        # X = a X + (b gram + c gram @ gram) @ X, as two fused multiply-adds:
        # torch.addmm(input, m1, m2, beta=, alpha=) is beta * input + alpha * (m1 @ m2).
        X = torch.addmm(X, torch.addmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices: each step, shrink W by its weight decay (as AdamW does),
    then W -= lr * muon_direction(...), the learning rate scaled by sqrt(rows / cols) for tall
    matrices so that a step's size does not depend on their shape. The iteration's matmuls run
    in bfloat16 where the chip computes in it, else in float32 (torch.optim.Muon's always run in
    bfloat16): emulated bf16 (a CPU with AVX2 only) would make them many times slower."""

    def __init__(self, params, lr, weight_decay, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        # The chip of the first parameter decides for all (train.py keeps them on one device).
        device = next((str(p.device) for g in self.param_groups for p in g["params"]), "cpu")
        self.matmul_dtype = torch.bfloat16 if has_native_bf16(device) else torch.float32

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr = group["lr"]
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                state = self.state[weight]  # saved with the checkpoint, for exact resume
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(weight.grad)
                direction = muon_direction(state["momentum_buffer"], weight.grad,
                                           group["momentum"], self.matmul_dtype)
                rows, cols = weight.shape
                weight.mul_(1 - lr * group["weight_decay"])
                weight.add_(direction, alpha=-lr * math.sqrt(max(1, rows / cols)))


class MuonAdamW:
    """Muon for the Transformer blocks' weight matrices, AdamW for everything else, used as one
    optimizer: zero_grad, step, state_dict, and param_groups for the learning-rate schedule.
    train.set_learning_rate sets AdamW's rate on every group; step() gives Muon's group the same
    curve scaled to peak at muon_lr (Muon's updates have another size, so another peak rate)."""

    def __init__(self, adamw, muon_params, muon_lr, weight_decay):
        self.adamw = adamw  # built with lr = learning_rate, AdamW's peak rate
        self.muon = Muon(muon_params, lr=muon_lr, weight_decay=weight_decay)

    @property
    def param_groups(self):  # GradScaler.unscale_ and the learning-rate schedule read these
        return self.adamw.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def step(self):
        # This step's rate on AdamW's schedule (the one the progress bar shows), scaled to Muon's
        # peak. With --preset cpu, step 9 (the 10th) is at 40% of the warmup: AdamW 1.6e-3 of
        # its 4e-3, Muon 0.02 of its muon_lr 0.05.
        lr = self.adamw.param_groups[0]["lr"]
        for group in self.muon.param_groups:
            group["lr"] = lr * self.muon.defaults["lr"] / self.adamw.defaults["lr"]
        self.adamw.step()
        self.muon.step()

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


# ---------------------------------------------------------------------------------------------
# Sampling: int8 weights on CPUs, a compiled one-token step on GPUs

def quantize_int8(model):
    """The model (on the CPU) with every Linear's weight stored as int8 (Int8Linear below); the
    rest (embeddings, LayerNorms, attention, the KV cache) stays float32. Why: sampling one
    sequence multiplies a single vector by every weight matrix per token, so its time goes into
    reading the weights: 43 MB a token in float32 for the default model, 11 MB in int8.
    Weight-only: activations are not quantized; the val loss barely moves."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise UsageError(f"this PyTorch ({torch.__version__}) has no int8 weight-only matmul; "
                         f"use --dtype bfloat16, or PyTorch 2.3 or newer")
    model = model.float()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


class Int8Linear(nn.Module):
    """y = x W^T + b with W kept as int8, one scale per output row."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()  # (out_features, in_features)
        # Each row's largest |weight| maps to 127, so every row keeps 8 bits of resolution.
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        # The many-rows matmul below: bf16 where the CPU computes in it, else float32 (emulated
        # bf16 is many times slower than float32 there).
        self.many_rows_dtype = torch.bfloat16 if has_native_bf16("cpu") else torch.float32

    def forward(self, x):  # (..., in_features), float32
        rows = x.reshape(-1, x.size(-1))
        if rows.size(0) > 8:
            # Many rows (a prompt, --no_cache): the matmul, not the reading, is the cost, and
            # a bfloat16 one is faster where native; widen the weights for it.
            dtype = self.many_rows_dtype
            y = F.linear(rows.to(dtype), self.weight.to(dtype) * self.scales[:, None].to(dtype))
        else:
            # A few rows (one new token per sample): PyTorch's fused int8-weight kernel reads
            # the int8 weights directly and applies the scales itself. It takes 2-D bfloat16
            # inputs; the rest of the model stays float32, whose small CPU kernels (LayerNorm,
            # GELU, attention) were faster here than bfloat16's.
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self.scales)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def compile_decode(model, device, setting="true"):
    """Send every one-new-token step of model.stream, its random draw included, through
    torch.compile (setting: true, false, or auto = on CUDA only); True if it did. Where
    torch.compile cannot work it says why and changes nothing; else it changes this one model
    object only (its next_token and new_cache).
    Why: a step of the default model is ~150 small kernels, and sampling a dozen more; on a
    GPU, launching them one by one from Python costs far more than running them. A one-token
    step always has the same shapes (model.KVCache), so one compiled graph serves every step,
    and on CUDA "reduce-overhead" replays it as a CUDA graph with one launch: the host never
    waits for the GPU, and the tokens stay there until generate.py copies a few at a time.
    Prompts (a new length each time) and draws from a generator of their own stay eager.
    Compiled, the draw takes other random numbers: the same --seed gives other text than eager
    (greedy, --temperature 0, gives the same). Compiling takes tens of seconds: on a CPU, where
    the step is not launch-bound, it is off by default."""
    if not use_compile(setting, device, "decoding"):
        return False
    on_cuda = device.startswith("cuda")

    def decode_step(idx, positions, cache, temperature, top_k, top_p):  # -> the tokens (B,)
        return sample_next_token(model.logits(idx, positions, cache)[:, -1, :], temperature,
                                 top_k, top_p)

    compiled = torch.compile(decode_step, mode="reduce-overhead" if on_cuda else None,
                             fullgraph=True, dynamic=False)
    eager, caches = model.next_token, {}

    def new_cache(batch_size):
        # One cache per batch size, reused: the compiled graph is tied to these buffers, and a
        # CUDA graph may update them in place only if their addresses never change.
        if batch_size not in caches:
            caches[batch_size] = GPTModel.new_cache(model, batch_size)
            torch._dynamo.mark_static_address(caches[batch_size].keys)
            torch._dynamo.mark_static_address(caches[batch_size].values)
        caches[batch_size].length = 0  # empty again
        return caches[batch_size]

    def next_token(idx, cache, temperature, top_k, top_p, generator):
        nonlocal compiled
        if compiled is None or cache is None or idx.size(1) != 1 or generator is not None:
            return eager(idx, cache, temperature, top_k, top_p, generator)
        if not idx.is_inference():  # a one-token prompt made outside torch.inference_mode:
            idx = idx.clone()  # copied in it, like every later token, or it compiles twice
        positions = torch.arange(cache.length, cache.length + 1, device=idx.device)  # as forward
        if on_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            # clone: a replayed CUDA graph writes its next output over this one.
            token = compiled(idx, positions, cache, temperature, top_k, top_p).clone()
        except Exception as error:  # compiling happens at the first call: fail there, go eager
            print(f"\nNote: decoding without torch.compile: it failed with "
                  f"{type(error).__name__} (see TROUBLESHOOTING.md)", flush=True)
            compiled = None
            return eager(idx, cache, temperature, top_k, top_p, generator)
        cache.length += 1  # as forward does
        return token

    model.next_token, model.new_cache = next_token, new_cache
    return True
