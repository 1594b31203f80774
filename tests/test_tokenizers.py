"""Tokenizers and languages: byte-level BPE beside the characters, any UTF-8 text, and bits per
character so that runs with different tokenizers can be compared."""

import math

import pytest
import torch

import dataset
import fast_bpe
from config import Config
from conftest import TINY_FLAGS, TINY_TEXT, run_script
from tokenizer import BPETokenizer, merge_pair, tokenizer_from_dict
from utils import UsageError, bits_per_char

MIXED = "ROMEO: café, naïve — 床前明月光，疑是地上霜。 Emoji 🙂👍🏽 and tabs\tend\n"
# A tiny Chinese text written for these tests (Li Bai's "Quiet Night Thought", public domain).
CHINESE = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n" * 40


def test_bpe_round_trips_mixed_scripts():
    tokenizer = BPETokenizer.train(TINY_TEXT + CHINESE, vocab_size=300)
    for text in (MIXED, CHINESE, "", "🙂", "never seen: Ω≈ç√∫"):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bpe_respects_vocab_size_and_serialises_as_plain_data():
    tokenizer = BPETokenizer.train(TINY_TEXT, vocab_size=280)
    assert tokenizer.vocab_size == 280
    ids = tokenizer.encode(TINY_TEXT)
    assert max(ids) < 280 and len(ids) < len(TINY_TEXT.encode("utf-8"))  # merges shorten it
    state = tokenizer.to_dict()
    assert state["kind"] == "bpe" and all(isinstance(a, int) for pair in state["merges"] for a in pair)
    assert tokenizer_from_dict(state).encode(MIXED) == tokenizer.encode(MIXED)


def test_bpe_first_merge_is_the_most_frequent_pair():
    tokenizer = BPETokenizer.train("ab ab ab cd", vocab_size=257)
    assert tokenizer.merges == [(ord("a"), ord("b"))]
    assert tokenizer.encode("ab") == [256]
    assert merge_pair([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]


def test_bpe_stops_early_when_nothing_is_left_to_merge():
    tokenizer = BPETokenizer.train("aaaa", vocab_size=1000)
    assert tokenizer.vocab_size < 1000
    assert tokenizer.encode("aaaa") == [tokenizer.vocab_size - 1]


def corpus_of(tmp_path, text, tokenizer):
    """The Corpus train.py would load from text, and all its tokens (train, then val)."""
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    corpus = dataset.load_corpus(Config(data=str(path), tokenizer=tokenizer, vocab_size=300))
    return corpus, [*dataset.split_tokens(corpus, "train"), *dataset.split_tokens(corpus, "val")]


def test_bpe_is_learned_from_the_training_split_once(tmp_path, monkeypatch):
    text = TINY_TEXT + "zzzz qqqq xxxx"  # rare words only in the validation tail
    corpus, tokens = corpus_of(tmp_path, text, "bpe")
    assert corpus.tokenizer.decode(tokens) == text
    assert not any(b"zz" in piece for piece in corpus.tokenizer.token_bytes)  # never saw val
    monkeypatch.setattr(fast_bpe, "train", lambda *args: pytest.fail("trained twice"))
    assert corpus_of(tmp_path, text, "bpe")[0].tokenizer.merges == corpus.tokenizer.merges


def test_char_tokenizer_handles_chinese(tmp_path):
    corpus, tokens = corpus_of(tmp_path, CHINESE, "char")
    assert corpus.tokenizer.decode(tokens) == CHINESE
    assert corpus.tokenizer.vocab_size == len(set(CHINESE))


def test_bits_per_character_by_hand():
    # 4 tokens at ln 2 nats each = 4 bits in all; they cover 8 characters: 0.5 bits per char.
    assert bits_per_char(math.log(2), n_tokens=4, n_chars=8) == pytest.approx(0.5)
    # A character tokenizer: one token per character, so bpc = loss / ln 2.
    assert bits_per_char(1.5, 100, 100) == pytest.approx(1.5 / math.log(2))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_train_and_generate_on_chinese(tmp_path, kind):
    data = tmp_path / "poem.txt"
    data.write_text(CHINESE, encoding="utf-8")
    ckpt = tmp_path / "ckpt.pt"
    result = run_script("train.py", "--data", data, "--checkpoint", ckpt, *TINY_FLAGS,
                        "--block_size", "16", "--max_iters", "10", "--eval_interval", "5",
                        "--tokenizer", kind, "--vocab_size", "300")
    assert result.returncode == 0, result.stderr
    assert "val bpc" in result.stdout
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["tokenizer"]["kind"] == kind and checkpoint["val_bpc"] > 0
    generated = run_script("generate.py", "--checkpoint", ckpt, "--prompt", "床前",
                           "--max_new_tokens", "30", "--device", "cpu")
    assert generated.returncode == 0, generated.stderr
    assert "床前" in generated.stdout


def test_bpe_run_on_english_trains_and_samples(tmp_path, tiny_data):
    ckpt = tmp_path / "bpe.pt"
    result = run_script("train.py", "--data", tiny_data, "--checkpoint", ckpt, *TINY_FLAGS,
                        "--max_iters", "10", "--eval_interval", "10", "--tokenizer", "bpe",
                        "--vocab_size", "320")
    assert result.returncode == 0, result.stderr
    assert "Vocabulary size: 320" in result.stdout
    generated = run_script("generate.py", "--checkpoint", ckpt, "--prompt", "ROMEO:",
                           "--max_new_tokens", "20", "--device", "cpu", "--num_samples", "2")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.count("ROMEO:") >= 3  # the header line and both samples


def test_bad_tokenizer_flags(tmp_path, tiny_data):
    result = run_script("train.py", "--data", tiny_data, "--tokenizer", "words")
    assert result.returncode == 2 and "--tokenizer must be char or bpe" in result.stderr
    result = run_script("train.py", "--data", tiny_data, "--tokenizer", "bpe", "--vocab_size", "100")
    assert result.returncode == 2 and "at least 256" in result.stderr


def test_text_that_is_not_valid_unicode_is_a_clear_error_for_bpe():
    # A terminal passing the lone byte 0xff gives Python the lone surrogate U+DCFF: no UTF-8.
    tokenizer = BPETokenizer.train(TINY_TEXT, vocab_size=280)
    with pytest.raises(UsageError, match=r"not valid Unicode \('\\udcff': the byte 0xff, not UTF-8\)"):
        tokenizer.encode("ROMEO \udcff")
