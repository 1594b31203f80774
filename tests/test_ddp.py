"""Several processes under torchrun: what every rank agrees on, and what each one takes.

Ctrl-C is asked of every rank without waiting for the answer; a NaN loss on rank 0 stops every
rank with one line; each process takes the GPU of its LOCAL_RANK; MFU counts every GPU; a
checkpoint resumes on a machine with fewer GPUs. GPUs are pretended (torch.cuda's answers
replaced), the processes are real (gloo on the CPU).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_runs import free_port

import runs
from conftest import ROOT, TINY_FLAGS
from runs import Run
from utils import UsageError


def answers_of_one_rank(rank, world_size, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    calls = []

    def ctrl_c_seen():  # by rank 1 alone, from its third call on
        calls.append(None)
        return rank == 1 and len(calls) >= 3

    ask = runs.on_any_rank(ctrl_c_seen, Run("cpu", "float32", rank, rank, world_size))
    first_returned = f"{out_path}.first-returned"
    if rank == 1:  # rank 1 asks only once rank 0's first call has returned: it did not wait
        deadline = time.time() + 30
        while not os.path.exists(first_returned) and time.time() < deadline:
            time.sleep(0.05)
    answers = [ask()]
    if rank == 0:
        open(first_returned, "w").close()
    answers += [ask() for _ in range(4)]
    torch.save(dict(answers=answers, rank_0_went_first=os.path.exists(first_returned)),
               f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_hears_of_a_ctrl_c_a_step_later_without_waiting_for_the_others(tmp_path):
    out_path = str(tmp_path / "answers")
    mp.spawn(answers_of_one_rank, args=(2, free_port(), out_path), nprocs=2)
    rank_0, rank_1 = (torch.load(f"{out_path}.{rank}", weights_only=True) for rank in (0, 1))
    assert rank_1["rank_0_went_first"], "rank 0's first call waited for rank 1's"
    # Calls 1..5: rank 1 saw Ctrl-C at call 3; every rank hears of it at call 4, and after.
    assert rank_0["answers"] == rank_1["answers"] == [False, False, False, True, True]


def torchrun(*args, **options):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "train.py", *TINY_FLAGS, "--sample_tokens", "0",
               *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **options)


def test_a_nan_loss_on_rank_0_stops_every_rank_with_one_line(tmp_path, tiny_data):
    # A huge learning rate: the weights overflow, and rank 0's evaluation finds the loss NaN.
    run = torchrun("--data", tiny_data, "--checkpoint", tmp_path / "nan.pt", "--max_iters", "20",
                   "--eval_interval", "5", "--learning_rate", "1e30", "--weight_decay", "0",
                   "--grad_clip", "0")
    _, err = run.communicate(timeout=180)
    assert err.count("error: the loss became NaN or infinite") == 1, err[-3000:]
    # No rank died of rank 0 leaving (gloo: "Connection closed by peer"), with a traceback.
    assert "[rank1]" not in err and "Connection closed" not in err, err[-3000:]
    # torchrun's own report of the failed run: every process that left by itself left with 2.
    assert "exitcode  : 2" in err and "exitcode  : 1 " not in err, err[-3000:]


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_saves(tmp_path, tiny_data):
    checkpoint = tmp_path / "ctrl_c.pt"
    run = torchrun("--data", tiny_data, "--checkpoint", checkpoint, "--max_iters", "100000",
                   "--eval_interval", "20", start_new_session=True)
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:  # trained a little, saved once
        time.sleep(0.2)
    # As a terminal's Ctrl-C: to torchrun and every process, which torchrun then sends it to
    # once more.
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert out.count("Ctrl-C: stopping after this step") == 1, out[-2000:] + err[-2000:]
    stopped = [line for line in out.splitlines() if line.startswith("Stopped at step")]
    assert len(stopped) == 1, out[-2000:] + err[-2000:]
    step = int(stopped[0].split()[3].rstrip(";"))
    assert torch.load(checkpoint, weights_only=True)["step"] == step


# --- Each process on its own GPU; MFU against all of them; resume on fewer GPUs ---------------

@pytest.fixture
def under_torchrun(monkeypatch):
    """As torchrun starts local rank 1 of 2, on a machine pretending to have two CUDA GPUs;
    the process group is not really started (init_process_group records its backend)."""
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    backends = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)  # no second process to listen to
    return backends


def test_each_process_takes_the_gpu_of_its_local_rank(under_torchrun):
    assert runs.start_distributed("cuda") == (1, 1, 1, "cuda:1")
    assert under_torchrun == ["nccl"]


@pytest.mark.parametrize("device, message", [
    ("cuda:0", "--device cuda:0 under torchrun would put every process on one GPU; pass "
               "--device cuda"),
    ("mps", "torchrun cannot train on an Apple GPU (MPS)")])
def test_torchrun_refuses_one_gpu_for_all_and_apple_gpus(under_torchrun, device, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runs.start_distributed(device)
    assert under_torchrun == []  # before any process group


def test_torchrun_refuses_more_processes_than_gpus(under_torchrun, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="more processes than the 1 GPU"):
        runs.start_distributed("cuda")


@pytest.mark.parametrize("name, peak", [("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
                                        ("NVIDIA L40", 181e12), ("NVIDIA H100 PCIe", 756e12)])
def test_mfu_peak_counts_every_gpu_of_the_run_and_tells_the_l40s_from_the_l4(monkeypatch, name,
                                                                            peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert runs.gpu_peak_flops(Run("cuda", "bfloat16")) == peak
    # 4 processes: tokens/s counts all 4 GPUs' tokens, so the peak is 4 GPUs' peak.
    assert runs.gpu_peak_flops(Run("cuda:0", "bfloat16", world_size=4)) == 4 * peak


def test_resume_restores_this_gpus_random_state_from_a_machine_with_more_gpus(monkeypatch):
    set_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: set_states.append(state))
    saved = runs.rng_state()
    # As written before: one state per GPU of the saving machine (8 here), this GPU's second.
    eight_gpus = {**saved, "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]}
    del eight_gpus["gpu"]
    assert runs.restore_rng(eight_gpus)
    assert [state[0].item() for state in set_states] == [1]
    # Saved on a machine with one GPU: none for GPU 1 here; noted, not called damaged.
    assert not runs.restore_rng({**eight_gpus, "cuda": eight_gpus["cuda"][:1]})
    # As written now: the state of the one GPU the saving process drew on.
    assert runs.restore_rng({**saved, "gpu": ("cuda", torch.full((16,), 7, dtype=torch.uint8))})
    assert set_states[-1][0].item() == 7
