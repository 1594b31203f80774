"""generate.py's pieces in-process: streaming prints exactly what the batched path returns."""

import argparse

import pytest
import torch

import generate
import utils
from conftest import tiny_model
from utils import CharTokenizer, UsageError


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


def test_int8_weights_only_on_the_cpu_and_close_to_float32():
    with pytest.raises(UsageError, match="CPU only"):
        generate.quantize_int8(tiny_model(), "cuda")
    model = tiny_model()
    idx = torch.randint(0, 20, (2, 16))
    float_logits, _ = model(idx)
    int8_model = generate.quantize_int8(tiny_model(), "cpu")
    assert all(layer.weight.dtype == torch.int8
               for layer in int8_model.modules() if isinstance(layer, generate.Int8Linear))
    assert isinstance(int8_model.lm_head, generate.Int8Linear)
    int8_logits, _ = int8_model(idx)
    assert 0 < (int8_logits.float() - float_logits).abs().max().item() < 0.05


def test_int8_linear_is_the_rounded_weights_times_their_scales():
    linear = torch.nn.Linear(64, 48)
    int8_linear = generate.Int8Linear(linear)
    # Each row's largest weight becomes +-127; the others round to the nearest step of that row.
    assert int8_linear.weight.abs().amax(dim=1).eq(127).all()
    dequantized = int8_linear.weight.float() * int8_linear.scales.float()[:, None]
    assert (dequantized - linear.weight).abs().max() <= int8_linear.scales.float().max() / 2 + 1e-3
    x = torch.randn(3, 5, 64)
    expected = x.float() @ dequantized.T + int8_linear.bias.float()
    assert (int8_linear(x).float() - expected).abs().max().item() < 0.05


def test_auto_sampling_dtype_is_int8_on_cpus_with_native_bf16(monkeypatch):
    monkeypatch.setattr(generate, "cpu_has_native_bf16", lambda: True)
    assert generate.pick_sampling_dtype("auto", "cpu") == "int8"
    assert generate.pick_sampling_dtype("float32", "cpu") == "float32"
    monkeypatch.setattr(generate, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert generate.pick_sampling_dtype("auto", "cpu") == "float32"


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


def test_streamed_bpe_text_equals_returned_text_even_mid_character():
    from utils import BPETokenizer
    tokenizer = BPETokenizer.train("床前明月光，疑是地上霜。" * 5, vocab_size=270)
    model = tiny_model(vocab_size=tokenizer.vocab_size)  # random weights: random bytes too
    args = options(max_new_tokens=40)
    torch.manual_seed(1)
    pieces = list(generate.stream_text(model, tokenizer, tokenizer.encode("床"), args, "cpu"))
    torch.manual_seed(1)
    [returned] = generate.generate_batch(model, tokenizer, tokenizer.encode("床"), args, "cpu")
    assert "".join(pieces) == returned


def test_compiled_decode_step_matches_eager_and_compiles_once():
    if utils.compile_problem("cpu"):
        pytest.skip(utils.compile_problem("cpu"))
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    prompts = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])]
    eager = [model.generate(prompt, 40, temperature=0) for prompt in prompts]  # 40 > block 16
    assert not generate.compile_decode(model, "cpu", "auto")  # auto: CUDA only
    assert generate.compile_decode(model, "cpu", "true")
    compiled = [model.generate(prompt, 40, temperature=0) for prompt in prompts]
    for eager_tokens, compiled_tokens in zip(eager, compiled):
        assert torch.equal(eager_tokens, compiled_tokens)
    # Every one-token step of both prompts, across window slides, ran the same compiled graph.
    assert counters["stats"]["unique_graphs"] == 1


def test_a_decode_step_that_fails_to_compile_falls_back_to_eager(monkeypatch, capsys):
    def broken_compile(function, **options):
        def compiled(*args):
            raise RuntimeError("no compiler today")
        return compiled
    monkeypatch.setattr(utils, "compile_problem", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    expected = model.generate(prompt, 20, temperature=0)
    assert generate.compile_decode(model, "cpu")
    assert torch.equal(model.generate(prompt, 20, temperature=0), expected)
    assert "decoding without torch.compile: it failed with RuntimeError" in capsys.readouterr().out
