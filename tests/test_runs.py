"""Running it like real training: exact resume, checkpoints that survive SIGKILL, metrics logs,
Weights & Biases offline, and DDP over several processes (gloo on the CPU)."""

import glob
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import generate
import runs
import tracking
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import ROOT, TINY_FLAGS, random_batch, run_in_process, run_script, tiny_model


def losses_by_step(jsonl_path):
    with open(jsonl_path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, tiny_data, optimizer):
    flags = ["--data", tiny_data, *TINY_FLAGS, "--dropout", "0.1", "--log_interval", "1",
             "--eval_interval", "6", "--lr_decay_iters", "12", "--sample_tokens", "0",
             "--optimizer", optimizer]
    straight = tmp_path / "straight.pt"
    assert run_script("train.py", *flags, "--checkpoint", straight, "--max_iters", "12").returncode == 0
    halves = tmp_path / "halves.pt"
    assert run_script("train.py", *flags, "--checkpoint", halves, "--max_iters", "6").returncode == 0
    resumed = run_script("train.py", *flags, "--checkpoint", halves, "--max_iters", "12", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from step 6" in resumed.stdout and "Note:" not in resumed.stdout
    assert "Starting training from step 6 to 12..." in resumed.stdout
    expected = losses_by_step(tmp_path / "straight.pt.metrics.jsonl")
    assert sorted(expected) == list(range(1, 13))
    assert losses_by_step(tmp_path / "halves.pt.metrics.jsonl") == expected  # bit for bit
    assert torch.load(halves, weights_only=True)["step"] == 12


def test_the_hours_on_a_cpu_note_counts_the_steps_left(capsys, monkeypatch):
    monkeypatch.setattr(runs, "flops_per_token", lambda model, config: 1e9)
    monkeypatch.setattr(runs, "tokens_per_step", lambda config, run: 1e3)  # 1e12 a step
    corpus = types.SimpleNamespace(n_chars=1, tokenizer=types.SimpleNamespace(vocab_size=65))
    model, run = types.SimpleNamespace(num_params=lambda: 1), runs.Run("cpu", "float32")
    runs.note_sizes(corpus, model, Config(max_iters=5000), run)
    assert "it will take hours" in capsys.readouterr().out
    runs.note_sizes(corpus, model, Config(max_iters=5000), run, start_step=4990)  # 10 steps left
    assert "hours" not in capsys.readouterr().out


def test_resume_without_the_preset_it_was_trained_with_names_the_preset(tmp_path, tiny_data):
    """`python train.py --preset cpu`, then `python train.py --resume` (as the docs show): the
    refusal names the flags and the presets that give the saved shape, not flags never given."""
    flags = ["--data", tiny_data, "--checkpoint", tmp_path / "ckpt.pt", "--device", "cpu",
             "--sample_tokens", "0", "--eval_iters", "1", "--batch_size", "2"]
    assert run_script("train.py", *flags, "--preset", "cpu", "--max_iters", "1").returncode == 0
    result = run_script("train.py", *flags, "--resume", "--max_iters", "2")
    assert result.returncode == 2 and "(n_embd 192 -> 384, n_layer 3 -> 6, block_size 32 -> 256); " \
        "give the flags it was trained with (--n_embd 192 --n_layer 3 --block_size 32; " \
        "--preset cpu or --preset cpu-2min gives it)" in result.stderr, result.stderr
    assert run_script("train.py", *flags, "--resume", "--preset", "cpu", "--max_iters", "2"
                      ).returncode == 0
    # Only presets that give the whole shape: block_size 32 alone is no preset's.
    other = ["--checkpoint", tmp_path / "other.pt"]  # (the last --checkpoint given counts)
    assert run_script("train.py", *flags, *other, "--block_size", "32", "--n_layer", "1",
                      "--max_iters", "1").returncode == 0
    result = run_script("train.py", *flags, *other, "--n_layer", "1", "--resume",
                        "--max_iters", "2")
    assert "give the flags it was trained with (--block_size 32), or start" in result.stderr


def test_resume_with_another_shape_or_text_is_refused(tmp_path, tiny_data):
    ckpt = tmp_path / "ckpt.pt"
    flags = ["--data", tiny_data, *TINY_FLAGS, "--checkpoint", ckpt, "--sample_tokens", "0"]
    assert run_script("train.py", *flags, "--max_iters", "2").returncode == 0
    result = run_script("train.py", *flags, "--max_iters", "1", "--resume")
    assert result.returncode == 2 and "past --max_iters 1" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("train.py", *flags, "--max_iters", "4", "--resume", "--n_layer", "3")
    assert result.returncode == 2 and "model shape differs (n_layer 2 -> 3); give the flags it " \
        "was trained with (--n_layer 2), or start a fresh run" in result.stderr
    other_text = tmp_path / "other.txt"
    other_text.write_text("completely different words, zebra quiz! " * 40)
    result = run_script("train.py", *flags, "--max_iters", "4", "--resume", "--data", other_text)
    assert result.returncode == 2 and "trained on another text" in result.stderr
    result = run_script("train.py", *flags, "--max_iters", "4", "--resume", "--optimizer", "muon")
    assert result.returncode == 2 and "pass --optimizer adamw" in result.stderr


def test_ctrl_c_at_once_after_resuming_saves_nothing_and_says_so(tmp_path, tiny_data,
                                                                  monkeypatch):
    base, other = tmp_path / "base.pt", tmp_path / "other.pt"
    flags = ["--data", tiny_data, *TINY_FLAGS, "--max_iters", "2", "--eval_interval", "1",
             "--sample_tokens", "0"]
    assert run_in_process(train.main, [*flags, "--checkpoint", base])[0] == 0
    saved = {path: path.read_bytes() for path in tmp_path.iterdir()}
    monkeypatch.setattr(runs, "catch_ctrl_c", lambda run: lambda: True)  # before the 1st step
    # Into another file: an evaluation now would draw batches, so a checkpoint saved after it
    # would not resume exactly; nothing is saved, and the resumed checkpoint is as it was.
    code, out, err = run_in_process(train.main, [*flags, "--checkpoint", other, "--resume", base,
                                                 "--max_iters", "4"])
    assert code == 0, err
    assert (f"Stopped: asked before this run's first step was done; no checkpoint saved "
            f"({base} is as it was: --resume {base} to go on)") in out
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == saved  # no other.pt
    # Resumed into itself, the checkpoint is already there: left as it was.
    code, out, err = run_in_process(train.main, [*flags, "--checkpoint", base, "--resume",
                                                 "--max_iters", "4"])
    assert code == 0, err
    assert f"({base} is as it was: --resume {base} to go on)" in out
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == saved


def test_ctrl_c_before_a_fresh_runs_first_step_is_done_keeps_the_checkpoint_it_names(
        tmp_path, tiny_data, monkeypatch):
    """A fresh run that names an earlier run's checkpoint (a mistyped --resume), stopped at
    once: the Ctrl-C lands during the step-0 evaluation, and the first step then trains, but
    nothing is saved over the earlier run's checkpoint and log."""
    base = tmp_path / "base.pt"
    flags = ["--data", tiny_data, *TINY_FLAGS, "--checkpoint", base, "--eval_interval", "1",
             "--sample_tokens", "0"]
    assert run_in_process(train.main, [*flags, "--max_iters", "2"])[0] == 0
    saved = {path: path.read_bytes() for path in tmp_path.iterdir()}
    evaluate = train.evaluate

    def ctrl_c_while_evaluating(*args):
        os.kill(os.getpid(), signal.SIGINT)  # to this process: the run's own handler takes it
        return evaluate(*args)

    monkeypatch.setattr(train, "evaluate", ctrl_c_while_evaluating)
    code, out, err = run_in_process(train.main, [*flags, "--max_iters", "4", "--sample_tokens",
                                                 "20"])
    assert code == 0, err
    assert "Ctrl-C: stopping without saving: no step of this run is done yet" in out
    assert "Sample:" not in out  # of weights no step has trained
    assert (f"Stopped: asked before this run's first step was done; no checkpoint saved "
            f"({base} is as it was)") in out
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == saved


def test_sigkill_never_leaves_an_unreadable_checkpoint(tmp_path, tiny_data):
    ckpt = tmp_path / "ckpt.pt"
    rng = random.Random(0)
    for _ in range(4):
        saved_before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        process = subprocess.Popen(
            [sys.executable, "train.py", "--data", tiny_data, *TINY_FLAGS, "--checkpoint",
             str(ckpt), "--max_iters", "100000", "--eval_interval", "1"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60  # wait until this run saves, however slow the machine
        while time.time() < deadline and process.poll() is None and (
                not ckpt.exists() or ckpt.stat().st_mtime_ns == saved_before):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))  # saving every step: some kills land mid-write
        process.send_signal(signal.SIGKILL)
        process.wait()
        if ckpt.exists():
            assert load_checkpoint(str(ckpt))["step"] >= 1
    assert ckpt.exists()


def test_metrics_log_and_loss_curve(tmp_path, tiny_data):
    ckpt = tmp_path / "run.pt"
    result = run_script("train.py", "--data", tiny_data, *TINY_FLAGS, "--checkpoint", ckpt,
                        "--max_iters", "20", "--eval_interval", "10", "--log_interval", "5")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "run.pt.metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 10, 20]
    progress = [r for r in rows if "loss" in r]
    assert [r["step"] for r in progress] == [5, 10, 15, 20]
    assert all({"lr", "tokens_per_sec", "elapsed"} <= r.keys() for r in progress)
    assert "sample" in rows[-1]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in result.stdout
    else:
        png = tmp_path / "run.pt.loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bug_writing_the_metrics_log_is_not_passed_off_as_a_note(tmp_path, capsys):
    record = tracking.metrics_recorder(Config(checkpoint=str(tmp_path / "run.pt")))
    with pytest.raises(TypeError):  # json cannot write an object: a bug, not a full disk
        record(dict(step=0, val_loss=object()))
    assert "Note:" not in capsys.readouterr().out


def test_wandb_offline_run_holds_the_history(tmp_path, tiny_data):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "train.py", "--data", tiny_data, *TINY_FLAGS, "--checkpoint",
         str(tmp_path / "c.pt"), "--max_iters", "10", "--eval_interval", "5", "--wandb"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    [history] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = open(history, "rb").read()
    for key in (b"val_loss", b"train_loss", b"tokens_per_sec", b"n_embd", b"sample"):
        assert key in logged


def test_wandb_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    with pytest.raises(train.UsageError, match="pip install wandb"):
        tracking.start_wandb(Config())


# --- DDP ------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_torchrun_variables(monkeypatch, **variables):
    """torchrun's variables, as set by hand (no torchrun): rank 0 listens at MASTER_ADDR:PORT."""
    for name, value in {**dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())), **variables}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("address, in_use, words", [
    ("127.0.0.1", True, "(Address already in use); set MASTER_PORT to a free port"),
    ("192.0.2.1", False,  # an address kept for documentation: never this machine's
     "(Cannot assign requested address); set MASTER_ADDR to an address of this machine")])
def test_rank_0_that_cannot_listen_at_master_addr_and_port_is_one_line_before_any_wait(
        address, in_use, words, tiny_data, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as other_program:
        port = other_program.getsockname()[1] if in_use else free_port()
        set_torchrun_variables(monkeypatch, MASTER_ADDR=address, MASTER_PORT=str(port))
        monkeypatch.setattr(dist, "init_process_group",  # a traceback, or 30 minutes of retries
                            lambda backend: pytest.fail("the process group was started"))
        code, _, err = run_in_process(train.main, ["--data", tiny_data, *TINY_FLAGS])
    assert code == 2 and err.startswith(
        f"error: rank 0 cannot listen at MASTER_ADDR:MASTER_PORT, {address}:{port} {words}"), err
    assert err.count("\n") == 1, err


def test_processes_that_never_meet_are_one_line(tiny_data, monkeypatch):
    set_torchrun_variables(monkeypatch, WORLD_SIZE="2")

    def never_met(backend):  # what torch raises after 30 minutes without the others
        raise dist.DistStoreError("Timed out after 1801 seconds waiting for clients. 1/2 clients "
                                  "joined.")

    monkeypatch.setattr(dist, "init_process_group", never_met)
    code, _, err = run_in_process(train.main, ["--data", tiny_data, *TINY_FLAGS])
    assert code == 2 and err == (
        f"error: the processes could not meet at 127.0.0.1:{os.environ['MASTER_PORT']} (Timed out "
        f"after 1801 seconds waiting for clients. 1/2 clients joined.); start every one with the "
        f"same MASTER_ADDR and MASTER_PORT, as torchrun does\n")


def test_rank_0_waiting_for_the_others_says_so_and_ctrl_c_stops_it(tmp_path, tiny_data):
    port = free_port()
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))  # and no second process
    process = subprocess.Popen([sys.executable, "train.py", "--data", tiny_data, *TINY_FLAGS,
                                "--checkpoint", tmp_path / "wait.pt"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([process.stdout], [], [], 120)[0], "nothing said in 2 minutes"
        assert process.stdout.readline() == (f"Waiting at 127.0.0.1:{port} until all 2 processes "
                                             f"(WORLD_SIZE) have started; Ctrl-C stops\n")
        process.send_signal(signal.SIGINT)  # torch waits in C++: Python's handler never ran
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGINT and "Traceback" not in err, err
    assert not (tmp_path / "wait.pt").exists()


def test_torchrun_two_processes_train_and_save(tmp_path, tiny_data):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not found")
    ckpt = tmp_path / "ddp.pt"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "train.py", "--data", tiny_data,
         *TINY_FLAGS, "--checkpoint", str(ckpt), "--max_iters", "10", "--eval_interval", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Loading data...") == 1  # only rank 0 prints
    assert torch.load(ckpt, weights_only=True)["step"] == 10
    generated = run_script("generate.py", "--checkpoint", ckpt, "--max_new_tokens", "20",
                           "--device", "cpu")
    assert generated.returncode == 0, generated.stderr


def test_torchrun_resume_continues_every_rank_exactly(tmp_path, tiny_data):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not found")

    def run(checkpoint, max_iters, *extra):
        return subprocess.run(
            [torchrun, "--standalone", "--nproc_per_node=2", "train.py", "--data", tiny_data,
             *TINY_FLAGS, "--dropout", "0.1", "--log_interval", "1", "--eval_interval", "6",
             "--lr_decay_iters", "12", "--sample_tokens", "0", "--checkpoint", str(checkpoint),
             "--max_iters", str(max_iters), *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=180)

    for result in (run(tmp_path / "straight.pt", 12), run(tmp_path / "halves.pt", 6),
                   run(tmp_path / "halves.pt", 12, "--resume")):
        assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0's losses after the resume depend on rank 1's batches and dropout masks too (the
    # gradients are averaged), so they match only if both ranks continued exactly.
    expected = losses_by_step(tmp_path / "straight.pt.metrics.jsonl")
    assert sorted(expected) == list(range(1, 13))
    assert losses_by_step(tmp_path / "halves.pt.metrics.jsonl") == expected


def one_ddp_step(rank, world_size, port, x, y, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = tiny_model().train()
    config = Config(grad_clip=1.0, learning_rate=1e-2)
    optimizer = train.make_optimizer(model, config)
    run = runs.Run("cpu", "float32", rank, rank, world_size)
    ddp_model = train.wrap_for_training(model, config, run)
    assert not ddp_model.broadcast_buffers  # the causal masks are not sent before each forward
    half = len(x) // world_size
    mine = slice(rank * half, (rank + 1) * half)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(ddp_model, optimizer, scaler, [(x[mine], y[mine])], config, run)
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_of_batch_b_average_to_the_gradients_of_one_rank_of_2b(tmp_path):
    x, y = random_batch(8, 16, seed=0)
    out_path = str(tmp_path / "ddp_grads.pt")
    mp.spawn(one_ddp_step, args=(2, free_port(), x, y, out_path), nprocs=2)
    ddp_grads = torch.load(out_path, weights_only=True)

    model = tiny_model().train()
    config = Config(grad_clip=1.0, learning_rate=1e-2)
    optimizer = train.make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(model, optimizer, scaler, [(x, y)], config, runs.Run("cpu", "float32"))
    # The gradients (averaged over ranks, then clipped) that AdamW applied. Not the updated
    # weights: AdamW's first step is about lr * sign(grad), so a gradient of ~1e-9 that differs
    # in its last bits between the two sums could move a weight by a visible amount.
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, ddp_grads[name], rtol=1e-4, atol=1e-7), name


def test_one_process_under_torchrun_closes_its_process_group(tmp_path, tiny_data, monkeypatch):
    # torchrun --nproc_per_node 1 on a GPU: NCCL warns at exit about a group left open.
    from conftest import run_in_process
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    try:
        code, out, err = run_in_process(train.main, [
            "--data", tiny_data, *TINY_FLAGS, "--checkpoint", tmp_path / "one.pt", "--max_iters",
            "2", "--eval_interval", "2", "--sample_tokens", "0"])
        assert code == 0, err
        assert not dist.is_initialized()
    finally:  # whatever happened, leave no group behind for the next tests
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The best weights: a run that overfits keeps the weights of its lowest val loss too

def overfitting_text(path):
    """Words in one spelling for the training split, half of them reversed in the val split
    (its last tenth): a model soon learns what the two share, then only the training words, so
    its val loss falls, then rises."""
    rng = random.Random(0)
    words = ["the", "king", "queen", "lord", "sweet", "night", "love", "death", "crown", "sword",
             "heart", "blood", "fair", "good", "my", "thy"]
    train_words = [rng.choice(words) for _ in range(630)]
    val_words = [rng.choice(words)[::-1] if i % 2 else rng.choice(words) for i in range(70)]
    path.write_text(" ".join(train_words + val_words), encoding="utf-8")
    return str(path)


def overfitting_run(tmp_path, checkpoint, max_iters, *extra):
    flags = ["--data", overfitting_text(tmp_path / "words.txt"), "--checkpoint", checkpoint,
             "--n_embd", "64", "--n_layer", "2", "--n_head", "4", "--block_size", "32",
             "--batch_size", "32", "--dropout", "0", "--learning_rate", "1e-2",
             "--warmup_iters", "5", "--lr_decay_iters", "40", "--eval_interval", "10",
             "--eval_iters", "2", "--sample_tokens", "0", "--device", "cpu",
             "--max_iters", max_iters, *extra]
    code, out, err = run_in_process(train.main, flags)
    assert code == 0, err
    return out


def sample(checkpoint, *flags):
    code, out, err = run_in_process(generate.main, ["--checkpoint", checkpoint, "--seed", "7",
                                                    "--max_new_tokens", "60", "--dtype",
                                                    "float32", "--device", "cpu", *flags])
    assert code == 0, err
    return out


def test_an_overfitting_run_keeps_and_samples_its_best_weights(tmp_path):
    long_run = tmp_path / "long.pt"
    out = overfitting_run(tmp_path, long_run, 40)
    saved = torch.load(long_run, weights_only=True)
    best = saved["best"]
    assert 0 < best["step"] < 40 and best["val_loss"] < saved["val_loss"]  # it did overfit
    assert f"val loss {best['val_loss']:.4f} (exact), val bpc {best['val_bpc']:.4f}" in out
    assert f"Best: val loss {best['val_loss']:.4f} at step {best['step']}" in out
    assert out.count(" new best") >= 1

    # The same run stopped at its best step: its last weights are the long run's best ones.
    stopped = tmp_path / "stopped.pt"
    overfitting_run(tmp_path, stopped, best["step"])
    stopped_weights = torch.load(stopped, weights_only=True)["model"]
    assert all(torch.equal(stopped_weights[k], w) for k, w in saved["best_model"].items())
    best_text = sample(long_run)
    assert f"Weights: best, val loss {best['val_loss']:.4f} at step {best['step']}" in best_text
    body = best_text.split("=" * 60)[-1]
    assert body == sample(stopped, "--weights", "last").split("=" * 60)[-1]
    last_text = sample(long_run, "--weights", "last")
    assert f"Weights: last, val loss {saved['val_loss']:.4f} at step 40" in last_text
    assert last_text.split("=" * 60)[-1] != body


def test_an_older_checkpoints_best_takes_its_bits_per_character_when_it_is_the_last():
    """Checkpoints written before the best evaluation kept its bits per character: when the best
    is the last step, the checkpoint's own figure is the best's; otherwise none is known."""
    weights = {"w": torch.zeros(1)}
    older = dict(step=40, val_loss=1.5, val_bpc=2.2, model=weights,
                 best=dict(step=40, val_loss=1.5))
    best = train.BestEvaluation()
    best.restore(older)
    assert (best.step, best.val_loss, best.val_bpc) == (40, 1.5, 2.2)
    best.restore(dict(older, best=dict(step=30, val_loss=1.4), best_model=weights))
    assert best.step == 30 and math.isnan(best.val_bpc)


def test_resume_carries_the_best_weights_on(tmp_path):
    straight = tmp_path / "straight.pt"
    overfitting_run(tmp_path, straight, 40)
    halves = tmp_path / "halves.pt"
    overfitting_run(tmp_path, halves, 20)
    overfitting_run(tmp_path, halves, 40, "--resume")
    expected, resumed = (torch.load(p, weights_only=True) for p in (straight, halves))
    assert resumed["best"] == expected["best"] and resumed["step"] == 40
    for part in ("model", "best_model"):
        assert all(torch.equal(resumed[part][k], w) for k, w in expected[part].items())


def test_a_checkpoint_without_best_weights_still_loads(tmp_path, tiny_data):
    path = tmp_path / "older.pt"
    assert run_script("train.py", "--data", tiny_data, *TINY_FLAGS, "--checkpoint", path,
                      "--max_iters", "4", "--eval_interval", "2").returncode == 0
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["best"]  # as train.py wrote them before it kept the best weights
    checkpoint.pop("best_model", None)
    torch.save(checkpoint, path)
    assert f"val loss {checkpoint['val_loss']:.4f} at step 4" in sample(path)
    resumed = run_script("train.py", "--data", tiny_data, *TINY_FLAGS, "--checkpoint", path,
                         "--max_iters", "6", "--eval_interval", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(path, weights_only=True)["best"]["step"] in (4, 6)
