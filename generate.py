"""Generate text from a trained Mini-GPT checkpoint.

    python generate.py --prompt "ROMEO:" --max_new_tokens 300
    python generate.py --temperature 0 --prompt "To be"      # greedy: always the likeliest char
    python generate.py --num_samples 4                       # four samples in one batched pass
    python generate.py --interactive                         # type prompts, read continuations

Text is printed as it is generated. A KV cache (model.py) makes each new token cost one
position instead of the whole context; --no_cache runs the plain re-run-everything loop.
Two speed-ups sit on top, each a flag: int8 weights on CPUs (--dtype, the default there when
the CPU has native bf16) and, on CUDA, a compiled one-token step replayed as a CUDA graph
(--compile).
"""

import torch
import torch.nn.functional as F

from config import ArgumentParser
from model import GPTModel
from utils import (UsageError, cpu_has_native_bf16, load_checkpoint, pick_device, pick_dtype,
                   run_main, start_tokens, tokenizer_from_dict, use_compile)

RULE = "=" * 60


def parse_args(argv=None):
    parser = ArgumentParser(prog="generate.py", description="Sample text from a checkpoint.")
    parser.add_argument("--prompt", default="", help="starting text (empty: start from a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="higher = more random, lower = more predictable, 0 = greedy")
    parser.add_argument("--top_k", type=int, default=200, help="sample only among the k likeliest")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus: sample among the likeliest tokens covering this probability")
    parser.add_argument("--checkpoint", default="ckpt.pt", help="checkpoint saved by train.py")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "int8"],
                        help="number format of the weights while sampling; auto = int8 on CPUs "
                             "with native bf16 (the fastest there), bfloat16 on GPUs, else "
                             "float32; int8 is CPU only")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="torch.compile the one-token decode step (CUDA graphs on GPUs); "
                             "auto = on for CUDA, where it pays back its start-up time")
    parser.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    parser.add_argument("--num_samples", type=int, default=1, help="independent samples, batched")
    parser.add_argument("--no_cache", action="store_true", help="re-run the whole context per token")
    parser.add_argument("--interactive", action="store_true", help="prompt loop in the terminal")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 1:
        raise UsageError(f"--top_k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    return args


def load_model(path, device, dtype="float32"):
    """(model in eval mode on device, tokenizer) from a checkpoint written by train.py."""
    checkpoint = load_checkpoint(path, device)
    # SDPA whatever the model trained with: for one new position at a time it is the faster path.
    model = GPTModel(**{**checkpoint["model_args"], "flash": True})
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise UsageError(f"{path}: the weights do not match the model_args stored with them; "
                         f"the checkpoint is damaged or from another program")
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    return for_sampling(model, device, dtype), tokenizer


def for_sampling(model, device, dtype):
    """The model in eval mode on device, its weights in dtype (float32, bfloat16, float16, int8).

    Sampling reads every weight once per token, so 16-bit weights halve the bytes to move and
    8-bit ones quarter them.
    """
    if dtype == "int8":
        return quantize_int8(model, device).eval()
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def pick_sampling_dtype(name, device):
    """'auto' -> int8 weights on CPUs with native bf16 instructions, which sample about twice as
    fast as bfloat16 there (README); elsewhere the same choice as training (utils.pick_dtype)."""
    if (name == "auto" and device == "cpu" and cpu_has_native_bf16()
            and hasattr(torch, "_weight_int8pack_mm")):
        return "int8"
    return pick_dtype(name, device)


def quantize_int8(model, device):
    """The model with every Linear's weight stored as int8 (Int8Linear below); the rest
    (embeddings, LayerNorms, attention, the KV cache) stays float32.

    Weight-only: each output is the float model's output up to the weights' rounding and the
    bfloat16 inputs of the matmuls; activations are not quantized.
    """
    if device != "cpu":
        raise UsageError(f"--dtype int8 runs on the CPU only; use --device cpu, "
                         f"or --dtype bfloat16 on {device}")
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise UsageError(f"this PyTorch ({torch.__version__}) has no int8 weight-only matmul; "
                         f"use --dtype bfloat16, or PyTorch 2.3 or newer")
    model = model.float()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W kept as int8, one scale per output row: a quarter of float32's bytes.

    Why it pays: sampling one sequence multiplies a single vector by every weight matrix per
    token, so its time goes into reading the weights from memory, and fewer bytes are faster.
    """

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()  # (out_features, in_features)
        # Each row's largest |weight| maps to 127, so every row keeps 8 bits of resolution.
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x):  # (..., in_features), float32
        # The int8 kernel takes 2-D bfloat16 inputs; the rest of the model stays float32, whose
        # small CPU kernels (LayerNorm, GELU, attention) were faster here than bfloat16's.
        rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        if rows.size(0) > 8:
            # Many rows at once (a prompt, --no_cache): the matmul, not the reading, is the
            # cost, and the bfloat16 one is faster; widen the weights for it.
            y = F.linear(rows, self.weight.to(torch.bfloat16) * self.scales[:, None])
        else:
            # A few rows (one new token per sample): PyTorch's fused int8-weight kernel reads
            # the int8 weights directly and applies the scales itself.
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def compile_decode(model, device, setting="true"):
    """Send every one-new-token step of the KV-cached loop through torch.compile (setting:
    true, false, or auto = on CUDA only). Returns whether it did.

    Why: a step of the default model is ~150 small kernels; on a GPU, launching them one by one
    from Python costs far more than running them. A one-token step always has the same shapes
    (model.py's cache is a fixed-size buffer, the position a tensor), so one compiled graph
    serves every step, and on CUDA mode "reduce-overhead" records it as a CUDA graph that is
    replayed with a single launch. Prompts (a different length each time) stay eager. Compiling
    takes tens of seconds, so on a CPU, where the step is not launch-bound, it is off by default.
    Where torch.compile cannot work, it prints why and leaves the model as it was.
    """
    if not use_compile(setting, device, "decoding"):
        return False
    on_cuda = device.startswith("cuda")
    compiled = torch.compile(model.logits, mode="reduce-overhead" if on_cuda else None,
                             fullgraph=True, dynamic=False)
    eager, caches = model.logits, {}

    def new_cache(batch_size):
        # One cache per batch size, reused: the compiled graph is tied to these buffers, and a
        # CUDA graph may update them in place only if their addresses never change.
        if batch_size not in caches:
            caches[batch_size] = GPTModel.new_cache(model, batch_size)
            torch._dynamo.mark_static_address(caches[batch_size].keys)
            torch._dynamo.mark_static_address(caches[batch_size].values)
        caches[batch_size].reset()
        return caches[batch_size]

    def logits(idx, positions, cache=None):
        nonlocal compiled
        if compiled is None or cache is None or idx.size(1) != 1:
            return eager(idx, positions, cache)
        if on_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            # clone: a replayed CUDA graph writes its next output over this one.
            return compiled(idx, positions, cache).clone()
        except Exception as error:  # compiling happens at the first call: fail there, go eager
            print(f"\nNote: decoding without torch.compile: it failed with "
                  f"{type(error).__name__} (see TROUBLESHOOTING.md)", flush=True)
            compiled = None
            return eager(idx, positions, cache)

    # forward() and stream() call these through the instance, so they now take the compiled path.
    model.logits, model.new_cache = logits, new_cache
    return True


def stream_text(model, tokenizer, prompt_ids, args, device):
    """Yield the generated text piece by piece; the pieces join to the full decoded sample."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new_tokens, shown = [], ""
    for token in model.stream(idx, args.max_new_tokens, **sampling_options(args)):
        new_tokens.append(token.item())
        text = tokenizer.decode(new_tokens)
        if text.endswith("\ufffd"):  # BPE: a character cut between tokens; wait for the rest
            continue
        yield text[len(shown):]
        shown = text
    yield tokenizer.decode(new_tokens)[len(shown):]


def generate_batch(model, tokenizer, prompt_ids, args, device):
    """num_samples continuations of the same prompt in one batched pass: a list of strings."""
    idx = torch.tensor([prompt_ids] * args.num_samples, dtype=torch.long, device=device)
    tokens = model.generate(idx, args.max_new_tokens, **sampling_options(args))
    return [tokenizer.decode(row.tolist()) for row in tokens[:, len(prompt_ids):]]


def sampling_options(args):
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                use_cache=not args.no_cache)


def prompt_ids_for(prompt, tokenizer):
    return tokenizer.encode(prompt) if prompt else start_tokens(tokenizer)


def print_completion(model, tokenizer, prompt, args, device):
    prompt_ids = prompt_ids_for(prompt, tokenizer)
    if args.num_samples == 1:
        print(prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, prompt_ids, args, device):
            print(piece, end="", flush=True)
        print()
        return
    for i, sample in enumerate(generate_batch(model, tokenizer, prompt_ids, args, device)):
        print(f"--- sample {i + 1} of {args.num_samples} ---")
        print(prompt + sample)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    model, tokenizer = load_model(args.checkpoint, device, pick_sampling_dtype(args.dtype, device))
    compile_decode(model, device, args.compile)
    torch.manual_seed(args.seed)

    if args.interactive:
        print("Type a prompt and press Enter; an empty line or Ctrl-D quits.")
        while True:
            try:
                prompt = input("> ")
            except EOFError:
                break
            if not prompt:
                break
            try:
                print_completion(model, tokenizer, prompt, args, device)
            except UsageError as err:  # e.g. a character the model never saw: ask again
                print(f"error: {err}")
        return

    tokenizer.encode(args.prompt)  # fail on unknown characters before printing anything
    print("GENERATING TEXT")
    print(RULE)
    print(f"Prompt: {args.prompt}")
    print(f"Max tokens: {args.max_new_tokens}")
    print(f"Temperature: {args.temperature}")
    print(f"Top-k: {args.top_k}")
    if args.top_p is not None:
        print(f"Top-p: {args.top_p}")
    print(RULE)
    print()
    print_completion(model, tokenizer, args.prompt, args, device)


if __name__ == "__main__":
    run_main(main)
