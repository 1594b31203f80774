"""Look inside a trained Mini-GPT: what it expects next, where its heads look, and how its
characters arrange themselves in embedding space (docs/look_inside.md shows the pictures).

    python explore.py --checkpoint ckpt.pt --prompt "ROMEO:"
    python explore.py --checkpoint ckpt.pt --prompt "To be, or not to be" --top_k 3 --out look/
    python explore.py --serve    # the same views live in a browser, as you type (explore_server.py)

One forward pass over the prompt prints the next-token table and, with matplotlib, draws into
--out (default: <checkpoint>.explore/) attention.png, every head's (T, T) weights, where above
the diagonal all is 0, the causal mask at work; and embeddings.png, the token embeddings
(vocab_size, n_embd) projected onto their two principal components (PCA).
"""

import startup

startup.load_torch(__name__)  # first: Ctrl-C while it loads exits at once

import functools
import math
import os
import unicodedata
import warnings

import torch
import torch.nn.functional as F

from checkpoint import check_outputs_spare_inputs, check_replaceable, check_writable, make_folders, png_tagged
from config import ArgumentParser, check_each
from generate import load_model
from tracking import matplotlib_or_note, pyplot, save_png
from utils import UsageError, pick_device, run_main, tmp_path_for

SHOWN = {" ": "␣", "\n": "↵", "\t": "⇥"}  # whitespace, drawn so that it can be seen
LABEL_SIZE = 12  # points, for the characters in embeddings.png
PICTURE_TAG = {"Software": "Mini-GPT explore.py"}  # in each PNG: --out replaces only these
KIND_COLOURS = {"vowel": "tab:red", "consonant": "tab:blue", "capital": "tab:green",  # kind_of
                "letter, no case": "tab:cyan", "punctuation": "tab:orange",
                "space, newline": "tab:purple", "digit": "tab:brown", "other": "tab:olive",
                "longer token": "tab:gray", "byte": "tab:pink"}


def parse_args(argv=None):
    parser = ArgumentParser(prog="explore.py", description="Look inside a trained checkpoint: "
                            "next-token table, attention maps, embeddings.")
    flag = parser.add_argument
    flag("--checkpoint", default="ckpt.pt", help="checkpoint saved by train.py (default: ckpt.pt)")
    flag("--weights", default="best", choices=["best", "last"],
         help="best: the weights of the run's lowest val loss; last: its last step's")
    flag("--prompt", help="the text to look at (default: ROMEO:)")
    flag("--top_k", type=int, help="guesses shown per position (default: 5)")
    flag("--out", help="folder for the PNGs (default: <checkpoint>.explore/)")
    flag("--device", default="cpu", help="cpu (the default: enough for one prompt), cuda, mps")
    flag("--serve", action="store_true",
         help="start a local web page that shows all of this live as you type")
    flag("--port", type=int, help="--serve: the port (default: the first free one from 8000)")
    flag("--host", help="--serve: the address to listen on (default: 127.0.0.1, this machine "
         "only; 0.0.0.0 lets other machines in)")
    flag("--compare", metavar="OTHER.pt",
         help="--serve: a second checkpoint (same tokenizer) shown side by side")
    args = parser.parse_args(argv)
    # The defaults are filled in below, once it is known which flags were given: a flag that
    # does not apply (--prompt to the page, which takes what you type) is refused, not ignored.
    misplaced = [name for name in (("prompt", "top_k", "out") if args.serve else
                                   ("port", "host", "compare")) if getattr(args, name) is not None]
    if misplaced and not args.serve:
        raise UsageError("--port, --host and --compare belong to --serve; add --serve")
    if misplaced:
        raise UsageError(f"--{misplaced[0]} does not apply to --serve (the page looks at what "
                         f"you type and saves no pictures); drop --{misplaced[0]}, or --serve")
    for name in ("checkpoint", "out", "host", "compare"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise UsageError(f"--{name} must not be empty; give a value, or leave the flag out")
    args.prompt = "ROMEO:" if args.prompt is None else args.prompt
    args.top_k = 5 if args.top_k is None else args.top_k
    args.host = args.host or "127.0.0.1"
    check_each(args, ("port",), lambda port: port is None or 0 <= port <= 65535,
               "from 1 to 65535 (0: any free port)")
    if not args.prompt:
        raise UsageError('--prompt is empty; give the text to look at, e.g. --prompt "ROMEO:"')
    check_each(args, ("top_k",), lambda top_k: top_k >= 1, "at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.serve:  # the live page: explore_server.py
        from explore_server import serve
        return serve(args, device)
    model, tokenizer, which = load_model(args.checkpoint, device, weights=args.weights)
    prompt_ids = tokenizer.encode(args.prompt)  # UsageError for characters the model never saw
    if len(prompt_ids) > model.block_size:
        raise UsageError(f"the prompt is {len(prompt_ids)} tokens, longer than this model's "
                         f"block_size {model.block_size}; shorten it to at most {model.block_size}")
    # Where the pictures go is checked before any work, as every flag is.
    pictures = picture_paths(args.out, args.checkpoint) if matplotlib_or_note("pictures") else None
    print(f"{args.checkpoint}, {args.weights} weights: {which}\n")
    probs, attention = look_inside(model, prompt_ids)
    token_text = [readable(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)]
    print_next_token_table(probs, prompt_ids, token_text, min(args.top_k, tokenizer.vocab_size))
    if pictures is None:
        return
    attention_png, embeddings_png = pictures
    draw_attention(attention, [token_text[i] for i in prompt_ids], attention_png)
    draw_embeddings(model.tok_emb.weight.detach().cpu(), token_text, prompt_ids, embeddings_png)
    print(f"\nAttention maps: {attention_png}\nEmbeddings:     {embeddings_png}")


# ---------------------------------------------------------------------------------------------
# One forward pass, keeping what the model computed along the way

@torch.inference_mode()
def look_inside(model, prompt_ids, cache=None, start=0):
    """(next-token probabilities (T, V), attention weights (n_layer, n_head, T, start + T)), on
    the CPU, of prompt_ids (T tokens) at positions start.., the KV cache holding 0..start-1
    (explore_server.py: the prompt before the newly typed characters). Either attention path
    will do: a hook catches each layer's queries, and the weights are computed again from them
    and the keys the model put in the cache."""
    if cache is None:
        cache = model.new_cache(batch_size=1)
    end, (n_layer, _, n_head, _, head_size) = start + len(prompt_ids), cache.keys.shape
    if not prompt_ids:  # nothing new to run (explore_server.py: a character deleted at the end)
        return torch.zeros(0, model.lm_head.out_features), torch.zeros(n_layer, n_head, 0, end)
    cache.length = start  # the positions after start are overwritten: the cache is exact to here
    qkv_outputs = []  # each layer's (1, T, 3C)
    hooks = [block.attn.qkv.register_forward_hook(lambda module, args, out: qkv_outputs.append(out))
             for block in model.blocks]
    try:
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=cache.keys.device)
        logits, _ = model(idx, cache=cache)  # (1, T, V)
    finally:
        for hook in hooks:
            hook.remove()
    may_look = torch.ones(len(prompt_ids), end, dtype=torch.bool, device=idx.device).tril(start)
    q = torch.cat(qkv_outputs)[..., :n_head * head_size]  # every layer's queries (n_layer, T, C)
    q = q.view(n_layer, -1, n_head, head_size).transpose(1, 2)  # (n_layer, nh, T, hs)
    keys = cache.keys[:, 0, :, :end]  # (n_layer, nh, end, hs)
    scores = (q @ keys.transpose(-2, -1)).float() / math.sqrt(head_size)  # (n_layer, nh, T, end)
    attention = F.softmax(scores.masked_fill(~may_look, float("-inf")), dim=-1)
    return F.softmax(logits[0].float(), dim=-1).cpu(), attention.cpu()


def readable(text):
    """A token's text with whitespace made visible, 'a b\\n' -> 'a␣b↵', and other control
    characters (BPE's byte tokens) written as escapes, '\\x1b', so they cannot upset a terminal."""
    return "".join(SHOWN.get(ch, ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in text)


# ---------------------------------------------------------------------------------------------
# The next-token table

def next_token_rows(probs, prompt_ids, top_k):
    """Per position t: (the token at t, the token that came next or None at the end, the
    probability the model gave it, [(token, probability)] of its top_k guesses)."""
    top_probs, top_ids = probs.topk(top_k, dim=-1)  # (T, top_k) each
    rows = []
    for t, (token, actual) in enumerate(zip(prompt_ids, prompt_ids[1:] + [None])):
        p_actual = probs[t, actual].item() if actual is not None else None
        guesses = list(zip(top_ids[t].tolist(), top_probs[t].tolist()))
        rows.append((token, actual, p_actual, guesses))
    return rows


def print_next_token_table(probs, prompt_ids, token_text, top_k):
    rows = next_token_rows(probs, prompt_ids, top_k)
    width = max(5, max(len(text) for text in token_text))
    print(f"After each token of the prompt, the model's {top_k} likeliest next tokens "
          f"(␣ = space, ↵ = newline):\n")
    print(f"{'pos':>4}  {'token':<{width}}  {'next':<{width}}  {'p(next)':>7}   "
          f"top {top_k} guesses")
    for t, (token, actual, p_actual, guesses) in enumerate(rows):
        next_text = token_text[actual] if actual is not None else "-"
        p_text = f"{p_actual:.3f}" if p_actual is not None else "-"
        shown = "  ".join(f"{token_text[i]:<{width}} {p:.3f}" for i, p in guesses)
        print(f"{t:>4}  {token_text[token]:<{width}}  {next_text:<{width}}  {p_text:>7}   {shown}")
    p_actuals = torch.tensor([row[2] for row in rows[:-1]])
    if len(p_actuals):
        print(f"\nThe tokens that really came next: mean probability {p_actuals.mean():.3f}, "
              f"loss {-p_actuals.log().mean():.3f} nats per token (mean -log p, as val loss)")


# ---------------------------------------------------------------------------------------------
# The pictures (matplotlib is imported only here, as an optional extra)

def picture_paths(out, checkpoint):
    """(attention.png, embeddings.png) in their folder, created, once it is proven that both can
    be written there, over neither the checkpoint nor a file explore.py did not draw."""
    folder = out or checkpoint + ".explore"
    try:
        make_folders(folder)
    except OSError as err:
        raise UsageError(f"cannot create the output folder {folder} ({err.strerror}); "
                         f"pass --out DIR to a folder you can write")
    pictures = [os.path.join(folder, name) for name in ("attention.png", "embeddings.png")]
    check_outputs_spare_inputs(dict.fromkeys(pictures, "the picture"),
                               {checkpoint: "the --checkpoint"}, "pass another --out")
    for picture in pictures:
        try:
            open(tmp_path_for(picture), "wb").close()  # a file can be written in the folder
            os.remove(tmp_path_for(picture))
            if os.path.isdir(picture):
                raise IsADirectoryError(21, "a folder of that name is in the way")
        except OSError as err:
            raise UsageError(f"cannot write {picture} ({err.strerror}); pass --out DIR to a "
                             f"folder you can write") from None
        check_writable(picture, picture, "pass another --out")
        if out or not os.path.islink(picture):  # a link in the default folder: replaced
            check_replaceable(picture, "--out" if out else "the picture", "explore.py",
                              lambda path: png_tagged(path, PICTURE_TAG),
                              None if out else "pass --out DIR for the pictures")
    return pictures


def save_picture(figure, path):
    """Save figure as path, whole or not at all (tracking.save_png: a link there is replaced,
    never written through; a full disk leaves the earlier picture as it was), and close it."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save_png(figure, path, PICTURE_TAG)
        for warning in caught:  # matplotlib warns once per character its font lacks: one note
            if "missing from font" in str(warning.message):
                note_missing_glyphs()
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename,
                                     warning.lineno)
    except OSError as err:
        raise UsageError(f"cannot write {path} ({err.strerror or err}); free some disk space, "
                         f"or pass --out DIR to a folder you can write") from None
    finally:
        pyplot().close(figure)


@functools.cache  # once a run, whatever the number of pictures and characters
def note_missing_glyphs():
    print("Note: matplotlib's font lacks some of these characters, so the pictures show them as "
          "empty boxes; the live page (explore.py --serve) draws them with the browser's fonts")


def draw_attention(attention, labels, path):
    """Save the (n_layer, n_head, T, T) weights as a grid of layers x heads. The prompt's
    tokens label the left column's rows and the bottom row's columns."""
    n_layer, n_head, T, _ = attention.shape
    panel = min(3.5, max(1.6, 0.14 * T))  # inches per head: room for T labels, within reason
    figure, axes = pyplot().subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True,
                                     figsize=(panel * n_head + 1.5, panel * n_layer + 0.7),
                                     layout="constrained")
    ticks = list(range(0, T, -(-T // 40)))  # at most 40 labels per axis
    tick_labels = [labels[t] for t in ticks]
    fontsize = max(5.0, min(11.0, 0.8 * 72 * panel / len(ticks)))  # 4/5 of a row's height
    for layer in range(n_layer):
        for head in range(n_head):
            image = axes[layer][head].imshow(attention[layer, head].numpy(), cmap="Blues",
                                             vmin=0.0, vmax=1.0, interpolation="nearest")
            axes[layer][head].tick_params(length=0, pad=1.5, labelsize=fontsize)
        axes[layer][0].set_yticks(ticks, tick_labels)
        axes[layer][0].set_ylabel(f"layer {layer}", fontsize=11)
    for head in range(n_head):
        axes[0][head].set_title(f"head {head}", fontsize=11)
        axes[-1][head].set_xticks(ticks, tick_labels,
                                  rotation=90 if any(len(t) > 1 for t in tick_labels) else 0)
    figure.suptitle("Attention weights of the prompt. Row: the position that looks (query); "
                    "column: the position it looks at (key). ␣ space, ↵ newline", fontsize=12)
    figure.colorbar(image, ax=axes, shrink=0.5, pad=0.01, label="weight (each row sums to 1)")
    save_picture(figure, path)


def embedding_pca(weight):
    """Project the rows of weight (V, C) onto their two principal components: (coordinates
    (V, 2), the fraction of the variance each component explains (2,))."""
    centred = weight.float() - weight.float().mean(dim=0)
    _, singular_values, directions = torch.linalg.svd(centred, full_matrices=False)
    variance = singular_values ** 2
    # A vocabulary of one token, or n_embd 1, has fewer than two components: pad with zeros.
    missing = 2 - len(variance[:2])
    return (F.pad(centred @ directions[:2].T, (0, missing)),
            F.pad(variance[:2] / variance.sum().clamp_min(1e-30), (0, missing)))


def kind_of(text):
    """The group a token is coloured by in embeddings.png (and on the live page), by Unicode,
    so that é is a vowel like e, and a Chinese character a letter, not punctuation."""
    if text == "\ufffd" or (text.startswith("\\x") and len(text) == 4):
        return "byte"  # BPE: part of a character, or a control character
    if len(text) != 1:
        return "longer token"
    category = unicodedata.category(text)  # "Ll" lower-case letter, "Lo" other letter, "Po", ...
    base = unicodedata.normalize("NFD", text)[0]  # é -> e + accent: the letter without accents
    fits = {"vowel": text.islower() and base in "aeiouαεηιουω", "consonant": text.islower(),
            "capital": text.isupper(), "letter, no case": category[0] == "L",  # 中, あ, ب
            "space, newline": text in SHOWN.values() or text.isspace(), "digit": text.isdigit(),
            "punctuation": category[0] in "PS"}  # symbols too ($, +): they read as punctuation
    return next((kind for kind, fit in fits.items() if fit), "other")  # the first that fits


def draw_embeddings(weight, token_text, prompt_ids, path):
    """Save the token embeddings (V, C), projected to 2-D, as labelled points. A vocabulary of
    characters (up to 128 tokens) gets every point labelled; a bigger one (BPE), only the
    prompt's tokens, which would otherwise drown in the crowd."""
    label_all = len(token_text) <= 128
    labelled = range(len(token_text)) if label_all else sorted(set(prompt_ids))
    coords, explained = embedding_pca(weight)
    figure, ax = pyplot().subplots(figsize=(10, 8.5))
    kinds = [kind_of(text) for text in token_text]
    for kind, colour in KIND_COLOURS.items():
        members = [i for i, k in enumerate(kinds) if k == kind]
        if members:
            ax.scatter(coords[members, 0], coords[members, 1], s=12, color=colour, label=kind)
    ax.set_xlabel(f"first principal component ({100 * explained[0]:.0f}% of the variance)")
    ax.set_ylabel(f"second principal component ({100 * explained[1]:.0f}% of the variance)")
    ax.set_title("Token embeddings projected to 2-D (PCA). ␣ space, ↵ newline"
                 + ("" if label_all else "; labelled: the prompt's tokens"))
    ax.legend(loc="best", fontsize=10)
    ax.grid(alpha=0.2)
    ax.margins(0.06)
    figure.tight_layout()  # fixes where the points land, so the labels can be placed
    offsets = label_offsets(ax, coords[labelled], [token_text[i] for i in labelled])
    for i, offset in zip(labelled, offsets):
        colour = KIND_COLOURS[kinds[i]]
        # A framed label, so that a lone "." or "," is as easy to find as a letter.
        ax.annotate(token_text[i], (coords[i, 0], coords[i, 1]), xytext=offset,
                    textcoords="offset points", fontsize=LABEL_SIZE, fontweight="bold",
                    color=colour, va="bottom", bbox=dict(boxstyle="round,pad=0.15", alpha=0.9,
                    facecolor="white", edgecolor=colour, linewidth=0.8))
    save_picture(figure, path)


def label_offsets(ax, coords, texts):
    """(dx, dy) in points for each point's label: just right of the point, pushed further right
    while its box would cover a label placed before it (points close together, like a and A)."""
    points = ax.transData.transform(coords.numpy()) * 72 / ax.figure.dpi  # (V, 2), in points
    placed, offsets = [], [None] * len(texts)
    for i in sorted(range(len(texts)), key=lambda i: points[i][0]):
        width, height = 0.75 * LABEL_SIZE * len(texts[i]) + 5, LABEL_SIZE + 5  # text and frame
        left, bottom = points[i][0] + 4, points[i][1] + 2
        while any(left < right and other_left < left + width and bottom < top
                  and other_bottom < bottom + height
                  for other_left, other_bottom, right, top in placed):
            left += 3
        placed.append((left, bottom, left + width, bottom + height))
        offsets[i] = (left - points[i][0], bottom - points[i][1])
    return offsets


if __name__ == "__main__":
    run_main(main)
