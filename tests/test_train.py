"""What train.py's pieces promise: the LR schedule, clipping, accumulation, exact evaluation,
and clean fallbacks for the fast paths."""

import math
import os
from dataclasses import replace

import pytest
import torch

import fast_bpe
import runs
import speedups
import train
import utils
from config import Config, parse_config
from conftest import TINY_FLAGS, random_batch, run_in_process, tiny_model
from runs import Run


def test_learning_rate_schedule_at_chosen_steps():
    config = Config(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=1100)
    assert train.learning_rate_at(0, config) == pytest.approx(1e-5)      # warmup starts near 0
    assert train.learning_rate_at(49, config) == pytest.approx(5e-4)     # halfway up
    assert train.learning_rate_at(100, config) == pytest.approx(1e-3)    # peak
    assert train.learning_rate_at(600, config) == pytest.approx(5.5e-4)  # cosine midpoint
    assert train.learning_rate_at(1100, config) == pytest.approx(1e-4)   # floor
    assert train.learning_rate_at(5000, config) == pytest.approx(1e-4)
    shorter = replace(config, lr_decay_iters=600)
    assert train.learning_rate_at(350, shorter) == pytest.approx(5.5e-4)


def make_step_parts(grad_clip=0.0, accumulation=1, seed=0, optimizer="adamw"):
    torch.manual_seed(seed)
    model = tiny_model().train()
    config = Config(grad_clip=grad_clip, gradient_accumulation_steps=accumulation,
                    learning_rate=1e-3, optimizer=optimizer, muon_lr=0.02)
    optimizer = train.make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, config, optimizer, scaler


def grad_norm(model):
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()


def test_clipping_bounds_the_gradient_norm():
    batch = random_batch(8, 16, seed=0)
    model, config, optimizer, scaler = make_step_parts(grad_clip=0.0)
    train.train_step(model, optimizer, scaler, [batch], config, Run("cpu", "float32"))
    unclipped = grad_norm(model)
    assert unclipped > 0.05
    model, config, optimizer, scaler = make_step_parts(grad_clip=0.05)
    train.train_step(model, optimizer, scaler, [batch], config, Run("cpu", "float32"))
    assert grad_norm(model) == pytest.approx(0.05, rel=1e-4)


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger():
    x, y = random_batch(12, 16, seed=0)
    big, config, optimizer, scaler = make_step_parts(accumulation=1)
    train.train_step(big, optimizer, scaler, [(x, y)], config, Run("cpu", "float32"))
    small, config, optimizer, scaler = make_step_parts(accumulation=3)
    micro = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    train.train_step(small, optimizer, scaler, micro, config, Run("cpu", "float32"))
    for p_big, p_small in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p_big.grad, p_small.grad, atol=1e-6)
        assert torch.allclose(p_big, p_small, atol=1e-6)


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    optimizer = train.make_optimizer(model, Config(weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


@pytest.mark.parametrize("flags, device, dtype, expected", [
    (["--preset", "cpu"], "cpu", "bfloat16", [
        "bf16 autocast: this CPU has native bf16 (--dtype float32 to turn off)",
        "written-out attention: faster on CPUs (--flash true for the other)",
        "Muon for the matrices in the blocks, AdamW for the rest: --preset cpu"]),
    (["--optimizer", "muon"], "cpu", "float32", [
        "float32: this CPU has no native bf16",
        "written-out attention: faster on CPUs (--flash true for the other)",
        "Muon for the matrices in the blocks, AdamW for the rest: --optimizer muon"]),
    ([], "cuda", "float16", [
        "fp16 autocast: this GPU has no native bf16 (--dtype float32 to turn off)",
        "SDPA attention: faster on GPUs (--flash false for the other)",
        "AdamW (--optimizer muon: Muon, which learns more per step)"]),
    (["--dtype", "bfloat16", "--flash", "true"], "cpu", "bfloat16", [
        "bf16 autocast: --dtype bfloat16", "SDPA attention: --flash true",
        "AdamW (--optimizer muon: Muon, which learns more per step)"]),
    (["--reference"], "cpu", "float32",
     ["--reference: float32, written-out attention and AdamW: the code on the page"]),
])
def test_the_first_lines_say_what_runs_and_why(flags, device, dtype, expected):
    config, preset = parse_config(flags)
    assert runs.what_runs(config, Run(device, dtype), preset).splitlines() == expected


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    config = Config(optimizer="muon", learning_rate=1e-3, muon_lr=0.02, warmup_iters=10)
    optimizer = train.make_optimizer(model, config)
    adamw, muon = optimizer.adamw, optimizer.muon
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, speedups.Muon)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_muon == {name for name, p in model.named_parameters()
                       if p.dim() == 2 and name.startswith("blocks.")}
    assert in_muon | in_adamw == set(names.values()) and not in_muon & in_adamw
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight"} <= in_adamw
    # One schedule: the step gives Muon the same curve, scaled to peak at muon_lr.
    assert train.set_learning_rate(optimizer, 4, config) == pytest.approx(5e-4)  # warming up
    optimizer.step()
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert all(group["lr"] == pytest.approx(5e-4) for group in adamw.param_groups)


def test_muon_training_lowers_the_loss():
    torch.manual_seed(0)
    model = tiny_model().train()
    config = Config(optimizer="muon", learning_rate=3e-3, muon_lr=0.02, grad_clip=1.0)
    optimizer = train.make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = random_batch(16, 16)
    first = train.train_step(model, optimizer, scaler, [batch], config, Run("cpu", "float32"))
    for _ in range(30):
        last = train.train_step(model, optimizer, scaler, [batch], config, Run("cpu", "float32"))
    assert last.item() < first.item() - 0.5  # one batch, learned by heart


def test_exact_loss_counts_every_prediction_once():
    model = tiny_model()
    data = torch.randint(0, 20, (100,))  # 6 full blocks of 16 and a partial one of 3
    total, count = 0.0, 0
    for start in range(0, 99, 16):
        chunk = data[start:start + 17]
        _, loss = model(chunk[None, :-1], chunk[None, 1:])
        total += loss.item() * (len(chunk) - 1)
        count += len(chunk) - 1
    assert count == 99
    assert train.exact_loss(model, data, 16, 4) == pytest.approx(total / count, rel=1e-5)


def test_compile_off_on_cpu_by_default_and_falls_back_without_triton(monkeypatch, capsys):
    model = tiny_model()
    assert train.wrap_for_training(model, Config(compile="auto"), Run("cpu", "float32")) is model
    assert train.wrap_for_training(model, Config(compile="false"), Run("cuda", "bfloat16")) \
        is model
    monkeypatch.setattr(utils, "compile_problem", lambda device: "Triton is not installed")
    assert train.wrap_for_training(model, Config(compile="auto"), Run("cuda", "bfloat16")) \
        is model
    assert "without torch.compile: Triton" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_autocast_runs_on_cpu(dtype):
    model = tiny_model()
    idx = torch.randint(0, 20, (2, 16))
    with train.autocast("cpu", dtype):
        _, loss = model(idx, idx)
    assert math.isfinite(loss.item())


def test_flash_auto_is_sdpa_on_gpus_and_written_out_on_cpus():
    assert utils.use_flash("auto", "cuda") and utils.use_flash("auto", "cuda:1")
    assert not utils.use_flash("auto", "cpu")
    assert utils.use_flash("true", "cpu") and not utils.use_flash("false", "cuda")


def test_mfu_only_for_known_gpus():
    assert runs.gpu_peak_flops(Run("cpu", "bfloat16")) is None


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_float16_with_loss_scaling_trains(optimizer):
    # The path older GPUs take (no bf16): fp16 autocast + GradScaler; it runs on the CPU too.
    # With Muon the scaler unscales and steps both of MuonAdamW's optimizers.
    model, config, optimizer, _ = make_step_parts(grad_clip=1.0, optimizer=optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        batch = random_batch(8, 16)
        loss = train.train_step(model, optimizer, scaler, [batch], config, Run("cpu", "float16"))
    assert math.isfinite(loss.item())
    # Every weight moved: each optimizer stepped.
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_mfu_peak_matches_the_gpu_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert runs.gpu_peak_flops(Run("cuda", "bfloat16")) == 989e12
    assert runs.gpu_peak_flops(Run("cuda", "float32")) == 495e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert runs.gpu_peak_flops(Run("cuda:0", "bfloat16")) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert runs.gpu_peak_flops(Run("cuda", "bfloat16")) is None


@pytest.mark.parametrize("sizes", [dict(vocab_size=65), dict(vocab_size=20, n_embd=32, n_layer=2,
                                                             n_head=4, block_size=16)])
def test_param_count_without_building_equals_the_models(sizes):
    from model import GPTConfig, GPTModel
    model = GPTModel(GPTConfig(**sizes))
    expected = model.num_params()
    args = {**dict(n_embd=384, n_layer=6, block_size=256), **sizes}
    assert runs.param_count(args["vocab_size"], args["n_embd"], args["n_layer"],
                             args["block_size"]) == expected


def test_memory_check_refuses_only_what_cannot_fit(monkeypatch):
    monkeypatch.setattr(utils, "device_memory", lambda device: 8 * 2**30)  # an 8 GiB laptop
    runs.check_model_fits(Config(), Run("cpu", "float32"))  # the default model fits
    runs.check_model_fits(Config(batch_size=512, tokenizer="bpe"), Run("cpu", "float32"))
    with pytest.raises(utils.UsageError, match="needs at least .* GiB of memory, more than the "
                                               "8.0 GiB on cpu; lower --n_embd"):
        runs.check_model_fits(Config(n_embd=10**5), Run("cpu", "float32"))
    with pytest.raises(utils.UsageError, match="needs at least"):  # one (T, T) mask: 4 TB
        runs.check_model_fits(Config(block_size=10**6), Run("cpu", "float32"))
    # A step's million micro-batches of token ids, made at once: the flag to lower is named.
    with pytest.raises(utils.UsageError, match=r"8.0 GiB on cpu; lower --gradient_accumulation_steps \("):
        runs.check_model_fits(Config(gradient_accumulation_steps=10**6), Run("cpu", "float32"))


def test_running_out_of_memory_is_one_line_and_the_saved_checkpoint_stays(tmp_path, tiny_data,
                                                                           monkeypatch):
    checkpoint = tmp_path / "run.pt"
    flags = ["--data", tiny_data, *TINY_FLAGS, "--eval_interval", "2", "--sample_tokens", "0",
             "--checkpoint", checkpoint]
    assert run_in_process(train.main, [*flags, "--max_iters", "2"])[0] == 0
    saved = checkpoint.read_bytes()

    def out_of_memory(*args):
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses it

    monkeypatch.setattr(train, "train_step", out_of_memory)
    code, _, err = run_in_process(train.main, [*flags, "--max_iters", "4", "--resume"])
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("error: out of memory (") and "lower --batch_size" in line, line
    assert checkpoint.read_bytes() == saved


def test_out_of_memory_on_a_gpu_is_one_line_and_other_errors_keep_their_traceback():
    def gpu_out_of_memory(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nMore.")

    code, _, err = run_in_process(gpu_out_of_memory, [])
    assert code == 2
    assert err == ("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.); ask "
                   "for less: a lower --batch_size (--gradient_accumulation_steps keeps the "
                   "tokens per step), --block_size or model size, or fewer --num_samples\n")

    def windows_cpu_out_of_memory(argv):  # the CPU allocator's words on Windows
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 1125899906842624 bytes.")

    code, _, err = run_in_process(windows_cpu_out_of_memory, [])
    assert code == 2 and err.startswith("error: out of memory ([enforce fail"), err

    def a_bug(argv):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        run_in_process(a_bug, [])


def test_python_out_of_memory_while_preparing_the_data_is_one_line(tmp_path, tiny_data,
                                                                    monkeypatch):
    def out_of_memory(*args):
        raise MemoryError  # Python's own allocations, under a memory limit (ulimit -v): no message

    monkeypatch.setattr(fast_bpe, "word_end_pieces", out_of_memory)
    code, _, err = run_in_process(train.main, ["--data", tiny_data, *TINY_FLAGS, "--tokenizer",
                                               "bpe", "--vocab_size", "300", "--checkpoint",
                                               tmp_path / "run.pt", "--max_iters", "2"])
    assert code == 2
    assert err.endswith("error: out of memory (Python's MemoryError: a memory limit, ulimit -v, "
                        "or too little free memory); raise the limit, or free some memory\n"), err
    assert sorted(os.listdir(tmp_path)) == ["tiny.txt"]


def test_out_of_memory_on_a_rank_other_than_0_is_said_there(monkeypatch):
    # Each rank has its own memory: under torchrun the rank that ran out may be any; the others
    # then see only a lost connection, so the line must come from the rank that ran out.
    def out_of_memory(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setenv("RANK", "1")
    code, _, err = run_in_process(out_of_memory, [])
    assert code == 2 and err.startswith("error: out of memory (CUDA out of memory."), err
