"""What tokenizer.py, checkpoint.py and utils.py promise: a reversible tokenizer, safe checkpoints,
clear errors."""

import os
import pickle

import pytest
import torch

import utils
from checkpoint import atomic_write, chosen_weights, load_checkpoint, save_checkpoint
from conftest import run_in_process
from model import GPTConfig, GPTModel
from tokenizer import CharTokenizer, tokenizer_from_dict
from utils import UsageError, pick_device


def test_char_tokenizer_round_trip_and_sorted_vocab():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.decode(tok.encode("low word")) == "low word"
    assert tokenizer_from_dict(tok.to_dict()).encode("hello") == tok.encode("hello")


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UsageError, match="'xz'"):
        tok.encode("abxcz")


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

def test_missing_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}, "model_args": {}, "tokenizer": {}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UsageError, match="damaged checkpoint"):
        load_checkpoint(str(path))


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(UsageError, match="not a Mini-GPT checkpoint"):
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


@pytest.mark.parametrize("content", [
    os.urandom(3000),  # random bytes
    b"model weights go here\n",  # a text file
    b"",  # an empty file
    pickle.dumps({"model": 1}),  # a plain pickle, not torch.save's format
], ids=["random", "text", "empty", "plain-pickle"])
def test_a_file_that_is_not_a_checkpoint_is_not_called_dangerous(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="not a Mini-GPT checkpoint") as error:
        load_checkpoint(str(path))
    assert "pickle" not in str(error.value)


def tiny_checkpoint(**model_args):
    """What train.py saves, for a tiny model of the characters 'ab\n'."""
    args = {**dict(vocab_size=3, n_embd=8, n_layer=2, n_head=2, block_size=4, dropout=0.0,
                   flash=False), **model_args}
    model = GPTModel(GPTConfig(**args))
    return dict(model=model.state_dict(), model_args=args, tokenizer={"kind": "char",
                                                                      "chars": "ab\n"})


def damaged(change):
    checkpoint = tiny_checkpoint()
    change(checkpoint)
    return checkpoint


@pytest.mark.parametrize("checkpoint, message", [
    (damaged(lambda c: c["model_args"].update(n_embd=10**9)),  # would be 480 GB and more
     r"weight tok_emb.weight is \(3, 8\), the model_args say \(3, 1000000000\)"),
    (damaged(lambda c: c["model_args"].update(n_layer=10**12)), "the weights hold 2 blocks"),
    (damaged(lambda c: c["model_args"].update(block_size="4")), "block_size is '4', not a whole"),
    (damaged(lambda c: c["model_args"].update(n_head=True)), "n_head is True, not a whole"),
    (damaged(lambda c: c["model_args"].update(n_head=3)), "not divisible by n_head"),
    (damaged(lambda c: c["model_args"].update(dropout=float("nan"))), "dropout is nan"),
    (damaged(lambda c: c["model_args"].update(bias=True)), r"unknown entries \['bias'\]"),
    (damaged(lambda c: c.update(model_args=[3, 8])), "model_args is not a dictionary"),
    (damaged(lambda c: c["model"].pop("ln_f.bias")), r"do not match the model_args \(ln_f.bias"),
    (damaged(lambda c: c["model"].update({"ln_f.bias": torch.zeros(5)})),
     r"weight ln_f.bias is \(5,\), the model_args say \(8,\)"),
    (damaged(lambda c: c["model"].update({"ln_f.bias": torch.zeros(8, dtype=torch.long)})),
     "holds torch.int64, not floating-point"),
    (damaged(lambda c: c["model"]["lm_head.weight"].fill_(float("inf"))),
     "lm_head.weight holds NaN or infinite values"),
    (damaged(lambda c: c.update(model=[torch.zeros(1)])), "not a dictionary of tensors"),
    # torch.load takes any tensor; the checks and the kernels expect plain ones, wherever they are
    (damaged(lambda c: c["model"].update({"ln_f.bias": torch.zeros(8).to_sparse()})),
     "model ln_f.bias is not a plain tensor of real numbers"),
    (damaged(lambda c: c["model"].update({"ln_f.bias": torch.zeros(8, dtype=torch.complex64)})),
     "model ln_f.bias is not a plain tensor"),
    (damaged(lambda c: c["model"].update({"ln_f.bias": torch.zeros(8, device="meta")})),
     "model ln_f.bias is not a plain tensor"),
    (damaged(lambda c: c.update(rng=[{"torch": torch.zeros(3).to_sparse()}])),
     "rng 0 torch is not a plain tensor"),
    # torch.isfinite, which the checks below ask, has no kernel for most float8 formats
    (damaged(lambda c: c["model"].update({"ln_f.bias": torch.zeros(8, dtype=torch.float8_e4m3fn)})),
     "model ln_f.bias holds float8_e4m3fn, numbers torch cannot check for NaN"),
    (damaged(lambda c: c["tokenizer"].update(chars="aa\n")), "not a string of distinct"),
    (damaged(lambda c: c["tokenizer"].update(chars=["a", "b", "\n"])), "not a string"),
    (damaged(lambda c: c["tokenizer"].update(chars="ab")), "tokenizer has 2 tokens, the model 3"),
    (damaged(lambda c: c.update(tokenizer={"kind": "words"})), "neither char nor bpe"),
    (damaged(lambda c: c.update(tokenizer={"kind": "bpe", "merges": [[1, 2]]})),
     "tokenizer has 257 tokens, the model 3"),
    (damaged(lambda c: c.update(best=[1500, 1.48])), "best evaluation is not a step and a val"),
    (damaged(lambda c: c.update(best={"step": "1500", "val_loss": 1.48})), "not a step and a val"),
    (damaged(lambda c: c.update(best_model=c["model"])), "best weights but no step or val loss"),
    (damaged(lambda c: c.update(best={})), "best evaluation is not a step and a val loss"),
    (damaged(lambda c: c.update(best={"step": 5})), "best evaluation is not a step and a val"),
    (damaged(lambda c: c.update(best={"step": 5, "val_loss": float("nan")})), "not a step and"),
    (damaged(lambda c: c.update(best={"step": -1, "val_loss": 1.5})), "not a step and a val"),
    (damaged(lambda c: c.update(step=3, best={"step": 999, "val_loss": 1.0})),
     "its best evaluation, at step 999, comes after its last, step 3"),
    # --resume would say "pass --optimizer 5": the saved flags must be ones train.py takes
    (damaged(lambda c: c.update(config={"optimizer": 5})),
     r"the flags saved in it are not train.py's \(--optimizer must be text, got 5\)"),
    (damaged(lambda c: c.update(config={"optimizer": "sgd"})), "--optimizer must be adamw or"),
    (damaged(lambda c: c.update(config={"vocab_size": "4096"})), "--vocab_size must be a whole"),
    (damaged(lambda c: c.update(best={"step": 3, "val_loss": 1.5},
                                best_model={"ln_f.bias": torch.zeros(8)})),
     "the weights hold 0 blocks"),
])
def test_a_damaged_checkpoint_is_named_before_anything_is_built(tmp_path, checkpoint, message):
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    with pytest.raises(UsageError, match=f"damaged checkpoint: .*{message}"):
        load_checkpoint(str(path))


def test_a_step_that_is_not_a_whole_number_from_0_is_not_printed():
    # A hand-made checkpoint's step (-5, 2.0, True): "the only weights in it", not "at step -5";
    # --resume refuses them (tests/test_nothing_lost.py).
    for step in (-5, 2.0, True):
        assert chosen_weights({**tiny_checkpoint(), "step": step, "val_loss": 1.5},
                              "last")[1] == "the only weights in it"
    assert chosen_weights({**tiny_checkpoint(), "step": 5, "val_loss": 1.5},
                          "last")[1] == "val loss 1.5000 at step 5"


def test_a_list_inside_itself_is_walked_once(tmp_path):
    loop = []
    loop.append(loop)  # pickle can store that, and torch.load rebuild it
    torch.save({**tiny_checkpoint(), "notes": loop}, tmp_path / "ckpt.pt")
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["notes"][0] is not None


def test_bpe_merges_must_join_tokens_that_exist_before_them(tmp_path):
    checkpoint = tiny_checkpoint(vocab_size=258)
    for merges in ([[1, 2], [256, 300]], [[1, 2], [-1, 3]], [[1, 2], [1]], [[1, 2], ["a", 3]]):
        checkpoint["tokenizer"] = {"kind": "bpe", "merges": merges}
        torch.save(checkpoint, tmp_path / "ckpt.pt")
        with pytest.raises(UsageError, match="merges are not pairs of earlier token ids"):
            load_checkpoint(str(tmp_path / "ckpt.pt"))
    checkpoint["tokenizer"] = {"kind": "bpe", "merges": [[1, 2], [256, 3]]}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["model_args"]["vocab_size"] == 258


def test_a_model_whose_causal_masks_cannot_fit_is_refused(tmp_path):
    # Weights of a few MB, but block_size 10**6: each block's (T, T) mask would take 4 TB.
    args = dict(vocab_size=3, n_embd=4, n_layer=1, n_head=1, block_size=10**6)
    with torch.device("meta"):  # the shapes, without the memory
        shapes = GPTModel(GPTConfig(**args)).state_dict()
    checkpoint = dict(model={name: torch.zeros(t.shape) for name, t in shapes.items()},
                      model_args=args, tokenizer={"kind": "char", "chars": "ab\n"})
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    with pytest.raises(UsageError, match=r"needs at least [\d,.]+ GiB of memory, more than"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))


def test_a_folder_or_device_as_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(UsageError, match="is a device, not a regular file"):
        load_checkpoint("/dev/null")


def test_device_names_are_checked_before_torch_sees_them(monkeypatch):
    for name in ("cuda:x", "cuda:", "cpu:0", "", "CUDA"):
        with pytest.raises(UsageError, match="unknown device"):
            pick_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match="has 2 CUDA GPU"):
        pick_device("cuda:2")


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("cpu") == "cpu"


def test_unknown_device():
    with pytest.raises(UsageError, match="unknown device"):
        pick_device("tpu")


@pytest.mark.parametrize("flags, native", [("fpu avx512_bf16", True), ("fpu amx_bf16", True),
                                           ("fpu avx512f", False)])
def test_cpu_bf16_is_read_from_either_flag(monkeypatch, tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *args, **kwargs: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs))
    assert utils.cpu_has_native_bf16() is native


@pytest.mark.parametrize("v2, v1, expected_gib", [
    ("1073741824\n", None, 1.0),  # cgroup v2: a 1 GiB container
    ("max\n", None, None),  # v2 without a limit: the machine's RAM
    (None, "2147483648\n", 2.0),  # cgroup v1
    (None, "9223372036854771712\n", None),  # v1 without a limit (about 2**63)
    ("-1\n", None, None),  # a negative or zero number is no limit either: unknown
    (None, "-1\n", None),
    ("0\n", "2147483648\n", 2.0),  # and the next file is read on
    (None, None, None)])  # no cgroup files (macOS, Windows)
def test_a_container_s_memory_limit_counts_as_the_cpu_s_memory(tmp_path, monkeypatch, v2, v1,
                                                                  expected_gib):
    files = []
    for name, text in (("memory.max", v2), ("memory.limit_in_bytes", v1)):
        files.append(str(tmp_path / name))
        if text is not None:
            (tmp_path / name).write_text(text)
    monkeypatch.setattr(utils, "CGROUP_MEMORY_FILES", tuple(files))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert utils.device_memory("cpu") == (expected_gib * 2**30 if expected_gib else ram)
    if expected_gib:  # a run that fits the machine but not the container is refused
        with pytest.raises(UsageError, match=f"more than the {expected_gib:.1f} GiB on cpu"):
            utils.check_fits_in_memory(int(1.5 * expected_gib * 2**30), "cpu", "this", "less")


@pytest.mark.parametrize("rank, waits", [("0", []), ("1", [utils.RANK_ERROR_WAIT])])
def test_under_torchrun_rank_0_says_a_usage_error_at_once_the_others_after_a_wait(
        monkeypatch, rank, waits):
    """Rank 0 says it at once; a rank above 0 first waits for rank 0 to say it (torchrun then
    stops the waiting rank: tests/test_hostile.py), so the line is printed once."""
    for name, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    waited = []
    monkeypatch.setattr(utils.time, "sleep", waited.append)

    def bad_flag(argv):
        raise UsageError("--max_iters must be at least 1, got 0")

    code, _, err = run_in_process(bad_flag, [], torchrun=True)  # as train.py runs its main
    assert (code, err, waited) == (2, "error: --max_iters must be at least 1, got 0\n", waits)
