"""Nothing a user owns is lost to a flag or a full disk: where the checkpoint goes is proven
before training starts, a save that fails stops with the last good checkpoint intact and named,
files that are only a convenience (metrics log, loss curve, BPE cache, W&B) warn once and the
run goes on, and an earlier run's metrics log is kept until a new run has saved."""

import errno
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import tracking
import train
import utils
from checkpoint import check_writable, png_tagged
from config import Config
from conftest import ROOT, TINY_FLAGS, TINY_TEXT, run_in_process, run_script

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


def test_odd_checkpoint_paths_get_their_own_reason_and_fix(tmp_path, tiny_data):
    os.symlink(tmp_path / "nowhere" / "deeper", tmp_path / "dead")  # a link to no folder
    for checkpoint, fragment in (
            (f"{tmp_path}/newdir/", f"--checkpoint {tmp_path}/newdir/ names a folder; name a "
                                    f"file in it, e.g. --checkpoint {tmp_path}/newdir/ckpt.pt"),
            (tmp_path / "dead" / "run.pt", f"({tmp_path / 'dead'} is a symlink to nothing)"),
            ("/dev/null", "--checkpoint /dev/null")):  # a device (root) or unwritable folder
        line = one_error_line(train_run(tiny_data, checkpoint), fragment)
        assert "move that file away" not in line  # no one should move /dev/null
    assert sorted(os.listdir(tmp_path)) == ["dead", "tiny.txt"]


def test_a_path_of_many_new_folders_is_made_whatever_the_recursion_limit(tmp_path, tiny_data,
                                                                          monkeypatch):
    pytest.importorskip("matplotlib")
    import dataset
    import explore
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    limit = sys.getrecursionlimit()  # os.makedirs calls itself once per missing folder, so
    sys.setrecursionlimit(1000)  # 1,100 of them failed, or not, by what had raised the limit
    try:
        deep = tmp_path / "a" / ("d/" * 1100)  # under PATH_MAX
        assert train_run(tiny_data, deep / "run.pt")[0] == 0 and (deep / "run.pt").is_file()
        deep = tmp_path / "b" / ("d/" * 1100)
        code, out, err = run_in_process(explore.main, ["--checkpoint", tmp_path / "run.pt",
                                                       "--out", deep])
        assert code == 0 and os.listdir(deep), err
        deep = tmp_path / "c" / ("d/" * 1100)
        monkeypatch.setenv("XDG_CACHE_HOME", str(deep))  # the token files' folder, when the
        monkeypatch.setattr(os, "access", lambda path, mode: False)  # data's is read-only
        assert dataset.prepared_stem(tiny_data, {"tokenizer": "char"}).startswith(str(deep))
        assert os.path.isdir(deep / "mini-gpt")
    finally:
        sys.setrecursionlimit(limit)
        for top in "abc":  # shutil.rmtree (pytest's clean-up too) calls itself once a folder
            remove_tree(tmp_path / top)


def remove_tree(top):
    folders = [top]
    for folder in folders:  # breadth first: the list grows as it is read
        for entry in os.scandir(folder):
            folders.append(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry)
    for folder in reversed(folders):
        os.rmdir(folder)


def test_explore_names_an_out_that_is_a_dead_link_or_a_loop(tmp_path, tiny_data):
    pytest.importorskip("matplotlib")
    import explore
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    os.symlink(tmp_path / "nowhere" / "deep", tmp_path / "dead")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for out, reason in (("dead", "is a symlink to nothing"), ("loop", "is a symlink loop")):
        one_error_line(run_in_process(explore.main, ["--checkpoint", tmp_path / "run.pt",
                                                     "--out", tmp_path / out]),
                       f"cannot create the output folder {tmp_path / out} ({tmp_path / out} "
                       f"{reason}); pass --out DIR")
    one_error_line(train_run(tiny_data, tmp_path / "loop" / "run.pt"), "loop is a symlink loop")


def test_a_checkpoint_name_too_long_for_its_side_files_is_refused_before_any_work(tmp_path,
                                                                                   tiny_data):
    # A file name may have 255 bytes; the longest the run writes is the metrics log's
    # temporary file, NAME.metrics.jsonl.PID.tmp, with a process id of up to 7 digits.
    for length in (237, 242, 300):
        result = train_run(tiny_data, tmp_path / ("b" * length + ".pt"))
        one_error_line(result, "is too long a name: the run also writes it with "
                               ".metrics.jsonl.PID.tmp added, and a file name may have 255 "
                               "bytes; pick a name of at most 229 bytes")
        assert "Loading data" not in result[1]
    assert os.listdir(tmp_path) == ["tiny.txt"]
    longest = tmp_path / ("b" * 226 + ".pt")  # 229 bytes: it trains, with its loss curve
    code, out, err = train_run(tiny_data, longest)
    assert code == 0 and "Note" not in out + err, out + err
    assert os.path.exists(f"{longest}.metrics.jsonl")


def test_a_data_name_too_long_for_its_token_files_is_refused_before_any_work(tmp_path):
    # The longest is the metadata's temporary file, NAME.char.tokens.json.PID.tmp.
    for length in (227, 231, 238):
        data = tmp_path / ("t" * (length - 4) + ".txt")
        data.write_text(TINY_TEXT)
        result = train_run(data, tmp_path / "run.pt")
        one_error_line(result, "is too long a name: its token files are named after it, with "
                               ".char.tokens.json.PID.tmp added, ")
        assert "rename it to at most 226 bytes" in result[2] and "Loading data" not in result[1]
        data.unlink()
    assert os.listdir(tmp_path) == []
    data = tmp_path / ("t" * 222 + ".txt")  # 226 bytes: it trains
    data.write_text(TINY_TEXT)
    assert train_run(data, tmp_path / "run.pt")[0] == 0


def test_a_folder_where_nothing_can_be_written_is_refused(tmp_path, tiny_data, monkeypatch):
    def read_only(path, *args, **kwargs):  # root may write anywhere, so pretend
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("checkpoint.open", read_only, raising=False)  # its probe only
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

TORCH_SAYS = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


@pytest.mark.parametrize("failure, torch_wraps, reason, fix", [
    # torch.save reports a failed write to its file as a RuntimeError raised while handling it.
    (OSError(28, "No space left on device"), True, "No space left on device",
     "Free some disk space"),
    (OSError(27, "File too large"), True, "File too large", "Free some disk space"),  # ulimit -f
    (OSError(28, "No space left on device"), False, "No space left on device",
     "Free some disk space"),
    # A file or folder made read-only during the run (chmod, chattr +i): space is not the fix.
    (PermissionError(13, "Permission denied"), False, "Permission denied", "Make"),
    (OSError(1, "Operation not permitted"), False, "Operation not permitted", "Make"),
    # A RuntimeError with no file error behind it: the likeliest cause is a full disk.
    (RuntimeError(TORCH_SAYS), False, "the disk is full or the file could not be written",
     "Free some disk space"),
])
def test_a_full_disk_at_save_names_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch,
                                                            failure, torch_wraps, reason, fix):
    checkpoint = tmp_path / "run.pt"
    real_save, saves = torch.save, []

    def save_then_fail(obj, f):
        saves.append(f)
        if len(saves) == 1:
            return real_save(obj, f)
        f.write(b"PK\x03\x04 half a checkpoint")  # half a file, then the write fails
        try:
            raise failure
        except OSError:
            if torch_wraps:
                raise RuntimeError(TORCH_SAYS)  # as torch does, with the OSError as its context
            raise

    monkeypatch.setattr(torch, "save", save_then_fail)
    line = one_error_line(train_run(tiny_data, checkpoint),
                          f"could not save the checkpoint to {checkpoint} ({reason})")
    monkeypatch.setattr(torch, "save", real_save)
    assert f"the last good checkpoint, {checkpoint}, is kept (step 1). {fix}" in line
    assert torch.load(checkpoint, weights_only=True)["step"] == 1  # intact
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_save_that_really_fails_is_told_by_its_cause(tmp_path):
    """No stand-ins: a real torch.save past a file size limit (ulimit -f) is out of room, and
    in a read-only folder it is a matter of permission."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    script = f"""
import os, resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, checkpoint

def failure(path):
    try:
        checkpoint.save_checkpoint({{"w": torch.zeros(10_000)}}, path)
    except (OSError, RuntimeError) as err:
        print(checkpoint.write_failure(err), checkpoint.out_of_room(err), sep=", ")

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
failure({str(tmp_path / "big.pt")!r})
os.chmod({str(read_only)!r}, 0o555)
if os.geteuid() == 0:  # root writes in any folder; another user does not
    os.setuid(65534)
failure({str(read_only / "run.pt")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.splitlines() == ["File too large, True", "Permission denied, False"], \
        result.stderr[-2000:]


def test_a_failed_first_save_says_no_checkpoint_was_saved(tmp_path, tiny_data, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
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
                   {"optimizer": None}, {"rng": []}, {"step": "2"}, {"config": None}):
        torch.save({**saved, **damage}, tmp_path / "damaged.pt")
        one_error_line(train_run(tiny_data, tmp_path / "new.pt", "--max_iters", "4",
                                 "--resume", tmp_path / "damaged.pt"), "cannot resume")


def damaged_optimizers(optimizer):
    """(how, optimizer, a state_dict(), damaged so), for each way a training step trips on: a
    crash, a traceback, or a NaN loss blamed on the learning rate."""
    state, groups = optimizer["state"], optimizer["param_groups"]
    first = state[0]  # the first parameter's: AdamW's step and moments, or Muon's momentum
    moment = "exp_avg" if "exp_avg" in first else "momentum_buffer"
    changes = {"another shape": {**first, moment: torch.zeros(3)},
               "NaN": {**first, moment: torch.full_like(first[moment], float("nan"))},
               "sparse": {**first, moment: first[moment].to_sparse()},
               "float8": {**first, moment: first[moment].to(torch.float8_e4m3fn)}}  # no isfinite
    if "step" in first:  # AdamW's: sqrt of a negative mean of squares makes the weights NaN
        changes["no step"] = {k: v for k, v in first.items() if k != "step"}
        changes["negative exp_avg_sq"] = {**first, "exp_avg_sq": -1 - first["exp_avg_sq"]}
    for how, entry in changes.items():
        yield how, {**optimizer, "state": {**state, 0: entry}}
    yield "another parameter", {**optimizer, "state": {**state, len(state) + 5: first}}
    yield "fewer groups", {**optimizer, "param_groups": groups[:-1] or [{"params": []}] * 2}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_damaged_optimizer_state_is_refused_before_pytorch_loads_it(tmp_path, tiny_data,
                                                                    optimizer):
    checkpoint, damaged, new = tmp_path / "run.pt", tmp_path / "damaged.pt", tmp_path / "new.pt"
    assert train_run(tiny_data, checkpoint, "--optimizer", optimizer)[0] == 0
    saved = torch.load(checkpoint, weights_only=True)
    resume = ["--max_iters", "4", "--optimizer", optimizer, "--resume", damaged]
    parts = saved["optimizer"] if optimizer == "muon" else {"": saved["optimizer"]}
    for part, state in parts.items():  # with Muon: AdamW's state and Muon's
        for how, broken in damaged_optimizers(state):
            torch.save({**saved, "optimizer": {**parts, part: broken} if part else broken},
                       damaged)
            if how == "another shape" and part != "muon":  # fused AdamW's kernel crashed on
                # it (a segmentation fault): in a process of its own
                run = run_script("train.py", "--data", tiny_data, "--checkpoint", new, *FLAGS,
                                 *resume)
                result = (run.returncode, run.stdout, run.stderr)
            else:
                result = train_run(tiny_data, new, *resume)
            one_error_line(result, " damaged ")  # the words, not this test's folder's name
            assert not new.exists(), how


def test_a_resumed_run_steps_with_its_own_optimizer_settings(tmp_path, tiny_data):
    """--weight_decay, --beta1/2 given to a resumed run take effect (the checkpoint's would
    otherwise win), and saved settings that make no sense do not matter."""
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    saved = torch.load(checkpoint, weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    saved["optimizer"]["param_groups"] = [{**groups[0], "betas": (0.9,), "eps": -1}, *groups[1:]]
    torch.save(saved, checkpoint)
    assert train_run(tiny_data, checkpoint, "--max_iters", "3", "--resume", "--weight_decay",
                     "0.5", "--beta2", "0.9")[0] == 0
    resumed = torch.load(checkpoint, weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in resumed] == [
        (0.5, (0.9, 0.9), 1e-8), (0.0, (0.9, 0.9), 1e-8)]


def test_a_resume_with_other_stepping_flags_names_them_in_one_note(tmp_path, tiny_data):
    """A flag left out at --resume is back at its default, and the run goes on with it: one
    note names each change, since the run is no longer exact. The same flags: no note; a flag
    the checkpoint does not record (old or hand-made): not named."""
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint, "--weight_decay", "0.5", "--beta2", "0.9")[0] == 0
    saved = torch.load(checkpoint, weights_only=True)
    del saved["config"]["beta2"]
    torch.save(saved, checkpoint)
    code, out, err = train_run(tiny_data, checkpoint, "--max_iters", "3", "--resume",
                               "--lr_decay_iters", "2")  # the decay of the 2 steps trained
    assert code == 0, err
    [note] = [line for line in out.splitlines() if line.startswith("Note: --")]
    assert note.startswith("Note: --weight_decay 0.5 -> 0.1: this run goes on with the new "
                           "values") and "repeat the old flags to go on exactly" in note, note
    code, out, err = train_run(tiny_data, checkpoint, "--max_iters", "4", "--resume",
                               "--weight_decay", "0.1", "--lr_decay_iters", "2")
    assert code == 0, err
    assert "Note:" not in out


def test_a_resume_that_stretches_the_learning_rate_or_changes_the_number_format_says_so(
        tmp_path, tiny_data):
    """A longer --max_iters stretches the cosine decay when --lr_decay_iters is 0 (the default):
    named, with how to keep it. --dtype auto and the format it picks here are the same."""
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint, "--dtype", "float32")[0] == 0
    code, out, err = train_run(tiny_data, checkpoint, "--max_iters", "4", "--resume",
                               "--dtype", "float32")
    assert code == 0, err
    [note] = [line for line in out.splitlines() if line.startswith("Note:")]
    assert note.startswith("Note: the learning rate's decay over 2 -> 4 steps (--lr_decay_iters "
                           "2 keeps it): this run goes on with the new values"), note
    picked = utils.pick_dtype("auto", "cpu")
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["dtype"] = "auto"  # as a run without --dtype saves it
    torch.save(saved, checkpoint)
    code, out, err = train_run(tiny_data, checkpoint, "--max_iters", "5", "--resume",
                               "--lr_decay_iters", "4", "--dtype", picked)
    assert code == 0, err
    assert "Note:" not in out
    # Past both runs' warmup and decay (step 5 of decays over 4 and 3 steps): min_lr either way.
    code, out, err = train_run(tiny_data, checkpoint, "--max_iters", "6", "--resume",
                               "--lr_decay_iters", "3", "--dtype", picked)
    assert code == 0, err
    assert "Note:" not in out


# --- an output that is an input; two outputs that share a name ------------------------------

def test_no_output_is_or_lies_inside_an_input(tmp_path, tiny_data):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(TINY_TEXT)
    before = files_in(folder)
    for checkpoint, fragment in ((folder / "b.txt", "would overwrite a file of the --data folder"),
                                 (folder / "runs" / "x.pt", "would write inside the --data folder")):
        one_error_line(train_run(folder, checkpoint), fragment)
    assert files_in(folder) == before and not (folder / "runs").exists()
    assert train_run(tiny_data, tmp_path / "first.pt")[0] == 0
    token_file = f"{tiny_data}.char.tokens"  # its own token file, which the run maps
    one_error_line(train_run(tiny_data, token_file), "would overwrite the token file")
    # The checkpoint to resume is read: a new run's metrics log must not be written over it.
    os.replace(tmp_path / "first.pt", tmp_path / "x.pt.metrics.jsonl")
    one_error_line(train_run(tiny_data, tmp_path / "x.pt", "--max_iters", "4", "--resume",
                             tmp_path / "x.pt.metrics.jsonl"), "would overwrite the checkpoint")
    assert torch.load(tmp_path / "x.pt.metrics.jsonl", weights_only=True)["step"] == 2


def test_two_checkpoints_never_share_a_log(tmp_path, tiny_data):
    for name in ("x.pt", "x.pth", "x"):
        assert train_run(tiny_data, tmp_path / name)[0] == 0
    for name in ("x.pt", "x.pth", "x"):
        assert val_steps(tmp_path / f"{name}.metrics.jsonl") == [0, 1, 2]  # each its own


# --- files that change under a run ------------------------------------------------------------

def test_a_text_that_changes_while_it_is_prepared_is_refused(tmp_path, monkeypatch):
    import dataset
    data = tmp_path / "growing.txt"
    data.write_text(TINY_TEXT)
    real_scan = dataset.scan

    def scan_then_append(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        with open(data, "a") as f:  # another program appends while this run prepares
            f.write("Zounds! A new line.\n")
        return result

    monkeypatch.setattr(dataset, "scan", scan_then_append)
    with pytest.raises(utils.UsageError, match="changed while it was being prepared"):
        dataset.load_corpus(Config(data=str(data)))
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tokens", ".tmp"))]


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_data_file_deleted_while_it_is_prepared_is_one_line(tmp_path, monkeypatch, tokenizer):
    import dataset
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(TINY_TEXT)
    real_scan = dataset.scan

    def scan_then_delete(*args, **kwargs):  # another program deletes a file after the first pass
        result = real_scan(*args, **kwargs)
        (folder / "b.txt").unlink()
        return result

    monkeypatch.setattr(dataset, "scan", scan_then_delete)
    with pytest.raises(utils.UsageError, match="No such file or directory"):
        dataset.load_corpus(Config(data=str(folder), tokenizer=tokenizer, vocab_size=300))
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tokens", ".tmp"))]


@pytest.mark.parametrize("damage", [
    "[1, 2]", '{"format": 1}', ("n_train", "many"), ("dtype", "float64"), ("tokenizer", [1]),
    ("sources", [1]), ("sources", [None]), ("sources", [{"a": 1}]),
    # Numbers that fit the token file's size but not each other: a character a token.
    ("n_chars", 5), pytest.param(lambda meta: {**meta, "n_train": 10, "n_val": meta["n_train"]
                                               + meta["n_val"] - 10}, id="another-split"),
    pytest.param("[" * 100_000 + "]" * 100_000, id="nested-too-deep-to-read")])
def test_damaged_token_metadata_is_prepared_anew(tmp_path, tiny_data, damage):
    import dataset
    first = dataset.load_corpus(Config(data=tiny_data))
    meta_path = f"{tiny_data}.char.tokens.json"
    if not isinstance(damage, str):  # entries of the metadata damaged: (key, value), or a change
        with open(meta_path) as f:
            meta = json.load(f)
        damage = json.dumps(damage(meta) if callable(damage) else {**meta, damage[0]: damage[1]})
    with open(meta_path, "w") as f:
        f.write(damage)
    again = dataset.load_corpus(Config(data=tiny_data))
    assert (again.n_train, again.n_val, again.sha256) == (first.n_train, first.n_val, first.sha256)
    assert again.n_chars == first.n_chars


def test_a_touched_text_whose_metadata_cannot_be_updated_is_used_with_a_note(tmp_path, tiny_data,
                                                                            monkeypatch, capsys):
    import dataset
    first = dataset.load_corpus(Config(data=tiny_data))
    os.utime(tiny_data, ns=(1, 1))  # as `touch` or `cp`: a new time, the same bytes
    before, replace = files_in(tmp_path), os.replace

    def immutable_metadata(source, target):  # a stand-in for chattr +i, which needs root
        if str(target).endswith(".tokens.json"):
            raise PermissionError(1, "Operation not permitted")
        replace(source, target)

    monkeypatch.setattr(os, "replace", immutable_metadata)
    again = dataset.load_corpus(Config(data=tiny_data))
    assert (again.n_train, again.sha256) == (first.n_train, first.sha256)
    assert f"Note: cannot update {tiny_data}.char.tokens.json (Operation not permitted); the " \
           f"tokens are right" in capsys.readouterr().out
    assert files_in(tmp_path) == before  # and no .tmp left


@pytest.mark.parametrize("suffix", [".tokens", ".tokens.json"])
def test_a_read_only_token_file_is_named_before_preparing_and_nothing_deleted(tmp_path, tiny_data,
                                                                              monkeypatch, suffix):
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    with open(tiny_data, "a") as f:
        f.write("more text here\n")  # changed: its tokens must be prepared anew
    read_only = f"{tiny_data}.char{suffix}"
    os.chmod(read_only, 0o444)
    if os.geteuid() == 0:  # root may write any file but one made immutable (chattr +i)
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and
                            not (mode == os.W_OK and str(path) == read_only))
    before = files_in(tmp_path)
    result = train_run(tiny_data, tmp_path / "new.pt")
    one_error_line(result, f"the token file {read_only} is read-only; make it writable, or "
                           f"delete it")
    assert files_in(tmp_path) == before


def stand_in_for_chattr(monkeypatch, flagged=(), refused=()):
    """chattr +a (append-only) on the flagged paths, which needs root, as a run sees it: opening
    them for anything but appending, a rename over them and their removal fail. Only the last
    two on refused: found only when replaced (another user's file in /tmp)."""
    opener, replace, remove = os.open, os.replace, os.remove
    flagged, refused = {str(p) for p in flagged}, {str(p) for p in [*flagged, *refused]}

    def fails_on(paths, act):
        def act_unless_refused(*args, **kwargs):
            path = args[-1] if act is not opener else args[0]
            writes = act is not opener or (args[1] & os.O_ACCMODE and not args[1] & os.O_APPEND)
            if str(path) in paths and writes:
                raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
            return act(*args, **kwargs)
        return act_unless_refused

    monkeypatch.setattr(os, "open", fails_on(flagged, opener))
    monkeypatch.setattr(os, "replace", fails_on(refused, replace))
    monkeypatch.setattr(os, "remove", fails_on(refused, remove))


@pytest.mark.parametrize("flagged", ["run.pt", "tiny.txt.char.tokens", "tiny.txt.char.tokens.json",
                                     "look/embeddings.png"])
def test_append_only_files_are_refused_before_any_work_and_kept(tmp_path, tiny_data,
                                                                monkeypatch, flagged):
    pytest.importorskip("matplotlib")
    import explore
    checkpoint, look = tmp_path / "run.pt", tmp_path / "look"
    assert train_run(tiny_data, checkpoint)[0] == 0
    assert run_in_process(explore.main, ["--checkpoint", checkpoint, "--out", look])[0] == 0
    with open(tiny_data, "a") as f:
        f.write("more text here\n")  # changed: its tokens must be prepared anew
    before, look_before, path = files_in(tmp_path), files_in(look), tmp_path / flagged
    stand_in_for_chattr(monkeypatch, flagged=[path])
    named = {"run.pt": "--checkpoint ", "look/embeddings.png": ""}.get(flagged, "the token file ")
    result = (run_in_process(explore.main, ["--checkpoint", checkpoint, "--out", look])
              if flagged.startswith("look") else
              train_run(tiny_data, checkpoint, "--resume", "--max_iters", "4"))
    one_error_line(result, f"{named}{path} is append-only, so it cannot be replaced; clear that "
                           f"flag (chattr -a {path}), or ")
    assert "Starting training" not in result[1] and "After each token" not in result[1]
    assert files_in(tmp_path) == before and files_in(look) == look_before


@pytest.mark.parametrize("refused", [".tokens", ".tokens.json"])
def test_token_files_that_cannot_be_replaced_are_named_and_the_metadata_kept(tmp_path, tiny_data,
                                                                              monkeypatch, refused):
    import dataset
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    with open(tiny_data, "a") as f:
        f.write("more text here\n")
    before, path = files_in(tmp_path), f"{tiny_data}.char{refused}"
    stand_in_for_chattr(monkeypatch, refused=[path])  # found only when it is replaced
    one_error_line(train_run(tiny_data, tmp_path / "new.pt"),
                   f"cannot write the token file {path} (Operation not permitted); delete {path}")
    after = files_in(tmp_path)
    assert after["tiny.txt.char.tokens.json"] == before["tiny.txt.char.tokens.json"]
    if refused == ".tokens":  # the metadata is never removed before the tokens it describes
        assert after == before
    monkeypatch.undo()  # the old metadata left beside new tokens fits no longer: prepared anew
    assert dataset.load_corpus(Config(data=tiny_data)).n_chars == len(TINY_TEXT) + 15


def test_a_file_that_chattr_made_append_only_is_refused_and_kept(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("a line")
    if not shutil.which("chattr") or subprocess.run(["chattr", "+a", path]).returncode:
        pytest.skip("chattr +a needs root, on Linux")
    try:
        with pytest.raises(utils.UsageError, match="log.txt is append-only"):
            check_writable(str(path), str(path), "pick another")
        assert path.read_text() == "a line"
    finally:
        subprocess.run(["chattr", "-a", path], check=True)
    check_writable(str(path), str(path), "pick another")  # writable again


def test_token_ids_beyond_the_vocabulary_are_a_clear_error(tmp_path, tiny_data):
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    token_file = f"{tiny_data}.char.tokens"
    size = os.path.getsize(token_file)
    with open(token_file, "wb") as f:  # same size, so it passes the cheap checks at start
        f.write(b"\xff" * size)
    one_error_line(train_run(tiny_data, tmp_path / "new.pt"), "is damaged (an id beyond")


def test_resume_on_another_text_with_the_same_characters_is_refused(tmp_path, tiny_data):
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    shuffled = tmp_path / "shuffled.txt"  # the same characters, another text
    shuffled.write_text("".join(reversed(TINY_TEXT.splitlines(keepends=True))))
    one_error_line(train_run(shuffled, tmp_path / "run.pt", "--max_iters", "4", "--resume"),
                   "it was trained on another text")


# --- where caches go --------------------------------------------------------------------------

def test_an_unwritable_cache_folder_names_it_and_the_variable(tmp_path, tiny_data, monkeypatch):
    import dataset
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and
                        real_access(path, mode))  # a read-only data folder (root writes anyway)
    with pytest.raises(utils.UsageError, match=f"cache folder {blocker}/mini-gpt.*set "
                                               f"XDG_CACHE_HOME"):
        dataset.load_corpus(Config(data=tiny_data))


# --- honest last lines; the right cause ---------------------------------------------------------

def test_resume_at_its_last_step_says_there_is_nothing_to_train(tmp_path, tiny_data):
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    before = files_in(tmp_path)
    one_error_line(train_run(tiny_data, tmp_path / "run.pt", "--resume"),
                   "is at step 2, at --max_iters 2; pass a larger --max_iters")
    assert files_in(tmp_path) == before


def test_a_failing_torch_compile_falls_back_with_a_note(tmp_path, tiny_data, monkeypatch):
    if utils.compile_problem("cpu"):
        pytest.skip(utils.compile_problem("cpu"))
    real_compile = torch.compile

    def broken_backend(graph, inputs):
        raise RuntimeError("the C++ compiler crashed")

    monkeypatch.setattr(train.torch, "compile",
                        lambda model: real_compile(model, backend=broken_backend))
    code, out, err = train_run(tiny_data, tmp_path / "run.pt", "--compile", "true")
    assert code == 0, err
    assert out.count("Note: running without torch.compile: it failed with") == 1
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] == 2


def test_resume_with_another_tokenizer_or_vocabulary_names_it(tmp_path, tiny_data):
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    one_error_line(train_run(tiny_data, tmp_path / "run.pt", "--max_iters", "4", "--resume",
                             "--tokenizer", "bpe", "--vocab_size", "300"),
                   "it was trained with --tokenizer char; pass --tokenizer char")
    bpe = ["--tokenizer", "bpe", "--vocab_size", "300"]
    assert train_run(tiny_data, tmp_path / "bpe.pt", *bpe)[0] == 0
    one_error_line(train_run(tiny_data, tmp_path / "bpe.pt", "--max_iters", "4", "--resume",
                             "--tokenizer", "bpe", "--vocab_size", "280"),
                   "--vocab_size 300; pass --vocab_size 300")
    # Another BPE sample learns other merges from the same text: the flag is named, not the text.
    one_error_line(train_run(tiny_data, tmp_path / "bpe.pt", "--max_iters", "4", "--resume",
                             *bpe, "--bpe_sample_chars", "100"),
                   "--bpe_sample_chars 10000000; pass --bpe_sample_chars 10000000")


@pytest.mark.parametrize("damage", ["no optimizer state", "vocab_size None", "optimizer None"])
def test_resume_names_the_flags_first_and_a_saved_none_is_unknown(tmp_path, tiny_data, damage):
    """Another --tokenizer, text or shape is named before the state the checkpoint lacks (a
    hand-made one has no optimizer); a flag saved as None is unknown, as if not saved."""
    bpe = ["--tokenizer", "bpe", "--vocab_size", "300"]
    assert train_run(tiny_data, tmp_path / "bpe.pt", *bpe)[0] == 0
    checkpoint = torch.load(tmp_path / "bpe.pt", weights_only=True)
    if damage == "no optimizer state":
        del checkpoint["optimizer"], checkpoint["config"]
        torch.save(checkpoint, tmp_path / "bpe.pt")
        one_error_line(train_run(tiny_data, tmp_path / "bpe.pt", "--max_iters", "4", "--resume"),
                       "it was trained with --tokenizer bpe; pass --tokenizer bpe")
        one_error_line(train_run(tiny_data, tmp_path / "bpe.pt", "--max_iters", "4", "--resume",
                                 *bpe, "--n_layer", "3"), "the model shape differs (n_layer 2 -> 3)")
    else:
        checkpoint["config"][damage.split()[0]] = None  # else "pass --optimizer None"
        torch.save(checkpoint, tmp_path / "bpe.pt")
        assert train_run(tiny_data, tmp_path / "bpe.pt", "--max_iters", "4", "--resume",
                         *bpe)[0] == 0


def test_resume_refuses_a_checkpoint_without_a_whole_training_state(tmp_path, tiny_data):
    """Each entry --resume goes on from must be there and of its kind, or one line says so."""
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    for key, damaged in (("rng", None), ("rng", []), ("step", -1), ("step", True),
                         ("step", 2.0), ("val_loss", 1), ("config", []), ("optimizer", None)):
        torch.save({**saved, key: damaged}, tmp_path / "damaged.pt")
        one_error_line(train_run(tiny_data, tmp_path / "damaged.pt", "--max_iters", "4",
                                 "--resume"), "it has no optimizer or random state, or a damaged one")


def test_resume_refuses_a_damaged_random_state_in_one_line(tmp_path, tiny_data):
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    name, keys, *rest = saved["rng"][0]["numpy"]
    version, python_state, gauss = saved["rng"][0]["python"]
    for key, damaged in (("torch", 5), ("numpy", (name, [1, 2, 3], *rest)),  # no .cpu()
                         ("python", (version, (-1,) * len(python_state), gauss))):  # Overflow
        rng = [{**saved["rng"][0], key: damaged}]
        torch.save({**saved, "rng": rng}, tmp_path / "damaged.pt")
        one_error_line(train_run(tiny_data, tmp_path / "damaged.pt", "--max_iters", "4",
                                 "--resume"), "its optimizer or random state is damaged")


def test_a_folder_where_the_token_file_goes_is_named_as_such(tmp_path, tiny_data):
    os.mkdir(f"{tiny_data}.char.tokens")
    line = one_error_line(train_run(tiny_data, tmp_path / "run.pt"), "is in the way: move it")
    assert "disk space" not in line


def test_a_prompt_with_a_byte_that_is_not_utf8_names_the_byte(tmp_path, tiny_data):
    import generate
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    line = one_error_line(run_in_process(generate.main, [
        "--checkpoint", tmp_path / "run.pt", "--device", "cpu", "--prompt", "Romeo \udcc3"]),
        "the byte 0xc3, not UTF-8); remove it, or convert the text to UTF-8")
    assert "not in the model's vocabulary" not in line


# --- explore.py's outputs ---------------------------------------------------------------------

def test_explore_refuses_an_occupied_or_unwritable_out_and_its_own_checkpoint(tmp_path,
                                                                              tiny_data,
                                                                              monkeypatch):
    pytest.importorskip("matplotlib")
    import explore
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    look = tmp_path / "look"
    (look / "attention.png").mkdir(parents=True)
    explore_args = ["--checkpoint", checkpoint, "--prompt", "ROMEO:", "--out"]
    one_error_line(run_in_process(explore.main, [*explore_args, look]),
                   f"cannot write {look}/attention.png")
    os.rmdir(look / "attention.png")
    os.replace(checkpoint, look / "embeddings.png")  # a checkpoint named like a picture
    one_error_line(run_in_process(explore.main, ["--checkpoint", look / "embeddings.png",
                                                 "--prompt", "ROMEO:", "--out", look]),
                   "would overwrite the --checkpoint")
    assert torch.load(look / "embeddings.png", weights_only=True)["step"] == 2
    os.replace(look / "embeddings.png", checkpoint)

    def read_only(path, *args, **kwargs):  # root may write anywhere, so pretend
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(explore, "open", read_only, raising=False)
    one_error_line(run_in_process(explore.main, [*explore_args, look]), "(Read-only file system)")


def test_explore_replaces_a_link_in_its_folder_and_never_writes_through_it(tmp_path, tiny_data):
    pytest.importorskip("matplotlib")
    import explore
    checkpoint, notes = tmp_path / "run.pt", tmp_path / "notes.txt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    notes.write_text("my notes")
    (tmp_path / "run.pt.explore").mkdir()
    os.symlink(notes, tmp_path / "run.pt.explore" / "attention.png")  # the default folder
    assert run_in_process(explore.main, ["--checkpoint", checkpoint])[0] == 0
    assert notes.read_text() == "my notes"
    picture = tmp_path / "run.pt.explore" / "attention.png"
    assert not os.path.islink(picture) and picture.read_bytes().startswith(b"\x89PNG")


def test_explore_refuses_a_read_only_earlier_picture_before_drawing_any(tmp_path, tiny_data,
                                                                        monkeypatch):
    pytest.importorskip("matplotlib")
    import explore
    checkpoint, look = tmp_path / "run.pt", tmp_path / "look"
    assert train_run(tiny_data, checkpoint)[0] == 0
    explore_args = ["--checkpoint", checkpoint, "--out", look]
    assert run_in_process(explore.main, explore_args)[0] == 0
    before = files_in(look)
    os.chmod(look / "embeddings.png", 0o444)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes through chmod: as chattr +i
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: access(
            path, mode, **kwargs) and not str(path).endswith("embeddings.png"))
    refused = run_in_process(explore.main, [*explore_args, "--prompt", "JULIET:"])
    one_error_line(refused, f"{look / 'embeddings.png'} is read-only; make it writable")
    assert "After each token" not in refused[1]  # refused before the work
    assert files_in(look) == before  # attention.png too: not one picture replaced


def test_explore_on_a_full_disk_keeps_the_earlier_pictures_whole(tmp_path, tiny_data):
    pytest.importorskip("matplotlib")
    resource = pytest.importorskip("resource")
    import explore
    checkpoint, look = tmp_path / "run.pt", tmp_path / "look"
    assert train_run(tiny_data, checkpoint)[0] == 0
    explore_args = ["--checkpoint", checkpoint, "--out", look]
    assert run_in_process(explore.main, explore_args)[0] == 0
    before = files_in(look)
    # A file-size limit of 8 KiB (ulimit -f 8) stands in for a full disk: each picture is bigger.
    full = subprocess.run([sys.executable, os.path.join(ROOT, "explore.py"),
                           *map(str, explore_args), "--prompt", "JULIET:"],
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192,) * 2))
    one_error_line((full.returncode, full.stdout, full.stderr), "(File too large); free some")
    assert files_in(look) == before  # each picture as it was, and no half-written file left


def test_explore_draws_a_checkpoint_with_a_vocabulary_of_one(tmp_path):
    pytest.importorskip("matplotlib")
    import explore
    data = tmp_path / "one.txt"
    data.write_text("a" * 400)
    assert train_run(data, tmp_path / "one.pt", "--n_embd", "8", "--n_head", "1")[0] == 0
    code, out, err = run_in_process(explore.main, ["--checkpoint", tmp_path / "one.pt",
                                                   "--prompt", "aaa"])
    assert code == 0, err
    assert (tmp_path / "one.pt.explore" / "embeddings.png").exists()


def test_releasing_a_lock_never_deletes_a_file_put_in_its_place(tmp_path):
    lock_path = str(tmp_path / "run.pt.lock")
    lock = utils.take_lock(lock_path, wait=False)
    (tmp_path / "checkpoint").write_text("another run's checkpoint, saved under that name")
    os.replace(tmp_path / "checkpoint", lock_path)
    utils.release_lock(lock_path, lock)
    assert open(lock_path).read().startswith("another run's checkpoint")


def test_a_lock_file_that_is_a_symlink_is_never_written_through(tmp_path, tiny_data):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    os.symlink(notes, tmp_path / "run.pt.lock")  # the name of the run's lock, made by hand
    one_error_line(train_run(tiny_data, tmp_path / "run.pt"), "lock file")
    assert notes.read_text() == "my notes" and os.path.islink(tmp_path / "run.pt.lock")


def test_an_empty_or_hard_linked_file_at_a_locks_name_is_neither_written_nor_removed(
        tmp_path, tiny_data):
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"")
    os.link(mine, tmp_path / "run.pt.lock")  # another name for a file of the user's
    before = files_in(tmp_path)
    one_error_line(train_run(tiny_data, tmp_path / "run.pt"),
                   "(it is not a lock a run left: those hold only 'process N' and have one link); "
                   "move it away")
    assert files_in(tmp_path) == before and os.path.samefile(mine, tmp_path / "run.pt.lock")
    mine.write_bytes(b"process 12")  # even holding what a lock holds: the link says it is not
    one_error_line(train_run(tiny_data, tmp_path / "run.pt"), "not a lock a run left")
    assert mine.read_bytes() == b"process 12"
    for name in ("run.pt.lock", "tiny.txt.char.tokens.lock"):  # an empty file of the user's
        (tmp_path / "run.pt.lock").unlink(missing_ok=True)
        (tmp_path / name).write_bytes(b"")
        one_error_line(train_run(tiny_data, tmp_path / "run.pt"), "not a lock a run left")
        assert (tmp_path / name).read_bytes() == b""


def test_a_fifo_at_a_locks_name_is_named_as_such(tmp_path, tiny_data):
    for name in ("run.pt.lock", "tiny.txt.char.tokens.lock"):
        os.mkfifo(tmp_path / name)
        one_error_line(train_run(tiny_data, tmp_path / "run.pt"),
                       f"{name} (it is a FIFO or a socket, not a regular file); move it away")
        os.remove(tmp_path / name)


def test_a_lock_whose_name_is_too_long_says_what_to_shorten(tmp_path):
    data = tmp_path / ("d" * 240 + ".txt")  # a name the file system takes, but not
    data.write_text(TINY_TEXT)  # with .char.tokens.lock added
    # train.py refuses the data's name before it takes the lock: its token files' names.
    one_error_line(train_run(data, tmp_path / "run.pt"), "is too long a name")
    with pytest.raises(utils.UsageError) as refused:
        utils.take_lock(f"{data}.char.tokens.lock", wait=True)
    assert "char.tokens.lock (File name too long); shorten the name it is built from" in \
        str(refused.value)
    assert os.listdir(tmp_path) == [data.name]


def test_a_full_disk_while_taking_a_lock_is_one_line_and_leaves_no_lock(tmp_path, tiny_data):
    resource = pytest.importorskip("resource")
    # A file-size limit of 0 bytes (ulimit -f 0) stands in for a full disk: the lock file can
    # be made, but its few bytes ("process N") cannot be written.
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--data", tiny_data, "--checkpoint",
         tmp_path / "run.pt", *FLAGS], capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    one_error_line((result.returncode, result.stdout, result.stderr),
                   f"cannot write the lock file {tmp_path / 'run.pt.lock'} (File too large); "
                   f"free some disk space")
    assert os.listdir(tmp_path) == ["tiny.txt"]


def test_files_named_like_temporary_files_are_kept_unless_a_killed_run_left_them(tmp_path,
                                                                                  tiny_data):
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    mine = {"run.pt.2.tmp": b"my draft v2", "tiny.txt.char.tokens.2024.tmp": b"notes",
            "run.pt.metrics.jsonl.12.tmp": b"mine", "run.pt.notes.99999999.tmp": b"mine too"}
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    # Runs killed (kill -9) while saving and preparing left their locks, which name them, and
    # the files they were writing then: a checkpoint, log or picture; tokens or their metadata.
    for stem in "run.pt", "tiny.txt.char.tokens":
        (tmp_path / f"{stem}.lock").write_bytes(b"process 99999999")
    for name in ("run.pt", "run.pt.metrics.jsonl", "run.pt.loss.png", "tiny.txt.char.tokens",
                 "tiny.txt.char.tokens.json"):
        (tmp_path / f"{name}.99999999.tmp").write_bytes(b"half written")
    assert train_run(tiny_data, tmp_path / "run.pt", "--resume", "--max_iters", "3")[0] == 0
    assert {name: (tmp_path / name).read_bytes() for name in mine} == mine
    assert not [name for name in os.listdir(tmp_path) if "99999999" in name and name not in mine
                or name.endswith(".lock")]


def test_files_named_like_a_runs_side_files_or_locks_are_refused_and_kept(tmp_path, tiny_data):
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    # No run.pt exists: none of these can be an earlier run's.
    for name, fragment in (("run.pt.metrics.jsonl", "that train.py did not write"),
                           ("run.pt.loss.png", "that train.py did not write"),
                           ("run.pt.lock", "not a lock a run left"),
                           ("tiny.txt.char.tokens.lock", "not a lock a run left")):
        if name.endswith(".png"):  # a link: savefig would write the curve through it
            os.symlink(notes, tmp_path / name)
        else:
            (tmp_path / name).write_text('{"my": "own notes"}')
        before = files_in(tmp_path)
        result = train_run(tiny_data, tmp_path / "run.pt")
        one_error_line(result, fragment)
        assert "Starting training" not in result[1]
        assert files_in(tmp_path) == before  # nothing emptied, written through or removed
        os.remove(tmp_path / name)


def test_deeply_nested_json_at_a_logs_or_reports_name_is_a_file_not_ours(tmp_path, tiny_data):
    import bench
    nested = "[" * 200_000 + "]" * 200_000  # deeper than Python's JSON parser goes
    (tmp_path / "run.pt.metrics.jsonl").write_text(nested)
    (tmp_path / "report.json").write_text(nested)
    before = files_in(tmp_path)
    one_error_line(train_run(tiny_data, tmp_path / "run.pt"),
                   "run.pt.metrics.jsonl is a file that train.py did not write")
    one_error_line(run_in_process(bench.main, ["report", "--device", "cpu", "--quick", "--json",
                                               tmp_path / "report.json"]),
                   "report.json is a file that bench.py did not write")
    assert files_in(tmp_path) == before


def test_a_users_log_beside_an_earlier_checkpoint_is_refused_and_kept(tmp_path, tiny_data):
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    (tmp_path / "run.pt.metrics.jsonl").write_text("my notes\n")  # the log known by its content
    before = files_in(tmp_path)
    one_error_line(train_run(tiny_data, checkpoint),
                   "run.pt.metrics.jsonl is a file that train.py did not write")
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("log_text", ["", '{"step": 1, "note": "my own experiment log"}\n'])
def test_a_users_picture_is_kept_whatever_log_sits_beside_it(tmp_path, tiny_data, log_text):
    """An empty log, or another tool's rows that also start with a step, say nothing about the
    picture beside them: without train.py's tag or checkpoint, it is the user's."""
    (tmp_path / "new.pt.loss.png").write_text("my holiday photo")
    (tmp_path / "new.pt.metrics.jsonl").write_text(log_text)
    before = files_in(tmp_path)
    refused = "is a file that train.py did not write"
    one_error_line(train_run(tiny_data, tmp_path / "new.pt"), refused)
    assert files_in(tmp_path) == before


def test_a_runs_own_log_whose_first_row_is_megabytes_long_is_still_its_own(tmp_path, tiny_data):
    # --eval_sample_tokens puts the step-0 sample in the first row, 6 bytes a character (\uXXXX)
    # for Chinese text: a long sample makes it megabytes.
    checkpoint, log = tmp_path / "run.pt", tmp_path / "run.pt.metrics.jsonl"
    assert train_run(tiny_data, checkpoint)[0] == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows[0]["sample"] = "\u4e2d" * 200_000
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, _, err = train_run(tiny_data, checkpoint, "--resume", "--max_iters", "3")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()][-1] == 3


def test_an_untagged_curve_beside_the_runs_own_log_is_replaced(tmp_path, tiny_data):
    """Loss curves drawn before curves were tagged: known by train.py's log beside them, with
    or without the checkpoint (a run stopped early, or one deleted to start over)."""
    pytest.importorskip("matplotlib")
    checkpoint, curve = tmp_path / "run.pt", tmp_path / "run.pt.loss.png"
    assert train_run(tiny_data, checkpoint)[0] == 0
    os.remove(checkpoint)
    plt = tracking.pyplot()
    figure = plt.figure()
    figure.savefig(curve, format="png")  # matplotlib's own tag, not train.py's
    plt.close(figure)
    untagged = curve.read_bytes()
    assert train_run(tiny_data, checkpoint)[0] == 0
    assert curve.read_bytes() != untagged
    assert png_tagged(curve, tracking.CURVE_TAG)  # drawn by this run


def test_a_runs_own_side_files_are_replaced_through_a_link_never_written_through(tmp_path,
                                                                               tiny_data):
    pytest.importorskip("matplotlib")
    checkpoint = tmp_path / "run.pt"
    # A run stopped before its first save leaves a log but no checkpoint: still its own.
    one_error_line(train_run(tiny_data, checkpoint, "--learning_rate", "1e30", "--weight_decay",
                             "0", "--grad_clip", "0", "--warmup_iters", "0"), "NaN or infinite")
    assert not checkpoint.exists() and (tmp_path / "run.pt.metrics.jsonl").exists()
    assert train_run(tiny_data, checkpoint)[0] == 0
    os.remove(checkpoint)  # without it, the curve is known as train.py's by its tag
    assert train_run(tiny_data, checkpoint)[0] == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    os.remove(tmp_path / "run.pt.loss.png")
    os.symlink(notes, tmp_path / "run.pt.loss.png")  # beside its checkpoint: the run's to replace
    assert train_run(tiny_data, checkpoint)[0] == 0
    assert notes.read_text() == "my precious notes"
    assert (tmp_path / "run.pt.loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_named_like_the_datas_token_files_does_not_wait_for_itself(tmp_path,
                                                                               tiny_data):
    # <data>.char was once the stem of the data's lock too: the run waited on its own lock.
    result = run_script("train.py", "--data", tiny_data, "--checkpoint", f"{tiny_data}.char",
                        *FLAGS, timeout=90)
    assert result.returncode == 0, result.stderr
    assert torch.load(f"{tiny_data}.char", weights_only=True)["step"] == 2


def test_a_full_disk_while_preparing_tokens_says_why_and_to_free_space(tmp_path):
    import resource
    data = tmp_path / "long.txt"
    data.write_text(TINY_TEXT * 10)  # 2 bytes a token: more than the 40 kB a file may hold
    before = files_in(tmp_path)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--checkpoint",
         tmp_path / "run.pt", *FLAGS], capture_output=True, text=True, timeout=90,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000)))
    one_error_line((result.returncode, result.stdout, result.stderr),
                   "long.txt.char.tokens (File too large); free some disk space")
    assert files_in(tmp_path) == before


def test_a_read_only_checkpoint_is_refused_before_any_work(tmp_path, tiny_data, monkeypatch):
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    os.chmod(checkpoint, 0o444)
    if os.geteuid() == 0:  # root may write any file but one made immutable (chattr +i)
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and
                            not (mode == os.W_OK and str(path) == str(checkpoint)))
    before = files_in(tmp_path)
    result = train_run(tiny_data, checkpoint, "--resume", "--max_iters", "4")
    one_error_line(result, f"--checkpoint {checkpoint} is read-only; make it writable")
    assert "Loading data" not in result[1] and files_in(tmp_path) == before


def test_a_checkpoint_that_is_a_dead_link_or_a_fifo_is_named_as_such(tmp_path, tiny_data):
    import generate
    os.symlink(tmp_path / "nowhere.pt", tmp_path / "dead.pt")
    os.mkfifo(tmp_path / "pipe.pt")
    one_error_line(run_in_process(generate.main, ["--checkpoint", tmp_path / "dead.pt"]),
                   "is a symlink to nothing")
    one_error_line(train_run(tiny_data, tmp_path / "run.pt", "--resume", tmp_path / "pipe.pt"),
                   "is a FIFO or a socket, not a regular file")


def test_a_fresh_run_replaces_only_a_checkpoint(tmp_path, tiny_data):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    one_error_line(train_run(tiny_data, notes), "is a file that train.py did not write")
    assert notes.read_text() == "my notes" and not os.path.exists(f"{notes}.metrics.jsonl")
    os.mkfifo(tmp_path / "pipe.pt")  # a rename would put a file in place of the FIFO
    one_error_line(train_run(tiny_data, tmp_path / "pipe.pt"), "is a FIFO or a socket")
    assert os.path.exists(tmp_path / "pipe.pt") and not os.path.isfile(tmp_path / "pipe.pt")
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0  # an earlier checkpoint: replaced


def test_a_fresh_run_keeps_a_nanogpt_checkpoint_of_the_same_name(tmp_path, tiny_data):
    # nanoGPT's ckpt.pt: plain tensors and values (no pickle needed), model_args among them.
    weights = {"transformer.wte.weight": torch.randn(65, 32), "lm_head.weight": torch.randn(65, 32)}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(w) for w in weights.values()])
    nanogpt = tmp_path / "out-shakespeare-char" / "ckpt.pt"
    nanogpt.parent.mkdir()
    torch.save(dict(model=weights, optimizer=optimizer.state_dict(), iter_num=2000,
                    best_val_loss=torch.tensor(1.47), config=dict(dataset="shakespeare_char"),
                    model_args=dict(n_layer=2, n_head=4, n_embd=32, block_size=64, bias=False,
                                    vocab_size=65, dropout=0.0)), nanogpt)
    before = files_in(nanogpt.parent)
    one_error_line(train_run(tiny_data, nanogpt), "is a file that train.py did not write")
    assert files_in(nanogpt.parent) == before


def test_a_fresh_run_replaces_a_damaged_checkpoint_of_its_own(tmp_path, tiny_data):
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    saved = torch.load(checkpoint, weights_only=True)
    next(iter(saved["model"].values())).view(-1)[0] = float("nan")  # damaged, but train.py's
    torch.save(saved, checkpoint)
    assert train_run(tiny_data, checkpoint)[0] == 0  # replaced, as an undamaged one would be
    assert all(torch.isfinite(w).all() for w in torch.load(checkpoint, weights_only=True)["model"].values())


def test_explore_replaces_only_its_own_pictures_in_out(tmp_path, tiny_data):
    pytest.importorskip("matplotlib")
    import explore
    checkpoint = tmp_path / "run.pt"
    assert train_run(tiny_data, checkpoint)[0] == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "attention.png").write_text("my own picture")
    os.symlink(tiny_data, photos / "embeddings.png")  # written through, it would hit the text
    explore_args = ["--checkpoint", checkpoint, "--prompt", "ROMEO:", "--out", photos]
    refused = run_in_process(explore.main, explore_args)
    one_error_line(refused, "did not write")
    assert "After each token" not in refused[1]  # refused before the work: no table printed
    assert (photos / "attention.png").read_text() == "my own picture"
    assert open(tiny_data, encoding="utf-8").read() == TINY_TEXT
    os.remove(photos / "attention.png")
    os.remove(photos / "embeddings.png")
    for _ in range(2):  # the second run replaces the first run's pictures
        assert run_in_process(explore.main, explore_args)[0] == 0


def test_explore_replaces_only_its_own_pictures_in_the_default_folder_too(tmp_path, tiny_data):
    pytest.importorskip("matplotlib")
    import explore
    checkpoint, default, photos = tmp_path / "run.pt", tmp_path / "run.pt.explore", tmp_path / "photos"
    assert train_run(tiny_data, checkpoint)[0] == 0
    default.mkdir()
    (default / "embeddings.png").write_text("my notes")
    refused = run_in_process(explore.main, ["--checkpoint", checkpoint])
    line = one_error_line(refused, "embeddings.png is a file that explore.py did not write")
    assert line.startswith("error: the picture ") and "pass --out DIR" in line, line  # no --out given
    assert "After each token" not in refused[1]  # refused before the work
    assert files_in(default) == {"embeddings.png": b"my notes"}
    shutil.rmtree(default)
    photos.mkdir()
    (photos / "attention.png").write_text("my holiday")
    os.symlink(photos, default)  # the default folder, a link to a folder of yours
    one_error_line(run_in_process(explore.main, ["--checkpoint", checkpoint]),
                   "attention.png is a file that explore.py did not write")
    assert files_in(photos) == {"attention.png": b"my holiday"}
    os.remove(photos / "attention.png")
    for _ in range(2):  # the second run replaces the first run's pictures
        assert run_in_process(explore.main, ["--checkpoint", checkpoint])[0] == 0


def test_a_bad_resume_or_compare_checkpoint_names_its_own_flag(tmp_path, tiny_data):
    import explore
    assert train_run(tiny_data, tmp_path / "run.pt")[0] == 0
    damaged = torch.load(tmp_path / "run.pt", weights_only=True)
    damaged["model"]["tok_emb.weight"][0, 0] = float("nan")
    torch.save(damaged, tmp_path / "nan.pt")
    one_error_line(train_run(tiny_data, tmp_path / "new.pt", "--resume", tmp_path / "nan.pt"),
                   "retrain, or pass another --resume")
    serve = ["--serve", "--checkpoint", tmp_path / "run.pt", "--port", "0", "--compare"]
    one_error_line(run_in_process(explore.main, [*serve, tmp_path / "missing.pt"]),
                   "or pass --compare PATH")
    one_error_line(run_in_process(explore.main, [*serve, tmp_path]), f"--compare {tmp_path} is")


def test_resuming_a_muon_run_with_reference_says_to_drop_reference(tmp_path, tiny_data):
    assert train_run(tiny_data, tmp_path / "run.pt", "--optimizer", "muon")[0] == 0
    one_error_line(train_run(tiny_data, tmp_path / "run.pt", "--resume", "--reference",
                             "--max_iters", "4"), "drop --reference")


def test_a_resumed_run_logs_each_step_once_and_starts_from_the_run_it_resumes(tmp_path,
                                                                             tiny_data):
    checkpoint, log = tmp_path / "run.pt", tmp_path / "run.pt.metrics.jsonl"
    assert train_run(tiny_data, checkpoint)[0] == 0
    # A run killed after its last save (a second Ctrl-C, a kill -9) had logged steps past it,
    # and a line cut in half.
    with open(log, "a") as f:
        f.write(json.dumps(dict(step=3, train_loss=1.0, val_loss=1.0)) + '\n{"step": 4, "lo')
    assert train_run(tiny_data, checkpoint, "--max_iters", "4", "--resume")[0] == 0
    assert val_steps(log) == [0, 1, 2, 3, 4]
    assert [json.loads(line)["val_loss"] for line in log.read_text().splitlines()
            if "val_loss" in line][3] != 1.0  # step 3 as this run evaluated it
    # Resumed into another checkpoint: its log is the resumed run's up to there, then its own,
    # never appended to an unrelated log of that name.
    assert train_run(tiny_data, tmp_path / "other.pt", "--max_iters", "3")[0] == 0
    assert train_run(tiny_data, tmp_path / "other.pt", "--resume", str(checkpoint),
                     "--max_iters", "6")[0] == 0
    assert val_steps(tmp_path / "other.pt.metrics.jsonl") == [0, 1, 2, 3, 4, 5, 6]
    assert val_steps(log) == [0, 1, 2, 3, 4]


def test_resuming_another_checkpoint_reads_only_a_log_that_is_a_regular_file(tmp_path,
                                                                           tiny_data):
    base, log = tmp_path / "base.pt", tmp_path / "base.pt.metrics.jsonl"
    assert train_run(tiny_data, base)[0] == 0
    log.unlink()
    os.mkfifo(log)  # reading it would wait for a writer for ever
    result = run_script("train.py", "--data", tiny_data, "--checkpoint", tmp_path / "new.pt",
                        "--resume", base, *FLAGS, "--max_iters", "3", timeout=60)
    assert result.returncode == 0, result.stderr
    assert val_steps(tmp_path / "new.pt.metrics.jsonl") == [3]  # none of base.pt's rows
    log.unlink()
    log.write_text('{"step": "one"}\n{"step": 1, "loss": 4.0}\n')  # a step that is no number
    assert train_run(tiny_data, tmp_path / "new2.pt", "--resume", base, "--max_iters", "3")[0] == 0
    assert json.loads((tmp_path / "new2.pt.metrics.jsonl").read_text().splitlines()[0]) == \
        {"step": 1, "loss": 4.0}
