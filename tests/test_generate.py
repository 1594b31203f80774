"""generate.py's pieces in-process: streaming prints exactly what the batched path returns."""

import argparse

import pytest
import torch

import generate
import utils
from conftest import tiny_model
from tokenizer import BPETokenizer, CharTokenizer


def options(**overrides):
    defaults = dict(max_new_tokens=40, temperature=0.8, top_k=200, top_p=None, num_samples=1,
                    no_cache=False)
    return argparse.Namespace(**{**defaults, **overrides})


def test_streamed_text_equals_returned_text():
    model, tokenizer = tiny_model(), CharTokenizer("abcdefghijklmnopqrs\n")
    for no_cache in (False, True):
        args = options(no_cache=no_cache, max_new_tokens=50)  # past block_size (16)
        torch.manual_seed(5)
        streamed = "".join(generate.stream_text(model, tokenizer, [0], args, "cpu"))
        torch.manual_seed(5)
        [returned] = generate.generate_batch(model, tokenizer, [0], args, "cpu")
        assert streamed == returned and len(streamed) == 50


def test_generation_runs_the_code_on_the_page_by_default(tmp_path, monkeypatch):
    """On a CPU: the written-out attention and the model's own nn.Linear layers, whatever the
    CPU; int8 weights only when asked for."""
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    model = tiny_model(flash=True)
    path = tmp_path / "ckpt.pt"
    torch.save(dict(model=model.state_dict(), model_args=dict(
        vocab_size=20, n_embd=32, n_layer=2, n_head=4, block_size=16, dropout=0.0, flash=True),
        tokenizer=dict(kind="char", chars="abcdefghijklmnopqrs\n")), path)
    loaded = []
    monkeypatch.setattr(generate, "compile_decode", lambda model, *args: loaded.append(model))
    generate.main(["--checkpoint", str(path), "--max_new_tokens", "5", "--device", "cpu"])
    [sampled] = loaded
    assert not sampled.blocks[0].attn.flash
    assert type(sampled.blocks[0].ffn.up) is torch.nn.Linear  # not speedups.Int8Linear


def test_num_samples_gives_different_samples():
    model, tokenizer = tiny_model(), CharTokenizer("abcdefghijklmnopqrs\n")
    torch.manual_seed(0)
    samples = generate.generate_batch(model, tokenizer, [0, 1], options(num_samples=4), "cpu")
    assert len(samples) == 4 and len(set(samples)) == 4


def test_greedy_is_the_same_with_and_without_cache_through_generate_py():
    model, tokenizer = tiny_model(), CharTokenizer("abcdefghijklmnopqrs\n")
    greedy = [generate.generate_batch(model, tokenizer, [3], options(temperature=0, no_cache=flag,
                                                                     max_new_tokens=15), "cpu")
              for flag in (False, True)]
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("chunk", [1, 3, 8])  # tokens copied to the host at a time (8 on GPUs)
def test_streamed_bpe_text_equals_returned_text_even_mid_character(chunk):
    tokenizer = BPETokenizer.train("床前明月光，疑是地上霜。" * 5, vocab_size=270)
    model = tiny_model(vocab_size=tokenizer.vocab_size)  # random weights: random bytes too
    args = options(max_new_tokens=40)
    torch.manual_seed(1)
    pieces = list(generate.stream_text(model, tokenizer, tokenizer.encode("床"), args, "cpu",
                                       chunk))
    torch.manual_seed(1)
    [returned] = generate.generate_batch(model, tokenizer, tokenizer.encode("床"), args, "cpu")
    assert "".join(pieces) == returned


def test_streaming_decodes_each_token_once():
    """A long sample costs time in proportion to its length: no re-decoding what was shown."""
    model, tokenizer = tiny_model(), CharTokenizer("abcdefghijklmnopqrs\n")
    decoded = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids: decoded.append(len(ids)) or decode(ids)
    text = "".join(generate.stream_text(model, tokenizer, [0], options(max_new_tokens=300), "cpu"))
    assert len(text) == 300 and sum(decoded) == 300
    pieces = list(generate.stream_text(model, tokenizer, [0], options(max_new_tokens=40), "cpu", 8))
    assert [len(piece) for piece in pieces] == [8] * 5 + [0]  # 8 at a time, as on a GPU


def test_int8_weights_are_refused_off_the_cpu_before_any_work():
    """generate.py and bench.py share this check: int8 weights exist on the CPU only."""
    generate.check_int8_on("cpu", "int8")
    generate.check_int8_on("cuda", "bfloat16")
    with pytest.raises(utils.UsageError, match="--dtype int8 runs on the CPU only; use --device cpu"):
        generate.check_int8_on("cuda", "int8")
