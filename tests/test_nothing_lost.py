"""Nothing a user owns is lost to a flag or a full disk: where the checkpoint goes is proven
before training starts, a save that fails stops with the last good checkpoint intact and named,
files that are only a convenience (metrics log, loss curve, BPE cache, W&B) warn once and the
run goes on, and an earlier run's metrics log is kept until a new run has saved."""

import json
import os
import sys
import types

import pytest
import torch

import tracking
import train
import utils
from config import Config
from conftest import TINY_FLAGS, TINY_TEXT, run_in_process

# Two steps, evaluating and saving after each: a tiny run of about a second.
FLAGS = [*TINY_FLAGS, "--max_iters", "2", "--eval_interval", "1", "--sample_tokens", "0",
         "--eval_iters", "1"]


def train_run(data, checkpoint, *extra):
    return run_in_process(train.main, ["--data", data, "--checkpoint", checkpoint, *FLAGS, *extra])


def one_error_line(result, fragment):
    code, out, err = result
    assert code == 2, (out[-2000:], err)
    [line] = err.strip().splitlines()
    assert line.startswith("error: ") and fragment in line, line
    return line


def files_in(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)
            if (folder / name).is_file()}


# --- output paths, proven before training -----------------------------------------------------

def test_the_checkpoints_folder_is_created(tmp_path, tiny_data):
    checkpoint = tmp_path / "runs" / "today" / "run.pt"
    code, _, err = train_run(tiny_data, checkpoint)
    assert code == 0, err
    assert torch.load(checkpoint, weights_only=True)["step"] == 2


def test_a_folder_as_checkpoint_is_refused_before_any_work(tmp_path, tiny_data):
    result = train_run(tiny_data, tmp_path)
    one_error_line(result, f"--checkpoint {tmp_path} is a folder")
    assert "Loading data" not in result[1]  # refused before anything was read or trained


def test_the_data_file_as_checkpoint_is_refused_and_the_text_kept(tmp_path, tiny_data):
    alias = tmp_path / "alias.txt"  # another name for the same file: real paths are compared
    alias.symlink_to(tiny_data)
    for checkpoint in (tiny_data, alias):
        one_error_line(train_run(tiny_data, checkpoint), "would overwrite the --data file")
    assert open(tiny_data, encoding="utf-8").read() == TINY_TEXT
    # run.pt's metrics log is run.pt.metrics.jsonl: not that either, if it is the data.
    text_named_like_a_log = tmp_path / "run.pt.metrics.jsonl"
    text_named_like_a_log.write_text(TINY_TEXT)
    one_error_line(train_run(text_named_like_a_log, tmp_path / "run.pt"),
                   "would overwrite the --data file")
    assert text_named_like_a_log.read_text() == TINY_TEXT


def test_a_path_through_a_file_is_refused(tmp_path, tiny_data):
    one_error_line(train_run(tiny_data, f"{tiny_data}/run.pt"),
                   "part of the path is a file, not a folder")


def test_a_folder_where_nothing_can_be_written_is_refused(tmp_path, tiny_data, monkeypatch):
    def read_only(path, *args, **kwargs):  # root may write anywhere, so pretend
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(utils, "open", read_only, raising=False)  # utils.py's probe only
    one_error_line(train_run(tiny_data, tmp_path / "out" / "run.pt"), "(Read-only file system)")
    assert not os.listdir(tmp_path / "out")


def test_an_empty_resume_is_refused_not_a_fresh_run(tmp_path, tiny_data):
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    before = files_in(tmp_path)
    one_error_line(train_run(tiny_data, checkpoint, "--max_iters", "4", "--resume="),
                   "--resume was given an empty path")
    one_error_line(train_run(tiny_data, checkpoint, "--resume", tmp_path / "nope.pt"),
                   "--resume: no checkpoint at")
    assert files_in(tmp_path) == before


# --- saving that fails cleanly ----------------------------------------------------------------

@pytest.mark.parametrize("failure, reason", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     "the disk is full or the file could not be written"),  # how torch.save says disk full
    (OSError(28, "No space left on device"), "No space left on device"),
])
def test_a_full_disk_at_save_names_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch,
                                                            failure, reason):
    checkpoint = tmp_path / "run.pt"
    real_save, saves = torch.save, []

    def save_then_fail(obj, path):
        saves.append(path)
        if len(saves) == 1:
            return real_save(obj, path)
        with open(path, "wb") as f:  # half a file, then the disk is full
            f.write(b"PK\x03\x04 half a checkpoint")
        raise failure

    monkeypatch.setattr(utils.torch, "save", save_then_fail)
    line = one_error_line(train_run(tiny_data, checkpoint),
                          f"could not save the checkpoint to {checkpoint} ({reason})")
    monkeypatch.setattr(utils.torch, "save", real_save)
    assert f"the last good checkpoint, {checkpoint}, is kept (step 1)" in line
    assert torch.load(checkpoint, weights_only=True)["step"] == 1  # intact
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_failed_first_save_says_no_checkpoint_was_saved(tmp_path, tiny_data, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils.torch, "save", full_disk)
    line = one_error_line(train_run(tiny_data, tmp_path / "run.pt"), "could not save")
    assert "no checkpoint was saved" in line


# --- convenience files warn once; the run goes on --------------------------------------------

def test_an_unwritable_metrics_log_warns_once_and_training_goes_on(tmp_path, tiny_data):
    (tmp_path / "run.pt.metrics.jsonl").mkdir()  # opening it for writing fails
    code, out, err = train_run(tiny_data, tmp_path / "run.pt", "--log_interval", "1")
    assert code == 0, err
    assert out.count("Note: writing the metrics log") == 1
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] == 2


def test_an_unwritable_loss_curve_warns_once_and_training_goes_on(tmp_path, tiny_data):
    pytest.importorskip("matplotlib")
    (tmp_path / "run.pt.loss.png").mkdir()
    code, out, err = train_run(tiny_data, tmp_path / "run.pt")
    assert code == 0, err
    assert out.count("Note: drawing the loss curve") == 1
    assert (tmp_path / "run.pt.metrics.jsonl").exists()


def test_an_unwritable_bpe_cache_warns_and_tokenizes_anyway(tmp_path, monkeypatch, capsys):
    def read_only(path, write):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(utils, "atomic_write", read_only)
    tokenizer, train_ids, _ = utils.tokenize(TINY_TEXT, "bpe", 300, cache_dir=str(tmp_path))
    assert tokenizer.vocab_size == 300 and train_ids
    assert "Note: could not cache the BPE tokens" in capsys.readouterr().out
    assert not os.listdir(tmp_path)


def test_a_failing_wandb_warns_once_and_training_goes_on(tmp_path, tiny_data, monkeypatch):
    class BrokenRun:
        summary = {}

        def log(self, *args, **kwargs):
            raise ConnectionError("W&B is unreachable")

    fake = types.SimpleNamespace(init=lambda **kwargs: BrokenRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    code, out, err = train_run(tiny_data, tmp_path / "run.pt", "--wandb", "--log_interval", "1")
    assert code == 0, err
    assert out.count("Note: logging to W&B failed (ConnectionError") == 1


def test_wandb_that_does_not_start_warns_and_training_goes_on(monkeypatch, capsys):
    def not_logged_in(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=not_logged_in))
    assert tracking.start_wandb(Config()) is None
    assert "Note: W&B did not start" in capsys.readouterr().out


# --- an earlier run's metrics log -------------------------------------------------------------

def val_steps(jsonl_path):
    with open(jsonl_path) as f:
        return [row["step"] for row in map(json.loads, f) if "val_loss" in row]


def test_a_fresh_run_keeps_the_earlier_log_until_it_has_saved(tmp_path, tiny_data):
    checkpoint, log = tmp_path / "run.pt", tmp_path / "run.pt.metrics.jsonl"
    assert train_run(tiny_data, checkpoint)[0] == 0
    assert val_steps(log) == [0, 1, 2]
    before = files_in(tmp_path)
    # A fresh run over it that fails before its first save (the loss blows up at step 1).
    one_error_line(train_run(tiny_data, checkpoint, "--learning_rate", "1e30",
                             "--weight_decay", "0", "--grad_clip", "0", "--warmup_iters", "0"),
                   "NaN or infinite")
    assert files_in(tmp_path) == before  # the earlier checkpoint, log and curve, all kept
    # A fresh run that saves replaces them: its log holds its own rows only, from step 0.
    assert train_run(tiny_data, checkpoint, "--max_iters", "3")[0] == 0
    assert val_steps(log) == [0, 1, 2, 3]


def test_resuming_a_checkpoint_with_damaged_optimizer_state_is_a_clear_error(tmp_path,
                                                                             tiny_data):
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    saved = torch.load(checkpoint, weights_only=True)
    for damage in ({"optimizer": {"state": {}, "param_groups": []}},  # groups do not match
                   {"rng": []}, {"step": "2"}, {"config": None}):
        torch.save({**saved, **damage}, tmp_path / "damaged.pt")
        one_error_line(train_run(tiny_data, tmp_path / "new.pt", "--max_iters", "4",
                                 "--resume", tmp_path / "damaged.pt"), "cannot resume")
