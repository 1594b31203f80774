"""The GPU paths: training in bf16, fp16 and float32, fused AdamW and Muon, torch.compile,
exact resume, the compiled decode step, both attentions under autocast, peak memory, and the
`bench.py report` command; then the choices made for older GPUs and for machines without one.

    python -m pytest -m cuda tests      # on a machine with a CUDA GPU: just the GPU tests

A test (or a parameter) marked `cuda` needs a CUDA GPU and is skipped, with the reason, where
there is none. Where the same logic runs on a CPU, the test is parametrised over devices, so
that its CPU half runs everywhere. The last section pretends to be a T4, a P100, an H100, ... by
replacing torch.cuda's answers, and runs on any machine.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_runs import losses_by_step

import bench
import runs
import speedups
import train
import utils
from checkpoint import save_checkpoint
from config import Config, parse_config
from conftest import ROOT, TINY_FLAGS, random_batch, run_script, tiny_model
from runs import Run
from tokenizer import CharTokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
on_cuda = [pytest.mark.cuda, needs_cuda]
DEVICES = ["cpu", pytest.param("cuda", marks=on_cuda)]


def learn_one_batch(model, optimizer, config, run, steps=15):
    """(first loss, last loss) of training steps on one batch, which is learned by heart."""
    scaler = train.make_scaler(run)
    torch.manual_seed(0)
    batch = random_batch(16, 16, run.device)
    first = train.train_step(model, optimizer, scaler, [batch], config, run).item()
    for _ in range(steps):
        last = train.train_step(model, optimizer, scaler, [batch], config, run).item()
    return first, last


# ---------------------------------------------------------------------------------------------
# Training steps


@pytest.fixture(autouse=True)
def keep_tf32():
    """Put the TF32 switches back after each test. (Not monkeypatch: on some PyTorch versions
    reading allow_tf32 can fail once the newer fp32_precision switch was used, and monkeypatch
    then cannot restore it.)"""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (getattr(matmul, "allow_tf32", False), getattr(cudnn, "allow_tf32", False))
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = before

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_steps_learn_in_every_number_format(device, dtype):
    run = Run(device, dtype)
    assert train.make_scaler(run).is_enabled() == (dtype == "float16")  # loss scaling: fp16 only
    model = tiny_model().train().to(device)
    config = Config(learning_rate=1e-2, grad_clip=1.0)
    first, last = learn_one_batch(model, train.make_optimizer(model, config), config, run)
    assert math.isfinite(last) and last < first - 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_takes_the_steps_of_plain_adamw(device):
    models = [tiny_model().train().to(device) for _ in range(2)]  # the same weights
    fused = train.make_optimizer(models[0], Config())
    plain = train.make_optimizer(models[1], Config(reference=True))
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    before = models[0].lm_head.weight.detach().clone()
    run = Run(device, "float32")
    scaler = train.make_scaler(run)
    torch.manual_seed(0)
    for _ in range(3):
        batch = random_batch(8, 16, device)
        for model, optimizer in zip(models, (fused, plain)):
            train.train_step(model, optimizer, scaler, [batch], Config(), run)
    assert not torch.equal(models[0].lm_head.weight, before)
    for fused_param, plain_param in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(fused_param, plain_param, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_muon_learns_under_bf16_autocast(device):
    model = tiny_model().train().to(device)
    config = Config(optimizer="muon", learning_rate=3e-3, muon_lr=0.02, grad_clip=1.0)
    optimizer = train.make_optimizer(model, config)
    assert isinstance(optimizer, speedups.MuonAdamW)
    first, last = learn_one_batch(model, optimizer, config, Run(device, "bfloat16"))
    assert last < first - 0.5


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-2), ("bfloat16", 0.1)])
def test_compiled_training_follows_eager_training(dtype, tolerance):
    # CUDA only: on a CPU, compiling even the tiny model's step takes about a minute.
    if utils.compile_problem("cuda"):
        pytest.skip(utils.compile_problem("cuda"))
    torch._dynamo.reset()
    run = Run("cuda", dtype)
    losses = {}
    for setting in ("false", "true"):
        model = tiny_model().train().to("cuda")
        config = Config(compile=setting, learning_rate=1e-2)
        train_model = train.wrap_for_training(model, config, run)
        assert (train_model is not model) == (setting == "true")
        optimizer, scaler = train.make_optimizer(model, config), train.make_scaler(run)
        torch.manual_seed(0)
        # One batch, learned by heart: random tokens have nothing else to learn (loss ln 20).
        batch = random_batch(16, 16, "cuda")
        losses[setting] = [
            train.train_step(train_model, optimizer, scaler, [batch], config, run).item()
            for _ in range(10)]
    # The same batch: the compiled step computes what the eager one does, up to rounding.
    assert losses["true"] == pytest.approx(losses["false"], abs=tolerance)
    assert losses["true"][-1] < losses["true"][0] - 0.3


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_on_cuda_continues_where_it_stopped(tmp_path, tiny_data, optimizer):
    # As test_runs.py does on the CPU. The GPU's random state (it draws the batches and the
    # dropout masks here) must go into the checkpoint and come back.
    flags = ["--data", tiny_data, *TINY_FLAGS, "--device", "cuda", "--dtype", "float32",
             "--compile", "false", "--dropout", "0.1", "--log_interval", "1", "--eval_interval",
             "6", "--lr_decay_iters", "12", "--sample_tokens", "0", "--optimizer", optimizer]
    straight = tmp_path / "straight.pt"
    assert run_script("train.py", *flags, "--checkpoint", straight, "--max_iters", "12",
                      ).returncode == 0
    halves = tmp_path / "halves.pt"
    assert run_script("train.py", *flags, "--checkpoint", halves, "--max_iters", "6",
                      ).returncode == 0
    resumed = run_script("train.py", *flags, "--checkpoint", halves, "--max_iters", "12",
                         "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from step 6" in resumed.stdout
    expected = losses_by_step(tmp_path / "straight.pt.metrics.jsonl")
    assert sorted(expected) == list(range(1, 13))
    got = losses_by_step(tmp_path / "halves.pt.metrics.jsonl")
    assert sorted(got) == sorted(expected)
    # Some GPU kernels add up in a different order from run to run, so equal to the last bit
    # is not promised; another batch or dropout mask would move these losses by ~1e-2.
    assert [got[step] for step in sorted(got)] == \
        pytest.approx([expected[step] for step in sorted(expected)], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Attention and sampling

@pytest.mark.parametrize("device, dtype", [
    ("cpu", "bfloat16"), ("cpu", "float16"),
    pytest.param("cuda", "bfloat16", marks=on_cuda),
    pytest.param("cuda", "float16", marks=on_cuda)])
def test_sdpa_and_written_out_attention_agree_under_autocast(device, dtype):
    model = tiny_model().to(device)
    torch.manual_seed(1)
    with torch.no_grad():  # larger weights than the init's, so that attention moves the logits
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    idx = torch.randint(0, 20, (4, 16), device=device)
    logits = {}
    for flash in (True, False):
        for block in model.blocks:
            block.attn.flash = flash
        with utils.autocast(device, dtype):
            logits[flash] = model(idx)[0].float()
    exact, _ = model(idx)  # float32, written out
    scale = exact.abs().max().item()
    for flash, half_logits in logits.items():
        # ~1% in bf16 (8 bits of mantissa); attention that saw the future would be off ~80%.
        assert (half_logits - exact).abs().max().item() < 0.05 * scale, f"flash={flash}"


@pytest.mark.cuda
@needs_cuda
def test_compiled_decode_step_on_cuda_gives_the_eager_tokens(monkeypatch, capsys):
    # test_speedups.py checks this on the CPU; on CUDA the step is also a replayed CUDA graph.
    if utils.compile_problem("cuda"):
        pytest.skip(utils.compile_problem("cuda"))
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 (put back by keep_tf32)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model().to("cuda")
    prompts = [torch.tensor([[1, 2, 3]], device="cuda"), torch.tensor([[4, 5]], device="cuda"),
               torch.tensor([[6]], device="cuda")]  # one token: compiled from the first step
    eager = [model.generate(prompt, 40, temperature=0) for prompt in prompts]  # 40 > block 16
    assert speedups.compile_decode(model, "cuda", "auto")  # auto: on for CUDA
    compiled = [model.generate(prompt, 40, temperature=0) for prompt in prompts]
    for eager_tokens, compiled_tokens in zip(eager, compiled):
        assert torch.equal(eager_tokens, compiled_tokens)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every step of every prompt
    # bfloat16 weights, as generate.py samples on a GPU: runs past block_size too.
    model_bf16 = tiny_model().to("cuda", torch.bfloat16)
    assert speedups.compile_decode(model_bf16, "cuda")
    assert model_bf16.generate(prompts[0], 100).shape == (1, 103)
    # The random draw runs inside the CUDA graph too: the same seed gives the same text.
    samples = []
    for _ in range(2):
        torch.manual_seed(7)
        samples.append(model.generate(prompts[0], 40, temperature=0.8, top_p=0.9))
    assert torch.equal(*samples)
    assert "without torch.compile" not in capsys.readouterr().out  # it compiled, no fallback


@pytest.mark.cuda
@needs_cuda
def test_int8_weights_on_cuda_are_refused_with_a_clear_error(tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    model_args = dict(vocab_size=20, n_embd=32, n_layer=2, n_head=4, block_size=16, dropout=0.0)
    save_checkpoint(dict(model=tiny_model().state_dict(), model_args=model_args,
                         tokenizer=CharTokenizer("abcdefghijklmnopqrs\n").to_dict()),
                    str(checkpoint))
    result = run_script("generate.py", "--checkpoint", checkpoint, "--device", "cuda",
                        "--dtype", "int8", "--max_new_tokens", "5")
    assert result.returncode == 2
    assert "error: --dtype int8 runs on the CPU only" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.cuda
@needs_cuda
def test_peak_device_memory_counts_what_was_allocated():
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB
    assert 64 <= bench.peak_mib("cuda") - before < 66
    del block


# ---------------------------------------------------------------------------------------------
# bench.py report: the command that fills the GPU table, run small so that it cannot rot

@pytest.mark.parametrize("device", DEVICES)
def test_quick_report_fills_every_row(tmp_path, device):
    json_path = tmp_path / "report.json"
    result = run_script("bench.py", "report", "--device", device, "--quick", "--json",
                        json_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {json_path}" in result.stdout
    report = json.loads(json_path.read_text())
    rows = report["rows"]
    assert [row["unit"] for row in rows] == ["s"] + ["tokens/s"] * 5
    assert all(row["value"] is not None and row["value"] > 0 for row in rows), \
        [row["result"] for row in rows]
    table = result.stdout[result.stdout.index("| Measurement | Result | Details |"):]
    for row in rows:  # the printed table and the JSON say the same
        assert f"| {row['measurement']} | {row['result']} | {row['details']} |" in table
    assert all(row["peak_mib"] > 0 for row in rows[1:])
    environment = report["environment"]
    assert environment["torch"] == torch.__version__
    assert environment["cuda"] == torch.version.cuda
    if device == "cuda":
        assert environment["gpu"] == torch.cuda.get_device_name()
        compiled_rows = [row for row in rows if "compile on" in row["measurement"]
                         or row["measurement"].endswith("compiled")]
        assert len(compiled_rows) == 2
        assert all(row["compiled"] for row in compiled_rows) or utils.compile_problem("cuda")
        assert rows[1]["dtype"] == utils.pick_dtype("auto", "cuda")


def test_report_prints_the_table_and_says_where_the_json_went(tmp_path, monkeypatch, capsys):
    def fake_row(function, *args):
        return dict(measurement=function.__name__, result="1 tokens/s", details="made up",
                    value=1.0, unit="tokens/s")

    monkeypatch.setattr(bench, "in_fresh_process", fake_row)
    monkeypatch.setattr(bench, "time_to_target_row", lambda device, quick: dict(
        measurement="time", result="2.0 s", details="made up", value=2.0, unit="s"))
    json_path = tmp_path / "report.json"
    json_path.write_text("an older report")
    bench.report("cpu", True, str(json_path), 5)
    out = capsys.readouterr().out
    assert f"Wrote {json_path} (replacing the report that was there)" in out
    report = json.loads(json_path.read_text())
    assert [row["measurement"] for row in report["rows"]] == \
        ["time", "training_row", "training_row"] + ["generation_row"] * 3
    assert report["markdown"] in out and "| time | 2.0 s | made up |" in report["markdown"]
    assert report["environment"]["device"] == "cpu" and report["quick"]


# ---------------------------------------------------------------------------------------------
# Older and smaller GPUs, and machines without one: on any machine, by pretending

def pretend_gpu(monkeypatch, name, capability, triton=True):
    """Make torch.cuda answer as if this machine had the GPU `name`."""
    native_bf16 = capability >= (8, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # As the real one: bf16 is "supported" on any GPU by emulation, natively from 8.0 on.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: triton)
    # set_up may switch TF32 on: start from off (keep_tf32 puts the settings back afterwards).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


GPUS = [  # name, compute capability, the dtype train.py picks, TF32, compiles, peak for MFU
    ("Tesla T4", (7, 5), "float16", False, True, 65e12),
    ("Tesla V100-SXM2-16GB", (7, 0), "float16", False, True, 125e12),
    ("Tesla P100-PCIE-16GB", (6, 0), "float16", False, False, None),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bfloat16", True, True, 312e12),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bfloat16", True, True, 989e12),
]


@pytest.mark.parametrize("name, capability, dtype, tf32, compiles, peak_flops", GPUS,
                         ids=[gpu[0] for gpu in GPUS])
def test_what_train_py_picks_on_each_gpu(monkeypatch, capsys, name, capability, dtype, tf32,
                                         compiles, peak_flops):
    pretend_gpu(monkeypatch, name, capability)
    config, _ = parse_config(["--device", "cuda"])
    run = runs.set_up(config)
    assert (run.device, run.dtype) == ("cuda", dtype)
    # float16 has too few exponent bits for small gradients: loss scaling, with it only.
    assert train.make_scaler(run).is_enabled() == (dtype == "float16")
    assert torch.backends.cuda.matmul.allow_tf32 == tf32
    assert torch.backends.cudnn.allow_tf32 == tf32
    assert utils.pick_dtype("auto", "cuda") == dtype
    assert utils.use_compile(config.compile, run.device, "running") == compiles
    if not compiles:
        assert f"compute capability {capability[0]}.{capability[1]}" in capsys.readouterr().out
    assert runs.gpu_peak_flops(run) == peak_flops


def test_compile_is_skipped_with_a_note_where_triton_is_missing(monkeypatch, capsys):
    pretend_gpu(monkeypatch, "Tesla T4", (7, 5), triton=False)
    model = tiny_model()
    assert train.wrap_for_training(model, Config(), Run("cuda", "float16")) is model
    assert not speedups.compile_decode(model, "cuda", "auto")
    out = capsys.readouterr().out
    assert "running without torch.compile: Triton is not installed" in out
    assert "decoding without torch.compile: Triton is not installed" in out


def test_adamw_falls_back_to_the_plain_kernel_where_fused_is_missing(monkeypatch):
    real_adamw = torch.optim.AdamW

    def adamw_without_fused(params, fused=None, **options):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point "
                               "Tensors of supported devices")
        return real_adamw(params, **options)

    monkeypatch.setattr(torch.optim, "AdamW", adamw_without_fused)
    optimizer = train.make_optimizer(tiny_model(), Config())
    assert type(optimizer) is real_adamw and not optimizer.defaults.get("fused")


START_UP_WITHOUT_CUDA = """
import glob, importlib, os
import torch
assert not torch.cuda.is_available()
for path in sorted(glob.glob("*.py")):  # every script and module
    importlib.import_module(os.path.basename(path)[:-3])
import bench, generate, runs, train, utils
from config import parse_config
config, _ = parse_config(["--device", "auto"])
run = runs.set_up(config)
model = train.build_model(65, config, run)
train.make_optimizer(model, config)
train.wrap_for_training(model, config, run)
train.make_scaler(run)
utils.pick_dtype("auto", run.device)
bench.environment(run.device)
print("started on", run.device, run.dtype)
"""


def test_every_script_imports_and_starts_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides the GPUs of a machine that has some
    result = subprocess.run([sys.executable, "-c", START_UP_WITHOUT_CUDA], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "started on" in result.stdout and "cuda" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Apple GPUs (MPS), by pretending too: the choices utils.py's "Apple GPUs" comment explains

def pretend_mac(monkeypatch, macos):
    """Make torch answer as if this were a Mac with an Apple GPU, running macOS `macos`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer",
                        lambda major, minor: macos >= (major, minor))


def test_what_train_py_picks_on_an_apple_gpu(monkeypatch, capsys):
    pretend_mac(monkeypatch, (15, 0))
    config, _ = parse_config(["--device", "auto"])
    run = runs.set_up(config)
    assert (run.device, run.dtype) == ("mps", "float32")
    assert not train.make_scaler(run).is_enabled()
    assert utils.pick_dtype("auto", "mps") == "float32"
    assert utils.use_flash(config.flash, "mps")  # SDPA
    for setting in ("auto", "true"):
        assert not utils.use_compile(setting, "mps", "running")
    assert "its Apple GPU (MPS) backend is a prototype" in capsys.readouterr().out


def test_bfloat16_on_an_apple_gpu_needs_macos_14(monkeypatch):
    pretend_mac(monkeypatch, (14, 0))
    assert runs.set_up(parse_config(["--device", "mps", "--dtype", "bfloat16"])[0]).device == "mps"
    pretend_mac(monkeypatch, (13, 5))
    with pytest.raises(utils.UsageError, match="needs macOS 14 or newer on an Apple GPU"):
        runs.set_up(parse_config(["--device", "mps", "--dtype", "bfloat16"])[0])
    # Muon's iteration runs in float32 there (bf16 is not native on every Apple GPU), so Muon
    # needs no macOS 14 (its parameters sit on "mps:0")
    assert runs.set_up(parse_config(["--device", "mps", "--optimizer", "muon"])[0]).device == "mps"
    assert not utils.has_native_bf16("mps") and not utils.has_native_bf16("mps:0")


def test_an_apple_gpus_random_state_is_saved_and_restored(monkeypatch):
    pretend_mac(monkeypatch, (15, 0))
    mps_state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": mps_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": restored.append(state))
    state = runs.rng_state()
    assert state["gpu"][0] == "mps" and torch.equal(state["gpu"][1], mps_state)
    assert runs.restore_rng(state) and torch.equal(restored[0], mps_state)
