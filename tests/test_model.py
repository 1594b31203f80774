"""What model.py promises: the default model's size, causal attention, two attention paths that agree,
a KV cache that changes nothing but speed, and sampling that does what its flags say."""

import math
from dataclasses import asdict

import pytest
import torch

from conftest import tiny_model
from model import GPTConfig, GPTModel, sample_next_token


def test_default_model_has_10_788_929_parameters():
    model = GPTModel(GPTConfig(vocab_size=65))  # n_embd 384, n_layer 6, n_head 6, block_size 256
    assert model.num_params() == 10_788_929


def test_logits_shape_and_initial_loss_near_uniform():
    model = tiny_model()
    idx = torch.randint(0, 20, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 20)
    assert abs(loss.item() - math.log(20)) < 0.1  # small init: every token about equally likely


def test_flash_and_written_out_attention_agree():
    model = tiny_model(flash=True)
    idx = torch.randint(0, 20, (2, 16))
    flash_logits, _ = model(idx)
    for block in model.blocks:
        block.attn.flash = False
    manual_logits, _ = model(idx)
    assert (flash_logits - manual_logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("flash", [True, False])
def test_changing_future_tokens_never_changes_past_logits(flash):
    model = tiny_model(flash=flash)
    idx = torch.randint(0, 20, (1, 16))
    logits, _ = model(idx)
    for t in range(15):
        changed = idx.clone()
        changed[0, t + 1:] = (changed[0, t + 1:] + 7) % 20
        changed_logits, _ = model(changed)
        assert torch.allclose(logits[0, :t + 1], changed_logits[0, :t + 1], atol=1e-6)
        assert not torch.allclose(logits[0, t + 1:], changed_logits[0, t + 1:], atol=1e-6)


@pytest.mark.parametrize("flash", [True, False])
def test_same_weights_give_the_logits_they_always_gave(flash):
    # Numbers written down from the model before GPTConfig existed (seed 0's tiny model): a
    # change to the maths, the init or the order of the weights would move them.
    model = tiny_model(flash=flash)
    with torch.no_grad():
        logits, _ = model((torch.arange(16) * 7 % 20)[None])
    expected_last = [0.1490285, -0.0443734, 0.1190606, 0.0067018, 0.0666626]
    assert logits[0, -1, :5].tolist() == pytest.approx(expected_last, abs=1e-5)
    assert logits.abs().sum().item() == pytest.approx(30.95103, abs=1e-3)
    # Old checkpoints hold the weights under these names.
    assert list(model.state_dict())[:7] == [
        "tok_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight", "blocks.0.ln1.bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias"]


def test_the_config_is_saved_as_plain_values_and_rebuilds_the_same_model():
    model = tiny_model()
    args = asdict(model.config)  # what a checkpoint stores under "model_args"
    assert args == dict(vocab_size=20, n_embd=32, n_layer=2, n_head=4, block_size=16,
                        dropout=0.0, flash=True)
    rebuilt = GPTModel(GPTConfig(**args)).eval()
    rebuilt.load_state_dict(model.state_dict())
    idx = torch.randint(0, 20, (2, 16))
    assert torch.equal(rebuilt(idx)[0], model(idx)[0])


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ValueError, match="divisible"):
        GPTModel(GPTConfig(vocab_size=10, n_embd=30, n_head=4))


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=20, n_embd=64, n_layer=2, n_head=4, block_size=16,
                               dropout=0.0))
    x = torch.randint(0, 20, (4, 16))
    y = torch.randint(0, 20, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


# --- KV cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("flash", [True, False])
def test_cached_logits_equal_full_forward(flash):
    model = tiny_model(flash=flash)
    idx = torch.randint(0, 20, (2, 16))
    full_logits, _ = model(idx)
    cache = model.new_cache(batch_size=2)
    prefill_logits, _ = model(idx[:, :5], cache=cache)  # the prompt, in one pass
    step_logits = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    cached_logits = torch.cat([prefill_logits, *step_logits], dim=1)
    assert cache.length == 16
    assert (cached_logits - full_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("prompt_len", [1, 5, 15])
def test_greedy_with_cache_equals_without_up_to_block_size(prompt_len):
    model = tiny_model()
    prompt = torch.randint(0, 20, (1, prompt_len))
    new = 16 - prompt_len  # fill the window exactly
    with_cache = model.generate(prompt, new, temperature=0, use_cache=True)
    without = model.generate(prompt, new, temperature=0, use_cache=False)
    assert with_cache.tolist() == without.tolist()


def test_cached_generation_keeps_going_past_block_size():
    model = tiny_model()
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 60, temperature=1.0, top_k=5)
    assert out.shape == (2, 61)
    assert int(out.max()) < 20


def test_block_size_1_samples_with_the_cache_as_without():
    # Each step the full cache starts again from the last token alone (never from none of them).
    model = tiny_model(block_size=1)
    draw = dict(temperature=1.0, top_k=5)
    with_cache = model.generate(torch.zeros(2, 3, dtype=torch.long), 10, use_cache=True,
                                generator=torch.Generator().manual_seed(0), **draw)
    without = model.generate(torch.zeros(2, 3, dtype=torch.long), 10, use_cache=False,
                             generator=torch.Generator().manual_seed(0), **draw)
    assert with_cache.shape == (2, 13) and with_cache.tolist() == without.tolist()


def test_generate_zero_tokens_returns_the_prompt():
    prompt = torch.tensor([[1, 2, 3]])
    assert tiny_model().generate(prompt, 0).tolist() == prompt.tolist()


# --- sampling -------------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]


def test_top_k_one_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 30)
    assert torch.equal(sample_next_token(logits, top_k=1), logits.argmax(-1))


def test_top_k_larger_than_vocab_is_clamped():
    sample_next_token(torch.randn(2, 5), top_k=500)  # no error


def test_top_p_one_changes_nothing():
    logits = torch.randn(8, 30)
    plain = sample_next_token(logits, generator=torch.Generator().manual_seed(3))
    nucleus = sample_next_token(logits, top_p=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, nucleus)


def test_the_draw_picks_what_torch_multinomial_picks_without_a_host_check():
    # The race of exponential times uses torch.multinomial's own random numbers and rule, so
    # a seed gives the same tokens; the frequencies follow the probabilities.
    logits = torch.randn(4, 65) * 3
    for seed in range(20):
        drawn = sample_next_token(logits, generator=torch.Generator().manual_seed(seed))
        expected = torch.multinomial(torch.softmax(logits, dim=-1), 1,
                                     generator=torch.Generator().manual_seed(seed)).squeeze(1)
        assert torch.equal(drawn, expected)
    probs = torch.tensor([0.6, 0.3, 0.1])
    picks = sample_next_token(probs.log().repeat(20000, 1),
                              generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(picks, minlength=3) / 20000, probs, atol=0.02)


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    picks = sample_next_token(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}


def test_same_seed_same_text_different_seed_different_text():
    model = tiny_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def sample(seed):
        return model.generate(prompt, 40, generator=torch.Generator().manual_seed(seed)).tolist()

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_batched_samples_differ():
    model = tiny_model()
    torch.manual_seed(0)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 40)
    assert len({tuple(row) for row in out.tolist()}) == 4
