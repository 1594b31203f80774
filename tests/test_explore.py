"""Looking inside: `python model.py`'s tree adds up and shows real shapes; explore.py's
next-token table, attention maps and embeddings are what the model computes; every bad input
is one clear line; --eval_sample_tokens shows samples during training and changes nothing else."""

import json
import math
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import explore
import tracking
import train
from checkpoint import save_checkpoint
from config import Config
from conftest import TINY_FLAGS, TINY_TEXT, run_script, tiny_model
from generate import load_model
from model import GPTConfig, GPTModel, describe
from tokenizer import CharTokenizer
from utils import run_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- python model.py: the architecture tree --------------------------------------------------

ROW = re.compile(r"^(?P<box>.{54}) (?P<module>.{22}) +(?P<params>[\d,]+)  (?P<shape>\(.*\))$")


def tree_rows(lines):
    """{module column: (parameters, shape)} of describe()'s rows, and the total line's count."""
    rows = {}
    for line in lines[1:-1]:
        match = ROW.match(line)
        assert match, f"row not in the tree's format: {line!r}"
        module = match["module"].strip()
        assert module not in rows, f"two rows for {module!r}"
        rows[module] = (int(match["params"].replace(",", "")), match["shape"])
    total = int(re.search(r"([\d,]+) parameters", lines[-1])[1].replace(",", ""))
    return rows, total


def test_tree_of_the_default_model_adds_up_to_its_parameter_count():
    model = GPTModel(GPTConfig(vocab_size=65, dropout=0.0)).eval()
    rows, total = tree_rows(describe(model, batch_size=1))
    top_level = ["tok_emb", "pos_emb", "blocks", "ln_f", "lm_head"]
    assert sum(rows[name][0] for name in top_level) == total == model.num_params() == 10_788_929
    assert rows[""][0] == 10_788_929  # the GPTModel row
    one_block = sum(rows[f"blocks.0.{name}"][0] for name in ("ln1", "attn", "ln2", "ffn"))
    assert rows["blocks"][0] == 6 * one_block
    assert rows["blocks.0.attn"][0] == rows["blocks.0.attn.qkv"][0] + rows["blocks.0.attn.proj"][0]
    assert rows["blocks.0.attn"][1] == "(1, 256, 384)" and rows[""][1] == "(1, 256, 65)"


def test_every_shape_in_the_tree_is_the_shape_of_a_real_forward_pass():
    model = tiny_model()  # vocab 20, n_embd 32, 2 layers, 4 heads, block_size 16
    rows, _ = tree_rows(describe(model, batch_size=3))
    # Record what each module really outputs (and what reaches ln2: the stream after attention).
    seen = {}

    def remember(name, tensor):  # a hook returning None leaves the forward pass as it was
        seen.setdefault(name, tuple(tensor.shape))

    handles = [module.register_forward_hook(
        lambda m, inputs, output, name=name: remember(name, output))
        for name, module in model.named_modules() if name]
    handles.append(model.blocks[0].ln2.register_forward_pre_hook(
        lambda m, inputs: remember("after attention", inputs[0])))
    logits, _ = model(torch.zeros(3, 16, dtype=torch.long))
    for handle in handles:
        handle.remove()
    real = {"": tuple(logits.shape), "blocks": seen["blocks.1"],
            "causal_mask (buffer)": tuple(model.blocks[0].attn.causal_mask.shape),
            "x + attn(ln1(x))": seen["after attention"], "x + ffn(ln2(x))": seen["blocks.0"],
            **{name: seen[name] for name in ("tok_emb", "pos_emb", "blocks.0.ln1", "blocks.0.attn",
                                             "blocks.0.attn.qkv", "blocks.0.attn.proj",
                                             "blocks.0.ln2", "blocks.0.ffn", "ln_f", "lm_head")}}
    assert {name: shape for name, (_, shape) in rows.items()} == \
        {name: str(shape) for name, shape in real.items()}
    # ...and those are the shapes the docstrings promise: (B, T, C), (T, C), (B, T, 3C), (B, T, V).
    assert real["tok_emb"] == (3, 16, 32) and real["pos_emb"] == (16, 32)
    assert real["blocks.0.attn.qkv"] == (3, 16, 96) and real["lm_head"] == (3, 16, 20)


def test_python_model_py_prints_the_tree_with_the_total():
    result = run_script("model.py", "--batch_size", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].startswith("GPTModel") and "(1, 256, 65)" in lines[1]
    assert lines[-1].startswith("total of the five top-level boxes: 10,788,929 parameters")


@pytest.mark.parametrize("args, message", [
    (["--n_head", "5"], "error: n_embd (384) must be divisible by n_head (5); pick e.g. --n_head 4"),
    (["--n_embd", "0"], "error: --n_embd must be at least 1, got 0"),
    (["--batch_size", "0"], "error: --batch_size must be at least 1, got 0"),
    (["--vocab_size", "0"], "error: --vocab_size must be at least 1, got 0"),
    (["--n_layer", "1000000"], "error: this model needs at least"),  # would swap for hours
    (["--block_size", "1" + "0" * 30], "error: this model needs at least"),
    (["--n_layer", "abc"], "model.py: error: argument --n_layer: invalid int value: 'abc'")])
def test_python_model_py_refuses_a_bad_shape_in_one_line(args, message):
    result = run_script("model.py", *args)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), \
        result.stderr


# --- explore.py ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small character model on the tiny corpus, saved as train.py saves it (no training:
    what is tested here holds for any weights)."""
    tokenizer = CharTokenizer.from_text(TINY_TEXT)
    model_args = dict(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4,
                      block_size=16, dropout=0.0, flash=True)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**model_args))
    path = tmp_path_factory.mktemp("explore") / "small.pt"
    save_checkpoint(dict(model=model.state_dict(), model_args=model_args,
                         tokenizer=tokenizer.to_dict()), str(path))
    return path


def prompt_ids(tokenizer, prompt="ROMEO:\nBut soft"):
    return tokenizer.encode(prompt)


def test_next_token_probabilities_are_the_softmax_of_the_logits(checkpoint):
    model, tokenizer, _ = load_model(str(checkpoint), "cpu", flash=False)
    ids = prompt_ids(tokenizer)
    probs, _ = explore.look_inside(model, ids)
    sdpa_model, _, _ = load_model(str(checkpoint), "cpu", flash=True)  # the other attention path
    logits, _ = sdpa_model(torch.tensor([ids]))
    assert probs.shape == (len(ids), tokenizer.vocab_size)
    assert torch.allclose(probs, F.softmax(logits[0], dim=-1), atol=1e-6)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(len(ids)), atol=1e-6)
    rows = explore.next_token_rows(probs, ids, top_k=3)
    for t, (token, actual, p_actual, guesses) in enumerate(rows):
        assert token == ids[t]
        assert guesses[0][0] == probs[t].argmax().item()
        assert [p for _, p in guesses] == sorted((p for _, p in guesses), reverse=True)
        if t + 1 < len(ids):
            assert actual == ids[t + 1] and p_actual == pytest.approx(probs[t, ids[t + 1]].item())
        else:
            assert actual is None and p_actual is None


def test_attention_maps_are_causal_rows_sum_to_one_and_are_the_real_weights(checkpoint):
    model, tokenizer, _ = load_model(str(checkpoint), "cpu", flash=False)
    ids = prompt_ids(tokenizer)
    T = len(ids)
    _, attention = explore.look_inside(model, ids)
    assert attention.shape == (2, 4, T, T)  # (n_layer, n_head, T, T)
    assert torch.all(attention.triu(diagonal=1) == 0)  # nobody looks at the future
    assert torch.allclose(attention.sum(dim=-1), torch.ones(2, 4, T), atol=1e-6)
    # Layer 0 by hand: softmax(q k^T / sqrt(head_size)) under the causal mask.
    idx = torch.tensor([ids])
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(T))
        q, k, _ = model.blocks[0].attn.qkv(model.blocks[0].ln1(x)).split(32, dim=2)
        q, k = (t.view(1, T, 4, 8).transpose(1, 2) for t in (q, k))
        scores = q @ k.transpose(-2, -1) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(attention[0], F.softmax(scores, dim=-1)[0], atol=1e-5)
    # Every layer: the very weights the written-out path forms (caught at its attn_dropout).
    caught = []
    hooks = [b.attn.attn_dropout.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
             for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(torch.cat(caught), attention, atol=1e-6)
    # The queries come from hooks that look_inside removes again; the SDPA path, which never
    # forms the weights, shows the same ones.
    assert not any(b.attn.qkv._forward_hooks for b in model.blocks)
    sdpa_model, _, _ = load_model(str(checkpoint), "cpu", flash=True)
    assert torch.allclose(explore.look_inside(sdpa_model, ids)[1], attention, atol=1e-6)
    assert not any(b.attn.qkv._forward_hooks for b in sdpa_model.blocks)


def test_embedding_pca_keeps_the_two_largest_directions():
    torch.manual_seed(0)
    # 30 points spread mostly along two known directions, plus a little noise.
    directions = torch.linalg.qr(torch.randn(16, 2))[0].T  # (2, 16), orthonormal rows
    weight = torch.randn(30, 2) * torch.tensor([5.0, 2.0]) @ directions + 0.01 * torch.randn(30, 16)
    coords, explained = explore.embedding_pca(weight)
    assert coords.shape == (30, 2)
    assert explained[0] > explained[1] and explained.sum() > 0.99
    centred = weight - weight.mean(dim=0)
    assert torch.allclose(coords.norm(dim=1), centred.norm(dim=1), atol=0.01)  # all but noise


def test_whitespace_and_control_characters_are_shown_readably():
    assert explore.readable("a b\n") == "a␣b↵"
    assert explore.readable("\x1b[2J") == "\\x1b[2J"  # an escape code printed, not obeyed


def test_characters_are_grouped_by_unicode_not_by_an_ascii_list():
    # Tiny Shakespeare's 65 characters keep their groups (as the tokens are shown: ␣ and ↵).
    shakespeare = {"vowel": "aeiou", "consonant": "bcdfghjklmnpqrstvwxyz",
                   "capital": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "punctuation": "!$&',-.:;?",
                   "space, newline": "␣↵", "digit": "3"}
    assert sum(map(len, shakespeare.values())) == 65
    for kind, characters in shakespeare.items():
        assert {explore.kind_of(c) for c in characters} == {kind}, characters
    # Other languages: accents do not change a letter's group; a letter without case is a letter.
    assert {explore.kind_of(c) for c in "éàôùû"} == {"vowel"} and explore.kind_of("ç") == "consonant"
    assert explore.kind_of("É") == "capital" and explore.kind_of("«") == "punctuation"
    assert {explore.kind_of(c) for c in "中文あカبש"} == {"letter, no case"}
    assert explore.kind_of("\u0301") == "other"  # a combining accent on its own
    assert set(map(explore.kind_of, "中é«\u0301\u3000")) <= set(explore.KIND_COLOURS)


def test_characters_the_font_lacks_give_one_note_not_a_warning_each(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    explore.note_missing_glyphs.cache_clear()
    labels = list("中文字母あいうカキク")  # DejaVu Sans, matplotlib's font, has none of these
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explore.draw_attention(torch.full((1, 2, 10, 10), 0.1), labels, tmp_path / "attention.png")
        explore.draw_embeddings(torch.randn(10, 8), labels, [0, 1], tmp_path / "embeddings.png")
    out, err = capsys.readouterr()
    glyph_lines = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    glyph_lines += [line for line in (out + err).splitlines() if "font" in line]
    assert len(glyph_lines) <= 1, glyph_lines
    assert is_png(tmp_path / "attention.png") and is_png(tmp_path / "embeddings.png")


def is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_explore_prints_the_table_and_writes_valid_pngs(checkpoint):
    out = checkpoint.parent / "look"
    result = run_script("explore.py", "--checkpoint", checkpoint, "--prompt", "ROMEO:",
                        "--top_k", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    table = [line.split() for line in result.stdout.splitlines() if re.match(r"^ +\d+  ", line)]
    assert [row[:3] for row in table] == [["0", "R", "O"], ["1", "O", "M"], ["2", "M", "E"],
                                          ["3", "E", "O"], ["4", "O", ":"], ["5", ":", "-"]]
    assert all(len(row) == 4 + 2 * 3 for row in table)  # pos, token, next, p(next), 3 guesses
    for name in ("attention.png", "embeddings.png"):
        assert str(out / name) in result.stdout
        assert is_png(out / name)
        image = pytest.importorskip("matplotlib.image").imread(str(out / name))
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


def test_pictures_go_beside_the_checkpoint_by_default(checkpoint, capsys):
    explore.main(["--checkpoint", str(checkpoint), "--prompt", "JULIET:"])
    folder = checkpoint.parent / "small.pt.explore"
    assert is_png(folder / "attention.png") and is_png(folder / "embeddings.png")
    assert str(folder / "attention.png") in capsys.readouterr().out


def test_without_matplotlib_the_table_still_prints(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    explore.main(["--checkpoint", str(checkpoint), "--prompt", "ROMEO:",
                  "--out", str(tmp_path / "x")])
    out = capsys.readouterr().out
    assert "top 5 guesses" in out and "pip install matplotlib" in out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "missing.pt"], "checkpoint not found"),
    (["--prompt", "ROMEO\u00e9"], "not in the model's vocabulary"),
    (["--prompt", "ROMEO: But soft, what light"], "longer than this model's block_size 16"),
    (["--prompt", ""], "--prompt is empty"),
    (["--top_k", "0"], "--top_k must be at least 1"),
    (["--top_k", "many"], "invalid int value"),
    (["--out", "FILE"], "cannot create the output folder"),
    (["--out", " "], "--out must not be empty"),
    (["--host", "127.0.0.1"], "belong to --serve"),
])
def test_explore_bad_input_is_one_line(checkpoint, tmp_path, args, message, capsys):
    (tmp_path / "FILE").write_text("a file, not a folder")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: explore.main(["--checkpoint", str(checkpoint), *args]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and err.strip().count("\n") == 0


def test_explore_bad_input_in_a_real_process(tmp_path):
    result = run_script("explore.py", "--checkpoint", tmp_path / "none.pt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: checkpoint not found")
    assert result.stderr.strip().count("\n") == 0


# --- train.py --eval_sample_tokens: watch it learn -------------------------------------------

def eval_records(jsonl_path):
    with open(jsonl_path) as f:
        return {r["step"]: r for r in map(json.loads, f) if "val_loss" in r}


def losses_by_step(jsonl_path):
    with open(jsonl_path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_eval_samples_are_printed_and_logged_and_change_nothing_else(tmp_path, tiny_data):
    flags = ["--data", tiny_data, *TINY_FLAGS, "--dropout", "0.1", "--log_interval", "1",
             "--eval_interval", "6", "--lr_decay_iters", "12", "--sample_tokens", "0"]
    plain = run_script("train.py", *flags, "--checkpoint", tmp_path / "plain.pt",
                       "--max_iters", "12")
    assert plain.returncode == 0, plain.stderr
    assert "Sample at step" not in plain.stdout
    assert all("sample" not in r for r in eval_records(tmp_path / "plain.pt.metrics.jsonl").values())
    # The same run with samples, stopped after step 6 and resumed.
    sampled = ["--checkpoint", tmp_path / "sampled.pt", "--eval_sample_tokens", "30"]
    first_half = run_script("train.py", *flags, *sampled, "--max_iters", "6")
    resumed = run_script("train.py", *flags, *sampled, "--max_iters", "12", "--resume")
    assert first_half.returncode == 0 and resumed.returncode == 0, resumed.stderr
    assert "Sample at step 0:\n" in first_half.stdout and "Sample at step 6:\n" in first_half.stdout
    assert "Sample at step 12:\n" in resumed.stdout
    records = eval_records(tmp_path / "sampled.pt.metrics.jsonl")
    assert sorted(records) == [0, 6, 12]
    for record in records.values():  # a newline to start from, then 30 characters
        assert len(record["sample"]) == 31 and record["sample"][0] == "\n"
        assert record["sample"][1:].strip() in first_half.stdout + resumed.stdout
    # Sampling draws from its own generator: training goes on bit for bit as without it,
    # and --resume still continues exactly.
    assert losses_by_step(tmp_path / "sampled.pt.metrics.jsonl") == \
        losses_by_step(tmp_path / "plain.pt.metrics.jsonl")


def test_negative_eval_sample_tokens_is_refused(tmp_path, tiny_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(["--data", tiny_data, "--eval_sample_tokens", "-1"]))
    assert exit_info.value.code == 2
    assert "--eval_sample_tokens must be 0 or more" in capsys.readouterr().err


class FakeWandbRun:
    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, False

    def log(self, values, step):
        assert not self.finished
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_gets_numbers_as_history_and_the_latest_sample_on_the_run_page(tmp_path,
                                                                               monkeypatch):
    run = FakeWandbRun()
    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].init = lambda **kwargs: run
    record = tracking.metrics_recorder(Config(checkpoint=str(tmp_path / "c.pt"), wandb=True))
    record(dict(step=0, train_loss=4.0, val_loss=4.1, sample="\nnoise"))
    record(dict(step=5, loss=3.0, lr=1e-3))
    assert run.logged == [(0, dict(train_loss=4.0, val_loss=4.1)), (5, dict(loss=3.0, lr=1e-3))]
    assert run.summary["sample"] == "\nnoise" and not run.finished  # an eval sample: go on
    record(dict(step=5, sample="\nthe end"))  # the sample printed after training: the last
    assert run.summary["sample"] == "\nthe end" and run.finished
