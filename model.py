"""The GPT model: a decoder-only Transformer. Its shape (GPTConfig) comes first, then the
pieces built from it (attention, feed-forward, block), then GPTModel, which puts them together
in the order data flows through the tree:

    GPTModel                                           in this file
    ├── Token Embedding (vocab_size → n_embd)          GPTModel.tok_emb
    ├── Position Embedding (block_size → n_embd)       GPTModel.pos_emb
    ├── Transformer Blocks (× n_layer)                 Block
    │   ├── LayerNorm                                  Block.ln1
    │   ├── Multi-Head Self-Attention                  CausalSelfAttention
    │   │   ├── Q, K, V Projections                    .qkv
    │   │   ├── Causal Masking (torch.tril)            .causal_mask
    │   │   └── Output Projection                      .proj
    │   ├── Residual Connection                        x = x + attn(ln1(x))
    │   ├── LayerNorm                                  Block.ln2
    │   ├── Feed-Forward Network (n_embd → 4×n_embd → n_embd)   FeedForward
    │   └── Residual Connection                        x = x + ffn(ln2(x))
    ├── Final LayerNorm                                GPTModel.ln_f
    └── Language Model Head (n_embd → vocab_size)      GPTModel.lm_head

After the model come the two things generation needs: sampling one token from the logits, and
the KV cache that makes each new token cost one position instead of the whole context.
Shapes use B = batch size, T = sequence length, C = n_embd, V = vocab_size. Nothing here knows
about files, flags, training or the speed-ups (speedups.py): see train.py and generate.py.

    python model.py        # the tree above with each box's parameters and output shape
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """The model's shape; checkpoints keep it as a plain dict (asdict) under "model_args"."""
    vocab_size: int  # V: tokens the model knows (65 characters for Tiny Shakespeare)
    n_embd: int = 384  # C: the width of the residual stream
    n_layer: int = 6  # Transformer blocks
    n_head: int = 6  # attention heads per block, each on n_embd // n_head of the width
    block_size: int = 256  # the longest context, in tokens
    dropout: float = 0.2  # while training; eval() turns it off
    flash: bool = True  # attention through F.scaled_dot_product_attention (same maths, fused)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees only positions 0..t."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.flash = config.flash  # SDPA instead of the written-out maths
        self.dropout = config.dropout
        # Q, K, V projections as one matmul: a (C, 3C) weight instead of three (C, C) ones.
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # causal_mask[i, j] is added to the score of query position i for key position j: 0
        # where i may look at j (j <= i, the lower triangle), -inf where it may not, so that
        # the softmax gives every future key the weight exp(-inf) = 0.
        T = config.block_size
        may_look = torch.tril(torch.ones(T, T, dtype=torch.bool))
        causal_mask = torch.zeros(T, T).masked_fill(~may_look, float("-inf"))
        self.register_buffer("causal_mask", causal_mask, persistent=False)

    def forward(self, x, positions, layer_cache=None):
        # x: (B, T, C). positions: (T,), where x's tokens sit in the sequence: 0..T-1 in
        # training; they start later only when generating with a KV cache (layer_cache).
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends on its own slice of C.
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        if layer_cache is not None:
            # Generating: store k, v in the KVCache at their positions, then attend over all its
            # slots, the earlier tokens' keys and values too: k, v grow from T to block_size.
            cached_keys, cached_values = layer_cache  # (B, nh, block_size, hs) each
            k = cached_keys.index_copy_(2, positions, k)  # in place: into KVCache's buffer (a view)
            v = cached_values.index_copy_(2, positions, v)
        if not self.flash:
            # Scale by 1/sqrt(head_size) so the dot products keep unit variance and the
            # softmax does not saturate into a one-hot as head_size grows. (Scaling q (T, hs)
            # rather than the scores (T, Tk) is the same maths on fewer numbers.)
            scores = (q / math.sqrt(k.size(-1))) @ k.transpose(-2, -1)  # (B, nh, T, Tk)
            scores = scores + self.mask_for(positions, k)  # future keys' scores become -inf
            attn_weights = F.softmax(scores, dim=-1)  # row i: how much query i takes from each key
            y = self.attn_dropout(attn_weights) @ v  # (B, nh, T, head_size): a weighted mean
        else:
            # The same maths in one fused kernel (FlashAttention on GPUs), which never
            # materialises the (T, Tk) weights; in training is_causal stands in for the mask.
            mask = self.mask_for(positions, k) if layer_cache is not None else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(y))

    def mask_for(self, positions, keys):
        """The causal mask's rows for the queries' positions, over every key there is: (T, Tk).
        In training positions are 0..T-1 and there are T keys: causal_mask[:T, :T]. With a KV
        cache Tk = block_size, and the empty slots lie after every query's position, so the same
        mask hides them. In the keys' dtype (autocast's, if on)."""
        return self.causal_mask[positions, :keys.size(2)].to(keys.dtype)


class FeedForward(nn.Module):
    """Position-wise MLP: n_embd -> 4*n_embd -> n_embd, applied to each token on its own."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """One Transformer block, Pre-LN: normalise *before* each sub-layer, add its output back."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffn = FeedForward(config)

    def forward(self, x, positions, layer_cache=None):
        # The residual stream x passes through untouched; each sub-layer only adds to it,
        # which gives gradients a straight path from the loss to the first layer.
        x = x + self.attn(self.ln1(x), positions, layer_cache)
        x = x + self.ffn(self.ln2(x))
        return x


class GPTModel(nn.Module):
    """Token ids in, next-token logits out: the tree in this file's docstring, top to bottom."""

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd {config.n_embd} must be divisible by n_head {config.n_head}")
        self.config = config
        self.block_size = config.block_size
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        # Small normal weights (std 0.02, as GPT-2) keep the first logits near zero, so the
        # step-0 loss is close to ln(vocab_size): every token equally likely. (The LayerNorms
        # keep PyTorch's start: gain 1, bias 0.)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2: scale the layers that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth (two such writes per block).
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets given.
        With a cache (generation), idx holds the tokens that follow the cached ones."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)
        logits = self.logits(idx, positions, cache)
        if cache is not None:
            cache.length += T
        if targets is None:
            return logits, None
        # Flatten to (B*T, V) against (B*T,); in float32, since logits are bf16 under autocast.
        # (reshape for targets: a batch sliced from a longer window is not contiguous.)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def logits(self, idx, positions, cache=None):
        """idx (B, T) at positions (T,) -> logits (B, T, V): the tree at the top of this file.
        Only tensors go in, so speedups.compile_decode can compile this once for every step."""
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, positions, cache.layer(layer) if cache is not None else None)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    @torch.inference_mode()  # no autograd bookkeeping while sampling
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               use_cache=True, generator=None):
        """Yield the next token ids, (B,), one step at a time, continuing idx (B, T).

        Without a cache every step re-runs the last block_size tokens (as in nanoGPT); with one,
        the prompt runs once (prefill), then each step one position. Position embeddings stop
        at block_size - 1, so a full cache starts again. With block_size 8 and a 6-token
        prompt: the prompt fills positions 0-5, the next two tokens 6 and 7; the token after
        them would need position 8, so the last 4 tokens (block_size // 2) run again as a fresh
        prefill at positions 0-3, and the steps go on from 4. Up to block_size tokens the two
        paths are identical; past it the cached one sees 4 to 8 tokens, the cropped one 8.
        """
        cache = self.new_cache(idx.size(0)) if use_cache else None
        next_input = idx[:, -self.block_size:]
        for _ in range(max_new_tokens):
            if cache is not None and cache.length + next_input.size(1) > self.block_size:
                # Start the cache again from the last half window; the older keys left in the
                # later slots lie past the new positions, so the causal mask hides them.
                cache.length = 0  # (at least 1 token: with block_size 1, -0: would be all of idx)
                next_input = idx[:, -max(1, self.block_size // 2):]
            next_token = self.next_token(next_input, cache, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            next_input = next_token[:, None] if cache is not None else idx[:, -self.block_size:]
            yield next_token

    def next_token(self, idx, cache, temperature, top_k, top_p, generator):
        """One step of stream: run idx (B, T), after the cached positions if there is a cache,
        and draw the next token (B,) from the last position's logits. (On CUDA, by default,
        speedups.compile_decode swaps in one compiled graph of this step; on a CPU this runs.)"""
        logits, _ = self(idx, cache=cache)
        return sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)

    def generate(self, idx, max_new_tokens, **sampling):
        """Return idx (B, T) extended by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new_tokens = [token[:, None] for token in self.stream(idx, max_new_tokens, **sampling)]
        return torch.cat([idx, *new_tokens], dim=1)

    def new_cache(self, batch_size):
        """An empty KVCache for batch_size sequences, on the model's device, in its dtype."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)


# ---------------------------------------------------------------------------------------------
# Generation: pick a token from the logits; remember keys and values between steps

def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, V). temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        # Keep the k most likely tokens; everything below the k-th logit gets probability 0.
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probabilities sum to top_p.
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    # The random draw, token i with probability probs[i]: what torch.multinomial(probs, 1) does
    # inside (the same token from the same random numbers), written out to skip its check of
    # the probabilities, which a GPU would stop for at every token. Each token gets a random
    # time E_i / probs[i], E_i ~ Exponential(1), and the earliest wins (the largest
    # probs[i] / E_i): of such times, token i's is the earliest with probability probs[i].
    E = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / E).argmax(dim=-1)  # the earliest time E_i / probs[i]


class KVCache:
    """Keys and values of every layer for the positions processed so far: fixed-size buffers
    (n_layer, B, n_head, block_size, head_size) of which the first `length` positions are filled.

    Why it is exact: in a causal model the key and value of position t depend only on tokens
    0..t, so once computed they never change: a new token needs only its own query, key and
    value; the older keys and values are read back from here.
    Why fixed-size: attention always runs over all block_size slots, the causal mask hiding
    those after each position, so the shapes never change from one token to the next and one
    compiled decode step serves every position (speedups.compile_decode).
    """

    def __init__(self, config, batch_size, device, dtype):
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # how many positions are filled; 0 starts the cache again

    def layer(self, index):  # one layer's keys and values, (B, n_head, block_size, head_size)
        return self.keys[index], self.values[index]


# ---------------------------------------------------------------------------------------------
# python model.py: the architecture tree with parameter counts and output shapes

def describe(model, batch_size=64):
    """Lines of the architecture tree for a (batch_size, block_size) batch of token ids: each
    box with its parameter count and the shape of what it outputs, from a real forward pass."""
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items() if name}  # all but the model
    shapes = {}  # module name -> shape of its output at its first call

    def remember_shape(module, inputs, output):  # PyTorch calls it after the module's forward
        shapes.setdefault(names[module], tuple(output.shape))  # (returning None keeps the output)

    hooks = [module.register_forward_hook(remember_shape) for module in names]
    with torch.no_grad():
        logits, _ = model(torch.zeros((batch_size, model.block_size), dtype=torch.long))
    for hook in hooks:
        hook.remove()
    shapes[""] = tuple(logits.shape)
    shapes["causal_mask (buffer)"] = tuple(model.blocks[0].attn.causal_mask.shape)
    n_embd, n_layer = model.config.n_embd, model.config.n_layer
    boxes = [  # (box of the tree, the module it is, the module whose output it shows)
        ("GPTModel", "", ""),
        ("├── Token Embedding (vocab_size → n_embd)", "tok_emb", "tok_emb"),
        ("├── Position Embedding (block_size → n_embd)", "pos_emb", "pos_emb"),
        (f"├── Transformer Blocks (× {n_layer})", "blocks", f"blocks.{n_layer - 1}"),
        ("│   ├── LayerNorm", "blocks.0.ln1", "blocks.0.ln1"),
        ("│   ├── Multi-Head Self-Attention", "blocks.0.attn", "blocks.0.attn"),
        ("│   │   ├── Q, K, V Projections", "blocks.0.attn.qkv", "blocks.0.attn.qkv"),
        ("│   │   ├── Causal Masking (torch.tril)", "causal_mask (buffer)", "causal_mask (buffer)"),
        ("│   │   └── Output Projection", "blocks.0.attn.proj", "blocks.0.attn.proj"),
        ("│   ├── Residual Connection", "x + attn(ln1(x))", "blocks.0.attn"),
        ("│   ├── LayerNorm", "blocks.0.ln2", "blocks.0.ln2"),
        (f"│   ├── Feed-Forward Network ({n_embd} → {4 * n_embd} → {n_embd})", "blocks.0.ffn",
         "blocks.0.ffn"),
        ("│   └── Residual Connection", "x + ffn(ln2(x))", "blocks.0"),
        ("├── Final LayerNorm", "ln_f", "ln_f"),
        ("└── Language Model Head (n_embd → vocab_size)", "lm_head", "lm_head")]

    def count(name):  # 0 for the boxes that are no module: the mask, the residual additions
        return sum(p.numel() for p in modules[name].parameters()) if name in modules else 0

    lines = [f"{'box':<54} {'module':<22} {'parameters':>12}  output shape"]
    lines += [f"{box:<54} {name:<22} {count(name):>12,}  {str(shapes[shown])}"
              for box, name, shown in boxes]
    top_level = sum(count(name) for name in ("tok_emb", "pos_emb", "blocks", "ln_f", "lm_head"))
    lines.append(f"total of the five top-level boxes: {top_level:,} parameters "
                 f"(each of the {n_layer} blocks: {count('blocks.0'):,})")
    return lines


if __name__ == "__main__":
    from config import ArgumentParser, Config, check_config
    from runs import param_count
    from utils import UsageError, check_fits_in_memory, run_main

    def main():
        parser = ArgumentParser(prog="model.py", description="Print the architecture tree with "
                                "parameter counts and output shapes (vocab_size 65: Tiny "
                                "Shakespeare's).")
        shape = GPTConfig(vocab_size=65, dropout=0.0)  # the default model
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "block_size", "batch_size"):
            parser.add_argument(f"--{name}", type=int, default=getattr(shape, name, 64))  # batch 64
        args = vars(parser.parse_args())
        V, B = args.pop("vocab_size"), args.pop("batch_size")
        check_config(Config(**args, batch_size=B))  # train.py's checks (its vocab_size is BPE's)
        if V < 1:
            raise UsageError(f"--vocab_size must be at least 1, got {V}")
        C, L, T = args["n_embd"], args["n_layer"], args["block_size"]
        # The weights, each block's (T, T) mask, a forward pass's logits and widest activations.
        n_bytes = 4 * (param_count(V, C, L, T) + L * T * T + B * T * (V + 4 * C))
        check_fits_in_memory(n_bytes, "cpu", "this model", "lower --n_embd, --n_layer, "
                             "--block_size, --vocab_size or --batch_size")
        print("\n".join(describe(GPTModel(replace(shape, vocab_size=V, **args)).eval(), B)))

    run_main(main)
