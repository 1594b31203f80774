"""What speedups.py promises: each trick computes what the plain code computes (or, for int8,
nearly), and is applied only where it is asked for."""

import math
import subprocess
import sys

import pytest
import torch

import generate
import runs
import speedups
import train
import utils
from config import Config, parse_config
from conftest import ROOT, tiny_model
from speedups import FastCPUDropout
from utils import UsageError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_p_and_keeps_the_mean(dtype):
    dropout = FastCPUDropout(0.2)
    x = torch.ones(1_000_003, dtype=dtype, requires_grad=True)  # not a multiple of 4 on purpose
    y = dropout(x)
    assert y.dtype == dtype
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.002
    # Kept elements are scaled by 1/(1-p), p being 0.2 rounded to a multiple of 2^-16.
    assert torch.allclose(y[kept].float(), torch.tensor(1.25), rtol=1e-5)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # gradient flows through kept elements only
    assert torch.allclose(x.grad[kept].float(), torch.tensor(1.25), rtol=1e-5)


def test_cpu_dropout_follows_the_seed_and_is_off_in_eval():
    dropout = FastCPUDropout(0.5)
    x = torch.randn(4, 64)
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)
    dropout.eval()
    assert torch.equal(dropout(x), x)
    assert torch.equal(FastCPUDropout(0.0)(x), x)


def test_fast_cpu_dropout_replaces_every_dropout_and_nothing_else():
    model = tiny_model(dropout=0.2)
    names_before = [name for name, _ in model.named_parameters()]
    speedups.use_fast_cpu_dropout(model)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is FastCPUDropout and m.p == 0.2 for m in dropouts)
    assert [name for name, _ in model.named_parameters()] == names_before


def test_reference_switch_turns_every_speed_up_off():
    config, _ = parse_config(["--preset", "cpu", "--reference", "--device", "cpu"])
    assert (config.dtype, config.flash, config.compile, config.optimizer) == \
        ("float32", "false", "false", "adamw")
    run = runs.set_up(config)
    model = train.build_model(65, config, run)
    assert run.dtype == "float32"
    assert all(type(m) is torch.nn.Dropout for m in model.modules()
               if isinstance(m, torch.nn.Dropout))
    assert not any(block.attn.flash for block in model.blocks)
    optimizer = train.make_optimizer(model, config)
    assert type(optimizer) is torch.optim.AdamW and not optimizer.defaults.get("fused")
    with pytest.raises(UsageError, match="--reference runs the plain code"):
        parse_config(["--reference", "--dtype", "bfloat16"])


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="PyTorch 2.9 brought its Muon")
@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])  # tall, wide, square
def test_muon_takes_the_steps_of_torch_optim_muon_to_the_last_bit(monkeypatch, shape):
    """speedups.Muon, the step the CPU presets train with, written out for reading, moves a
    weight matrix exactly as PyTorch's own torch.optim.Muon does, over steps that use its
    momentum and weight decay, with a learning rate that changes; and the state a checkpoint
    saved with torch.optim.Muon loads into it. (On a CPU with native bf16: torch.optim.Muon's
    iteration is always bf16, ours only where the chip computes in it.)"""
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(shape))
    theirs = torch.nn.Parameter(ours.detach().clone())
    muon = speedups.Muon([ours], lr=0.02, weight_decay=0.1)
    torch_muon = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1)
    for step in range(4):
        ours.grad = torch.randn(shape)
        theirs.grad = ours.grad.clone()
        for optimizer in (muon, torch_muon):
            optimizer.param_groups[0]["lr"] = 0.02 * (step + 1) / 4
            optimizer.step()
        assert torch.equal(ours, theirs) and not torch.equal(ours, ours.grad)
    resumed = speedups.Muon([torch.nn.Parameter(theirs.detach().clone())], lr=0.02,
                            weight_decay=0.1)
    resumed.load_state_dict(torch_muon.state_dict())  # a checkpoint of torch.optim.Muon's
    assert torch.equal(next(iter(resumed.state.values()))["momentum_buffer"],
                       muon.state[ours]["momentum_buffer"])


@pytest.mark.parametrize("native, dtype, other", [(True, torch.bfloat16, torch.float32),
                                                   (False, torch.float32, torch.bfloat16)])
def test_muon_iterates_in_bf16_only_on_a_cpu_that_computes_in_it(monkeypatch, native, dtype,
                                                                  other):
    """Emulated bf16 (a CPU with AVX2 only) makes a matmul many times slower than float32's,
    which made --preset cpu take minutes there: Muon's iteration runs in float32 on such CPUs."""
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: native)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 16))
    start, weight.grad = weight.detach().clone(), torch.randn(32, 16)
    speedups.Muon([weight], lr=0.02, weight_decay=0.0).step()

    def stepped(matmul_dtype):  # the first step: an empty momentum; lr scaled by sqrt(32 / 16)
        direction = speedups.muon_direction(torch.zeros(32, 16), weight.grad, 0.95, matmul_dtype)
        return start - 0.02 * math.sqrt(2) * direction.float()

    assert torch.allclose(weight, stepped(dtype), atol=1e-6)
    assert not torch.allclose(weight, stepped(other), atol=1e-6)


@pytest.mark.parametrize("matmul_dtype", [torch.bfloat16, torch.float32])
def test_nearly_orthogonal_brings_every_singular_value_near_1(matmul_dtype):
    torch.manual_seed(0)
    matrix = torch.randn(64, 16) @ torch.diag(torch.logspace(-1, 1, 16))  # strengths 0.1 to 10
    for M in (matrix, matrix.T):  # tall and wide
        direction = speedups.nearly_orthogonal(M, matmul_dtype)
        assert direction.dtype == matmul_dtype
        singular_values = torch.linalg.svdvals(direction.float())
        assert 0.6 < singular_values.min() and singular_values.max() < 1.25


def test_muon_adamw_saves_and_loads_as_one_optimizer():
    config = Config(optimizer="muon", muon_lr=0.02)
    model = tiny_model().train()
    optimizer = train.make_optimizer(model, config)
    assert isinstance(optimizer, speedups.MuonAdamW)
    model(torch.randint(0, 20, (2, 16)), torch.randint(0, 20, (2, 16)))[1].backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert set(state) == {"adamw", "muon"} and state["muon"]["state"]
    fresh = train.make_optimizer(tiny_model().train(), config)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["muon"]["state"].keys() == state["muon"]["state"].keys()


def test_int8_weights_only_on_the_cpu_and_close_to_float32():
    with pytest.raises(UsageError, match="CPU only"):
        generate.for_sampling(tiny_model(), "cuda", "int8")
    model = tiny_model()
    idx = torch.randint(0, 20, (2, 16))
    float_logits, _ = model(idx)
    int8_model = speedups.quantize_int8(tiny_model())
    assert all(layer.weight.dtype == torch.int8
               for layer in int8_model.modules() if isinstance(layer, speedups.Int8Linear))
    assert isinstance(int8_model.lm_head, speedups.Int8Linear)
    int8_logits, _ = int8_model(idx)
    assert 0 < (int8_logits.float() - float_logits).abs().max().item() < 0.05


def test_int8_linear_is_the_rounded_weights_times_their_scales():
    linear = torch.nn.Linear(64, 48)
    int8_linear = speedups.Int8Linear(linear)
    # Each row's largest weight becomes +-127; the others round to the nearest step of that row.
    assert int8_linear.weight.abs().amax(dim=1).eq(127).all()
    dequantized = int8_linear.weight.float() * int8_linear.scales.float()[:, None]
    assert (dequantized - linear.weight).abs().max() <= int8_linear.scales.float().max() / 2 + 1e-3
    x = torch.randn(3, 5, 64)
    expected = x.float() @ dequantized.T + int8_linear.bias.float()
    assert (int8_linear(x).float() - expected).abs().max().item() < 0.05


@pytest.mark.parametrize("native", [True, False])
def test_int8_prompts_multiply_in_float32_on_a_cpu_without_native_bf16(monkeypatch, native):
    """A prompt's many rows are multiplied by the widened weights: in bf16 where the CPU computes
    in it, else in float32 (emulated bf16 made --no_cache 5x slower than float32 there)."""
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: native)
    torch.manual_seed(0)
    int8_linear = speedups.Int8Linear(torch.nn.Linear(64, 48))
    dequantized = int8_linear.weight.float() * int8_linear.scales.float()[:, None]
    x = torch.randn(16, 64)  # more than 8 rows
    in_float32 = x @ dequantized.T + int8_linear.bias
    in_bf16 = (x.bfloat16() @ dequantized.bfloat16().T).float() + int8_linear.bias
    expected, other = (in_bf16, in_float32) if native else (in_float32, in_bf16)
    assert torch.allclose(int8_linear(x), expected, atol=1e-5)
    assert not torch.allclose(int8_linear(x), other, atol=1e-5)


def fresh_compile_counters():
    """torch.compile's counters, from zero (skips the test where no compiler can run)."""
    if utils.compile_problem("cpu"):
        pytest.skip(utils.compile_problem("cpu"))
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    return counters


def test_compiled_decode_step_matches_eager_and_compiles_once():
    counters = fresh_compile_counters()
    model = tiny_model()
    # A one-token prompt goes through the compiled step at once (generate.py's empty prompt).
    prompts = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]]), torch.tensor([[6]])]
    eager = [model.generate(prompt, 40, temperature=0) for prompt in prompts]  # 40 > block 16
    assert not speedups.compile_decode(model, "cpu", "auto")  # auto: CUDA only
    assert speedups.compile_decode(model, "cpu", "true")
    compiled = [model.generate(prompt, 40, temperature=0) for prompt in prompts]
    for eager_tokens, compiled_tokens in zip(eager, compiled):
        assert torch.equal(eager_tokens, compiled_tokens)
    # Every one-token step of every prompt, across window slides, ran the same compiled graph.
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_decode_step_draws_inside_the_graph_and_follows_the_seed():
    counters = fresh_compile_counters()
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, 40, temperature=0)
    assert speedups.compile_decode(model, "cpu", "true")
    # top-k 1 leaves the draw one token: the likeliest, drawn inside the compiled graph.
    assert torch.equal(model.generate(prompt, 40, temperature=0.8, top_k=1), greedy)
    samples = []
    for _ in range(2):
        torch.manual_seed(7)
        samples.append(model.generate(prompt, 40, temperature=0.8, top_p=0.9))
    assert torch.equal(*samples)  # the same seed, the same text
    assert not torch.equal(samples[0], greedy)
    # One graph per sampling setting, each the model's step and its draw (fullgraph: no break).
    assert counters["stats"]["unique_graphs"] == 2


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
    assert speedups.compile_decode(model, "cpu")
    assert torch.equal(model.generate(prompt, 20, temperature=0), expected)
    assert "decoding without torch.compile: it failed with RuntimeError" in capsys.readouterr().out


FAULTS_OF_BIG_TENSORS = """
import resource, sys
import torch
import torch.nn.functional as F
import speedups
if sys.argv[1] == "keep" and not speedups.keep_freed_memory():
    print("unsupported")
    sys.exit()
def page_faults_of_a_64mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB of float32, written once and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [page_faults_of_a_64mb_tensor() for _ in range(20)]
print(sum(faults[-5:]))  # once the heap has settled: is the freed memory reused?
"""


def test_keep_freed_memory_reuses_memory_instead_of_faulting_in_fresh_pages():
    def late_allocation_faults(mode):
        result = subprocess.run([sys.executable, "-c", FAULTS_OF_BIG_TENSORS, mode],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    kept = late_allocation_faults("keep")
    if kept == "unsupported":
        pytest.skip("not glibc: keep_freed_memory() does nothing here")
    default = int(late_allocation_faults("default"))
    if default < 1000:
        pytest.skip(f"this system maps big blocks without many page faults ({default})")
    # 5 x 64 MiB is 81,920 pages of 4 KiB: mapped afresh each time by default, reused if kept.
    assert int(kept) < default / 10
