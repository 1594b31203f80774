"""What utils.py promises: a reversible tokenizer, correct batches, safe checkpoints, clear errors."""

import hashlib
import os
import urllib.request

import pytest
import torch

import utils
from utils import (
    CharTokenizer,
    UsageError,
    atomic_write,
    get_batch,
    load_checkpoint,
    pick_device,
    read_text,
    save_checkpoint,
    split_data,
    tokenizer_from_dict,
)


def test_char_tokenizer_round_trip_and_sorted_vocab():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.decode(tok.encode("low word")) == "low word"
    assert tokenizer_from_dict(tok.to_dict()).encode("hello") == tok.encode("hello")


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UsageError, match="'xz'"):
        tok.encode("abxcz")


def test_tiny_shakespeare_vocabulary():
    path = os.path.join(os.path.dirname(__file__), "..", "data", "input.txt")
    if not os.path.exists(path):
        pytest.skip("data/input.txt not present")
    text = read_text(path)
    assert len(text) == 1_115_394
    assert CharTokenizer.from_text(text).vocab_size == 65


def test_split_is_90_10_in_order():
    data = torch.arange(100)
    train, val = split_data(data)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_batches_are_shifted_windows_of_the_data():
    data = torch.arange(1000)
    x, y = get_batch(data, batch_size=5, block_size=8)
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkp")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


# --- bad input: each gives a UsageError naming the problem -------------------------------

def test_missing_data_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_text(str(tmp_path / "nope.txt"))


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match="empty"):
        read_text(str(tmp_path / "empty.txt"))


def test_non_utf8_data_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        read_text(str(tmp_path / "latin1.txt"))


def test_unreadable_data_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", no_permission)  # root can read any file, so pretend
    with pytest.raises(UsageError, match="permission denied"):
        read_text(str(path))


def test_data_path_is_a_directory(tmp_path):
    with pytest.raises(UsageError, match="directory"):
        read_text(str(tmp_path))


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"offline\?.*data/input.txt"):
        read_text("data/input.txt")


class FakeResponse:
    def __init__(self, payload):
        self.payload = payload

    def read(self):
        return self.payload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_checks_sha256_then_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"not shakespeare"))
    with pytest.raises(UsageError, match="sha256"):
        read_text("data/input.txt")
    assert not os.path.exists("data/input.txt")

    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(payload))
    monkeypatch.setattr(utils, "DATA_SHA256", hashlib.sha256(payload).hexdigest())
    assert read_text("data/input.txt") == payload.decode()
    assert open("data/input.txt", "rb").read() == payload


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}, "model_args": {}, "tokenizer": {}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        load_checkpoint(str(path))


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UsageError, match="not a Mini-GPT checkpoint"):
        load_checkpoint(str(path))


class Payload:  # any object that only pickle can rebuild
    pass


def test_checkpoint_that_needs_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_args": Payload(), "tokenizer": {}}, path)
    with pytest.raises(UsageError, match="pickle"):
        load_checkpoint(str(path))


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("cpu") == "cpu"


def test_unknown_device():
    with pytest.raises(UsageError, match="unknown device"):
        pick_device("tpu")
