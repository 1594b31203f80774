"""Hostile input on every flag of train.py, generate.py and bench.py, as a new user might type it:
empty, negative, zero, NaN, infinite, huge, the wrong type, odd Unicode, paths that are folders,
the data file, too long, or lead nowhere. Each case must end in a clean run (exit 0) or in one
`error:` line with exit code 2, never a traceback; and no file the run does not own may change
(a snapshot holds the data, an earlier run's checkpoint and its metrics log).

Most cases call the script's main() in this process, through the same run_main() the scripts
use, with a tiny model that trains for at most one step; a few run the scripts as a user does.
"""

import contextlib
import hashlib
import io
import itertools
import os
import pathlib
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

import bench
import dataset
import explore
import generate
import runs
import train
import utils
from config import Config
from conftest import ROOT, TINY_FLAGS, TINY_TEXT, run_in_process, run_script

HUGE = "1" + "0" * 30  # an int any flag accepts as a number; more than any machine can hold
NOT_NUMBERS = ["", "abc", "nan", "2.5"]  # for whole-number flags: argparse refuses each
NOT_FLOATS = ["", "abc", "nan", "inf", "-inf"]

# Train: flag -> {value: expected exit code}. The runs use TINY_FLAGS and stop after one step.
TRAIN_INTS = {
    # Values, then the exit code each must give. int() also reads Unicode digits and spaces.
    "n_embd": dict(zip(["-1", "0", HUGE, "\uff11\uff16"], [2, 2, 2, 0])),  # fullwidth 16
    "n_layer": dict(zip(["-1", "0", HUGE, "\u0661"], [2, 2, 2, 0])),  # Arabic-Indic 1
    "n_head": dict(zip(["-1", "0", HUGE, "3"], [2, 2, 2, 2])),  # 3 does not divide 32
    "block_size": dict(zip(["-1", "0", HUGE, " 8 "], [2, 2, 2, 0])),
    "batch_size": dict(zip(["-1", "0", HUGE, "1"], [2, 2, 2, 0])),
    "gradient_accumulation_steps": dict(zip(["-1", "0", HUGE, "2"], [2, 2, 2, 0])),
    "max_iters": dict(zip(["-1", "0", HUGE, "1"], [2, 2, 0, 0])),  # huge: stopped at step 1
    "eval_interval": dict(zip(["-1", "0", HUGE, "1"], [2, 2, 0, 0])),
    "eval_iters": dict(zip(["-1", "0", "1"], [2, 2, 0])),  # huge would evaluate for ever
    "log_interval": dict(zip(["-1", "0", HUGE], [2, 2, 0])),
    "warmup_iters": dict(zip(["-1", "0", HUGE], [2, 0, 0])),
    "lr_decay_iters": dict(zip(["-1", "0", HUGE], [2, 0, 0])),
    "sample_tokens": dict(zip(["-1", "0", "3"], [2, 0, 0])),  # huge would sample for ever
    "eval_sample_tokens": dict(zip(["-1", "0", "3"], [2, 0, 0])),
    "eval_tokens": dict(zip(["-1", "0", "32", "33", HUGE], [2, 0, 2, 0, 0])),  # 0 or > block
    "bpe_sample_chars": dict(zip(["-1", "0", "1", HUGE], [2, 0, 0, 0])),
    "vocab_size": dict(zip(["-1", "0", "255", HUGE], [2, 2, 2, 0])),  # unused by char
    "seed": dict(zip(["-1", "0", HUGE, str(2**63 - 1), str(2**63)], [2, 0, 2, 0, 2])),
}
TRAIN_FLOATS = {
    # -1, 0, the largest and a subnormal float, then one more (float() reads fullwidth digits)
    "dropout": dict(zip(["-1", "0", "1e308", "1e-320", "\uff11"], [2, 0, 2, 0, 2])),
    "learning_rate": dict(zip(["-1", "0", "1e308", "1e-320", "0.5"], [2, 2, 2, 2, 0])),
    "muon_lr": dict(zip(["-1", "0", "1e308", "1e-320", "\uff11"], [2, 2, 0, 0, 0])),  # adamw
    "min_lr": dict(zip(["-1", "0", "1e308", "1e-320", "\uff11"], [2, 0, 2, 0, 2])),
    "weight_decay": dict(zip(["-1", "0", "1e308", "1e-320", "\uff11"], [2, 0, 2, 0, 0])),
    "beta1": dict(zip(["-1", "0", "1e308", "1e-320", "\uff11"], [2, 0, 2, 0, 2])),
    "beta2": dict(zip(["-1", "0", "1e308", "1e-320", "0.999"], [2, 0, 2, 0, 0])),
    "grad_clip": dict(zip(["-1", "0", "1e308", "1e-320", "\uff11"], [2, 0, 0, 0, 0])),
}
TRAIN_WORDS = {  # text flags; paths come from the home fixture ({home}, {data}, ...)
    "tokenizer": {"": 2, "BPE": 2, "char ": 2, "\u00fc": 2, "\udcff": 2, "bpe": 0},
    "flash": {"": 2, "TRUE": 2, "1": 2, "\u00fc": 2, "true": 0},
    "compile": {"": 2, "on": 2, "\u00fc": 2, "false": 0},
    "optimizer": {"": 2, "sgd": 2, "ADAMW": 2, "muon": 0},
    "dtype": {"": 2, "float8": 2, "int8": 2, "fp16": 2, "bfloat16": 0, "float16": 0},
    "device": {"": 2, "gpu": 2, "cuda:x": 2, "cuda:-1": 2, "cpu:0": 2, "cuda:99": 2, "meta": 2,
               "\u00fc": 2, "cpu": 0},
    "preset": {"": 2, "gpu": 2, "CPU": 2, "cpu": 0},
    "reference": {"": 2, "maybe": 2, "2": 2, "\u00fc": 2, "yes": 0, "0": 0},
    "wandb": {"": 2, "maybe": 2, "\udcff": 2, "false": 0},
    "wandb_project": {"": 2, " ": 2, "a/b": 2, "x" * 200: 2, "\u00fc\u00f1\u00ee": 0},
    "data": {"": 2, "missing.txt": 2, "{home}": 2, "/dev/null": 2, "{loop}": 2,
             "x" * 300: 2, "\udcff.txt": 2, "{earlier}": 2, "{latin1}": 2, "{short}": 2,
             "new\nline.txt": 2},
    "checkpoint": {"": 2, ".": 2, "{home}": 2, "{data}": 2, "/dev/null/run.pt": 2,
                   "x" * 300: 2, "run.pt.lock": 2, "run.pt.metrics.jsonl": 2, "run.tmp": 2,
                   "x.tokens.json": 2, "new/sub/run.pt": 0, "\udcff.pt": 0, "\u00fc \u2603.pt": 0},
    "resume": {"": 2, " ": 2, "missing.pt": 2, "{home}": 2, "{data}": 2, "{earlier}": 2,
               "{random}": 2, "true": 2, "{sparse}": 2, "new\nline.pt": 2},
}
# Values that would make a run go on for ever; for these flags, checked by parse_args alone.
TRAIN_PARSE_ONLY = {"eval_iters": HUGE, "sample_tokens": HUGE, "eval_sample_tokens": HUGE}

GENERATE = {
    "prompt": {"": 0, "ROMEO:": 0, "\n": 0, "a" * 3000: 0, "\u00fc": 2, "\udcff": 2},
    "max_new_tokens": {"-1": 2, "0": 0, "\uff13": 0},
    "temperature": {"-1": 2, "0": 0, "1e308": 0, "1e-320": 2, "1e-6": 0,
                    "\uff11": 0},
    "top_k": {"-1": 2, "0": 2, HUGE: 0, "\uff11": 0},
    "top_p": {"-1": 2, "0": 2, "1.5": 2, "1e-320": 2, "1e-6": 0, "1": 0, "0.9": 0},
    "checkpoint": {"": 2, "missing.pt": 2, "{home}": 2, "{data}": 2, "/dev/null": 2,
                   "{random}": 2, "{text}": 2, "{pickled}": 2, "{nan_weights}": 2,
                   "{huge_n_embd}": 2, "{bad_tokenizer}": 2, "{sparse}": 2, "x" * 300: 2,
                   "new\nline.pt": 2, "{earlier}": 0},
    "device": {"": 2, "gpu": 2, "cuda:x": 2, "cpu:0": 2, "\u00fc": 2, "cpu": 0},
    "dtype": {"": 2, "int4": 2, "float32": 0, "bfloat16": 0, "int8": 0},
    "compile": {"": 2, "maybe": 2, "false": 0},
    "seed": {"-1": 2, "0": 0, HUGE: 2, str(2**63 - 1): 0, "\uff11": 0},
    "num_samples": {"-1": 2, "0": 2, HUGE: 2, "\uff13": 0},
    "weights": {"": 2, "BEST": 2, "middle": 2, "best": 0, "last": 0},
}
GENERATE_NUMBERS = {"max_new_tokens": NOT_NUMBERS, "temperature": NOT_FLOATS,
                    "top_k": NOT_NUMBERS, "top_p": NOT_FLOATS, "seed": NOT_NUMBERS,
                    "num_samples": NOT_NUMBERS}
GENERATE_SWITCHES = ["no_cache", "interactive", "reference"]  # plain: 0; --flag=x: 2
GENERATE_PARSE_ONLY = {"max_new_tokens": HUGE}

BENCH = {  # bench.py generate (train for --steps/--batch_size, report for --quick/--json);
    # the timed work is stubbed out: the flags are checked before it starts
    "what": {"": 2, "TRAIN": 2, "\u00fc": 2, "train": 0, "generate": 0, "report": 0, "curve": 0,
             "prepare": 0},
    "steps": {"-1": 2, "0": 2, "1": 0, str(10**9): 0, HUGE: 2},  # past 2**63: uncountable
    "tokens": {"-1": 2, "0": 2, "1": 0, HUGE: 0},
    "batch_size": {"-1": 2, "0": 2, HUGE: 2, "\uff18": 0},
    "device": {"": 2, "gpu": 2, "cuda:x": 2, "cpu": 0},
    "dtype": {"": 2, "int4": 2, "int8": 0, "float32": 0},
    "compile": {"": 2, "maybe": 2, "false": 0},
    "json": {"": 2, " ": 2, "{home}": 2, "/dev/null/report.json": 2, "x" * 300: 2,
             "new/report.json": 0, "\u00fc \u2603.json": 0},
    "preset": {"": 2, "CPU": 2, "\u00fc": 2, "cpu": 0},
    "seconds": {"-1": 2, "0": 2, "1": 0, HUGE: 0},
    "size_mb": {"-1": 2, "0": 2, "1": 0},
    "text": {"": 2, "poems": 2, "shakespeare": 0},
    "data": {"": 2, "missing.txt": 2, "{data}": 0},
    "tokenizer": {"": 2, "BPE": 2, "bpe": 0},
    "vocab_size": {"-1": 2, "255": 2, "256": 0},
    "bpe_sample_chars": {"-1": 2, "0": 0},
    "points": {"-1": 2, "0": 2, "1": 0, HUGE: 0},
}
BENCH_SWITCHES = ["quick"]
BENCH_NUMBERS = {"steps": NOT_NUMBERS, "tokens": NOT_NUMBERS, "batch_size": NOT_NUMBERS,
                 "seconds": NOT_NUMBERS, "points": NOT_NUMBERS, "size_mb": NOT_NUMBERS,
                 "vocab_size": NOT_NUMBERS, "bpe_sample_chars": NOT_NUMBERS}


def cases():
    """(script, flag, value, expected exit code, how: run or parse) for every flag."""
    numbers = {**{f: NOT_NUMBERS for f in TRAIN_INTS}, **{f: NOT_FLOATS for f in TRAIN_FLOATS}}
    for flag, values in {**TRAIN_INTS, **TRAIN_FLOATS, **TRAIN_WORDS}.items():
        for value in numbers.get(flag, []):
            yield "train", flag, value, 2, "run"
        for value, expected in values.items():
            yield "train", flag, value, expected, "run"
    for flag, value in TRAIN_PARSE_ONLY.items():
        yield "train", flag, value, 0, "parse"
    for flag, values in GENERATE.items():
        for value in GENERATE_NUMBERS.get(flag, []):
            yield "generate", flag, value, 2, "run"
        for value, expected in values.items():
            yield "generate", flag, value, expected, "run"
    for flag in GENERATE_SWITCHES:
        yield "generate", flag, None, 0, "run"
        yield "generate", flag, "x", 2, "run"
    for flag, value in GENERATE_PARSE_ONLY.items():
        yield "generate", flag, value, 0, "parse"
    for flag, values in BENCH.items():
        for value in BENCH_NUMBERS.get(flag, []):
            yield "bench", flag, value, 2, "run"
        for value, expected in values.items():
            yield "bench", flag, value, expected, "run"
    for flag in BENCH_SWITCHES:
        yield "bench", flag, None, 0, "run"
        yield "bench", flag, "x", 2, "run"


CASES = list(cases())


def case_id(case):
    script, flag, value, _, how = case
    shown = "" if value is None else "=" + ascii(value)[1:-1][:24]
    return f"{script}-{flag}{shown}" + ("-parse" if how == "parse" else "")


# --- the home folder: what a user owns ------------------------------------------------------

def quietly(function, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A folder holding the data, an earlier run (checkpoint, metrics log, loss curve), a BPE
    checkpoint, and files that only look like checkpoints; paths by name."""
    folder = tmp_path_factory.mktemp("home")
    paths = {name: str(folder / name) for name in (
        "data.txt", "earlier.pt", "bpe.pt", "random.pt", "text.pt", "pickled.pt",
        "nan_weights.pt", "huge_n_embd.pt", "bad_tokenizer.pt", "sparse.pt", "latin1.txt",
        "short.txt")}
    with open(paths["data.txt"], "w", encoding="utf-8") as f:
        f.write(TINY_TEXT)
    common = ["--data", paths["data.txt"], *TINY_FLAGS, "--max_iters", "2", "--eval_interval", "1",
              "--sample_tokens", "0", "--eval_iters", "1"]
    quietly(train.main, [*common, "--checkpoint", paths["earlier.pt"]])
    quietly(train.main, [*common, "--checkpoint", paths["bpe.pt"], "--tokenizer", "bpe",
                         "--vocab_size", "300"])
    utils.release_locks()  # as run_main does when a script's main() ends
    with open(paths["random.pt"], "wb") as f:
        f.write(os.urandom(2000))
    with open(paths["text.pt"], "w") as f:
        f.write("model weights go here\n")
    with open(paths["latin1.txt"], "wb") as f:
        f.write(TINY_TEXT.replace("e", "\u00e9").encode("latin-1"))
    with open(paths["short.txt"], "w") as f:
        f.write("too short")
    earlier = torch.load(paths["earlier.pt"], weights_only=True)
    torch.save({**earlier, "model_args": torch.nn.Linear(1, 1)}, paths["pickled.pt"])
    nan_model = {**earlier["model"], "lm_head.bias": torch.full_like(
        earlier["model"]["lm_head.bias"], float("nan"))}
    torch.save({**earlier, "model": nan_model}, paths["nan_weights.pt"])
    torch.save({**earlier, "model_args": {**earlier["model_args"], "n_embd": 10**9}},
               paths["huge_n_embd.pt"])
    torch.save({**earlier, "tokenizer": {"kind": "char", "chars": "aab"}},
               paths["bad_tokenizer.pt"])
    sparse_model = {**earlier["model"], "tok_emb.weight": earlier["model"]["tok_emb.weight"]
                    .to_sparse()}  # torch.load takes it; a sparse tensor has no isfinite
    torch.save({**earlier, "model": sparse_model}, paths["sparse.pt"])
    os.symlink(folder / "loop", folder / "loop")  # a link to itself: ELOOP when opened
    # By name without its ending: home["data"], home["earlier"], home["random"], ...
    return dict(folder=str(folder), loop=str(folder / "loop"),
                **{os.path.splitext(name)[0]: path for name, path in paths.items()})


def snapshot(folder):
    """{relative path: sha256} of every file under folder, symlinks as their target's name."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                found[os.path.relpath(path, folder)] = "link to " + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def home_before(home):
    return snapshot(home["folder"])


def assert_untouched(home, home_before):
    """Nothing the user owns changed; the only new files there: token files beside the data
    (dataset.py prepares one per tokenizer setting)."""
    after = snapshot(home["folder"])
    assert {name: after.get(name) for name in home_before} == home_before
    assert all(name.endswith((".tokens", ".tokens.json"))
               for name in after.keys() - home_before.keys())


def fill_in(value, home):
    if value is None or "{" not in value:
        return value
    return value.format(home=home["folder"], **home)


# --- running one case ------------------------------------------------------------------------

def stop_after_one_step(run):
    """Stands in for runs.catch_ctrl_c: the run stops (and saves) as if Ctrl-C came at once."""
    calls = itertools.count()
    return lambda: next(calls) >= 1


def fake_measurement(function, *args):
    return 1000.0, 100.0  # (tokens/s, peak MiB): bench's timed work, not run here


def fake_report(device, quick, json_path, n_tokens):
    pass  # bench.py report: minutes of training and sampling, not run here


def fake_curve(preset, seconds, points, device):
    pass  # bench.py curve: minutes of training, not run here


def fake_prepare(args, device):
    if args.data:  # the text to prepare is found before the work starts
        dataset.find_sources(args.data)


def end_of_input(prompt=""):
    raise EOFError  # generate.py --interactive: the user pressed Ctrl-D


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in an empty folder of one's own (relative paths land there), one step at most."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "catch_ctrl_c", stop_after_one_step)
    monkeypatch.setattr(bench, "in_fresh_process", fake_measurement)
    monkeypatch.setattr(bench, "report", fake_report)
    monkeypatch.setattr(bench, "curve", fake_curve)
    monkeypatch.setattr(bench, "prepare_benchmark", fake_prepare)
    monkeypatch.setattr("builtins.input", end_of_input)
    return tmp_path


def argv_for(script, flag, value, home):
    flag_arg = [f"--{flag}"] if value is None else [f"--{flag}={value}"]
    if script == "train":
        return ["--data", home["data"], "--checkpoint", "run.pt", *TINY_FLAGS, "--max_iters", "1",
                "--eval_interval", "1", "--sample_tokens", "0", "--eval_iters", "1", *flag_arg]
    if script == "generate":
        return ["--checkpoint", home["earlier"], "--max_new_tokens", "5", "--device", "cpu",
                *flag_arg]
    if flag == "what":
        return [value]
    what = {"steps": "train", "batch_size": "train", "quick": "report", "json": "report",
            "preset": "curve", "seconds": "curve", "points": "curve", "size_mb": "prepare",
            "text": "prepare", "data": "prepare", "tokenizer": "prepare",
            "vocab_size": "prepare", "bpe_sample_chars": "prepare"}.get(flag, "generate")
    return [what, "--device", "cpu", *flag_arg]


MAINS = {"train": train.main, "generate": generate.main, "bench": bench.main}
PARSERS = {"train": train.parse_config, "generate": generate.parse_args}


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_hostile_value(case, home, home_before, isolated):
    script, flag, value, expected, how = case
    value = fill_in(value, home)
    argv = argv_for(script, flag, value, home)
    if how == "parse":  # accepted; running it would go on for as long as it was asked to
        PARSERS[script](argv)
        return
    code, out, err = run_in_process(MAINS[script], argv)
    assert code == expected, (code, out[-2000:], err)
    if code == 2:
        [line] = err.strip().splitlines()  # one line, and only that
        assert "error: " in line
    assert_untouched(home, home_before)
    leftovers = [name for name in os.listdir(isolated) if name.endswith(".tmp")]
    assert not leftovers


def test_the_harness_tries_every_flag(capsys):
    tried = {script: {flag for s, flag, *_ in CASES if s == script} for script in MAINS}
    assert tried["train"] == set(Config.__dataclass_fields__) | {"preset"}
    for script in ("generate", "bench"):
        with pytest.raises(SystemExit):
            MAINS[script](["--help"])
        help_flags = set(re.findall(r"--(\w+)", capsys.readouterr().out)) - {"help"}
        assert tried[script] - {"what"} == help_flags
    assert len(CASES) >= 250


# --- a few cases as a user runs them: a real process, its stderr -----------------------------

def expect_one_error_line(result, fragment):
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and fragment in line, line
    return line


@pytest.mark.parametrize("script, args, fragment", [
    ("train.py", ["--learning_rate", "-1"], "--learning_rate must be above 0"),
    ("train.py", ["--resume="], "--resume was given an empty path"),
    ("generate.py", ["--temperature", "nan"], "--temperature must be 0 (greedy) or a finite"),
    # A terminal that passes the lone byte 0xff: Python reads it as the lone surrogate U+DCFF.
    ("generate.py", ["--checkpoint", "{bpe}", "--device", "cpu", "--prompt", "ROMEO \udcff"],
     "not valid Unicode"),
])
def test_bad_flags_in_a_real_process(script, args, fragment, home):
    expect_one_error_line(run_script(script, *[fill_in(a, home) for a in args]), fragment)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is Linux's")
@pytest.mark.parametrize("script, args", [
    ("generate.py", ["--checkpoint", "{earlier}", "--device", "cpu", "--max_new_tokens", "5"]),
    ("train.py", ["--data", "{data}", *TINY_FLAGS, "--max_iters", "1"])])
def test_output_that_cannot_be_written_is_one_line(script, args, home, home_before, tmp_path):
    # /dev/full: every write fails as on a full disk (`> run.log`, the disk filling up)
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--checkpoint",
                                 tmp_path / "new.pt", *[fill_in(a, home) for a in args]],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        "error: cannot write the output (No space left on device); free some disk space, or "
        "send the output elsewhere\n"), result.stderr
    assert_untouched(home, home_before)
    assert not os.listdir(tmp_path)  # train.py stopped before any work: no file, no lock


def test_train_py_whose_output_fills_the_disk_stops_and_saves(home, tmp_path):
    # The log's disk fills up mid-run: here the log may grow by 1,500 bytes more (ulimit -f,
    # a sparse file just under it), while the checkpoint, far below the limit, saves as usual.
    limit, log = 8 * 2**20, tmp_path / "train.log"
    with open(log, "wb") as f:
        f.truncate(limit - 1500)
    with open(log, "ab") as output:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), "--data", home["data"],
             "--checkpoint", tmp_path / "run.pt", *TINY_FLAGS, "--max_iters", "100000",
             "--eval_interval", "1", "--sample_tokens", "0"], stdout=output,
            stderr=subprocess.PIPE, text=True, timeout=300,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 2 and result.stderr == (
        "error: cannot write the output (File too large); free some disk space, or send the "
        "output elsewhere\n"), result.stderr
    # It stops as a first Ctrl-C does: it finishes the step and saves, past the last line logged.
    printed = log.read_bytes()[limit - 1500:].decode(errors="replace")
    evaluated = [int(step) for step in re.findall(r"Step (\d+): train loss [^\n]*\n", printed)]
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] > evaluated[-1] >= 1
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tmp", ".lock"))]


def test_checkpoint_in_a_folder_not_there_yet_in_a_real_process(home, home_before, tmp_path):
    fresh = tmp_path / "runs" / "new.pt"  # the README's example, in a checkout without runs/
    result = run_script("train.py", "--data", home["data"], *TINY_FLAGS, "--max_iters", "1",
                        "--eval_interval", "1", "--sample_tokens", "0", "--eval_iters", "1",
                        "--checkpoint", fresh)
    assert result.returncode == 0, result.stderr
    assert torch.load(fresh, weights_only=True)["step"] == 1
    assert_untouched(home, home_before)


@pytest.mark.parametrize("script", ["train.py", "generate.py", "bench.py"])
def test_ctrl_c_while_torch_loads_exits_quietly(script):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing torch takes seconds: Ctrl-C lands in the middle of it
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the imports finished before the Ctrl-C landed")
    assert process.returncode == 130 and "Traceback" not in err and not err.strip(), err


# --- under attack: other processes, signals, files that are not files -----------------------

def start_training(data, checkpoint, *extra):
    """train.py in a real process that trains until stopped; returns once it is training."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--checkpoint",
         checkpoint, *TINY_FLAGS, "--max_iters", "100000", "--eval_interval", "5",
         "--sample_tokens", "0", *extra], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("Starting training"):
            return process
    raise AssertionError(process.communicate())


def test_a_second_run_on_the_same_checkpoint_is_refused_and_sigterm_saves(tmp_path,
                                                                           tiny_data):
    checkpoint = tmp_path / "run.pt"
    leftover = tmp_path / "run.pt.99999999.tmp"  # what a killed run left behind,
    leftover.write_bytes(b"half a checkpoint")
    (tmp_path / "run.pt.lock").write_text("process 99999999")  # with its lock, naming it
    first = start_training(tiny_data, checkpoint)
    time.sleep(3)  # a save or two
    assert not leftover.exists()  # the run holding the lock removed it
    second = run_script("train.py", "--data", tiny_data, *TINY_FLAGS, "--max_iters", "2",
                        "--checkpoint", checkpoint)
    expect_one_error_line(second, f"another run (process {first.pid}) is saving to "
                                  f"--checkpoint {checkpoint}")
    first.send_signal(signal.SIGTERM)  # what `timeout` or a cluster's scheduler sends
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "Traceback" not in err, err
    assert "SIGTERM: stopping after this step and saving" in out
    step = int(re.search(r"Stopped at step (\d+); checkpoint saved", out)[1])
    assert torch.load(checkpoint, weights_only=True)["step"] == step
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tmp", ".lock"))]
    again = run_script("train.py", "--data", tiny_data, *TINY_FLAGS, "--max_iters", "2",
                       "--checkpoint", checkpoint)  # the lock went with the first run
    assert again.returncode == 0, again.stderr


def test_a_closed_terminal_saves_and_stops_as_sigterm_does(tmp_path, tiny_data):
    """The terminal of a shell that started the run (a pseudo-terminal here) closes, as when an
    ssh session drops: writing to it fails from then on, before the SIGHUP reaches the run (the
    shell gets it first, and it reaches the run only as the shell ends)."""
    import fcntl
    import pty
    import termios
    terminal, shell_side = pty.openpty()

    def own_terminal():  # the shell leads a session of its own, with this terminal
        os.setsid()
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)

    checkpoint = tmp_path / "run.pt"
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--data", tiny_data,
               "--checkpoint", checkpoint, *TINY_FLAGS, "--max_iters", "100000",
               "--eval_interval", "100000", "--sample_tokens", "0"]  # saves at step 0, then stops
    shell = subprocess.Popen(["bash", "-c", " ".join(map(shlex.quote, map(str, command))) + "; :"],
                             cwd=ROOT, stdin=shell_side, stdout=shell_side, stderr=shell_side,
                             preexec_fn=own_terminal)
    os.close(shell_side)
    seen = b""
    while b"Starting training" not in seen:
        seen += os.read(terminal, 4096)
    time.sleep(2)  # some steps
    os.close(terminal)  # hang up
    shell.wait(timeout=60)
    deadline = time.time() + 120
    while os.path.exists(f"{checkpoint}.lock") and time.time() < deadline:  # the run, orphaned
        time.sleep(0.2)
    assert torch.load(checkpoint, weights_only=True)["step"] > 0  # saved as it stopped
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".tmp", ".lock"))]


def test_a_reader_that_goes_away_saves_and_stops(tmp_path, tiny_data):
    """`python train.py | tee log`, and tee is gone (its terminal closed): writing fails."""
    checkpoint = tmp_path / "run.pt"
    process = start_training(tiny_data, checkpoint, "--eval_interval", "100000")
    time.sleep(2)
    process.stdout.close()  # the reader goes away
    assert process.wait(timeout=120) == 0
    assert "Traceback" not in process.stderr.read()
    assert torch.load(checkpoint, weights_only=True)["step"] > 0  # saved as it stopped


@pytest.mark.parametrize("signal_name", ["SIGHUP", "SIGXCPU"])
def test_sighup_and_sigxcpu_save_and_stop_as_sigterm_does(tmp_path, tiny_data, signal_name):
    checkpoint = tmp_path / "run.pt"
    process = start_training(tiny_data, checkpoint)
    time.sleep(2)
    process.send_signal(getattr(signal, signal_name))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in err, err
    assert f"{signal_name}: stopping after this step and saving" in out
    step = int(re.search(r"Stopped at step (\d+); checkpoint saved", out)[1])
    assert torch.load(checkpoint, weights_only=True)["step"] == step


def test_sighup_under_nohup_is_still_ignored(tmp_path, tiny_data):
    ignoring = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited, as nohup does it
    try:
        process = start_training(tiny_data, tmp_path / "run.pt")
    finally:
        signal.signal(signal.SIGHUP, ignoring)
    process.send_signal(signal.SIGHUP)
    time.sleep(2)
    assert process.poll() is None  # still training
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and "SIGHUP" not in out, err


def test_sigxcpu_lifts_the_soft_cpu_limit_the_kernel_would_repeat_it_past(monkeypatch):
    """Past a soft CPU-time limit the kernel sends SIGXCPU every second, and at the run's exit
    Python's default action for it would kill the run: the limit is lifted to the hard one."""
    import resource
    handlers, limits = {}, []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.update({signum: handler}))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (6, 20))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limit: limits.append((which, limit)))
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # catch_ctrl_c guards it: put back after
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    stop_requested = runs.catch_ctrl_c(types.SimpleNamespace(world_size=1, log=print))
    stop_requested(), stop_requested()  # the second step begun: the first is done
    handlers[signal.SIGXCPU](signal.SIGXCPU, None)
    assert limits == [(resource.RLIMIT_CPU, [20, 20])]
    assert stop_requested() == runs.STOP


def test_sigterm_while_the_last_sample_is_written_quits_at_once(tmp_path, tiny_data):
    process = subprocess.Popen(  # a sample far too long to wait for: the step is saved first
        [sys.executable, os.path.join(ROOT, "train.py"), "--data", tiny_data, "--checkpoint",
         tmp_path / "run.pt", *TINY_FLAGS, "--max_iters", "2", "--sample_tokens", "10000000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("Saved checkpoint to"):
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] == 2


def test_a_killed_preparation_leaves_no_worker_behind(tmp_path):
    script = tmp_path / "prepare.py"  # encodes for ever in two workers, until killed
    script.write_text(
        f"import sys, time\nsys.path.insert(0, {ROOT!r})\nimport fast_bpe\n"
        "def slow(piece, dtype):\n    time.sleep(1000)\n"
        "fast_bpe.encode_piece = slow\n"
        "pieces = ((\"train\", \"word \" * 10) for _ in range(100))\n"
        "print('encoding', flush=True)\n"
        "for _ in fast_bpe.encode_pieces(pieces, [], 'uint16', 2):\n    pass\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "encoding\n"
    workers = []
    for _ in range(100):
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                 text=True).stdout.split()
        if len(workers) == 2:
            break
        time.sleep(0.1)
    assert len(workers) == 2
    process.kill()  # kill -9: no clean-up runs in it
    process.wait()
    time.sleep(3)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")
             and "zombie" not in open(f"/proc/{pid}/status").read()]
    for pid in alive:
        os.kill(int(pid), signal.SIGKILL)
    assert not alive


def test_things_that_are_not_regular_files_are_named_at_once(tmp_path, tiny_data):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)  # opening it would wait for a writer for ever
    expect_one_error_line(run_script("train.py", "--data", fifo, timeout=60),
                          f"--data {fifo} is a FIFO or a socket, not a regular file")
    for strange in ("pipe.txt", "dead.txt"):
        folder = tmp_path / strange.replace(".", "-")
        folder.mkdir()
        (folder / "good.txt").write_text(TINY_TEXT)
        if strange == "pipe.txt":
            os.mkfifo(folder / strange)
        else:
            os.symlink(tmp_path / "nowhere.txt", folder / strange)
        expect_one_error_line(
            run_script("train.py", "--data", folder, "--device", "cpu", timeout=60),
            f"{folder / strange} in the --data folder is a " +
            ("FIFO" if strange == "pipe.txt" else "symlink to nothing"))


def test_under_torchrun_an_error_is_printed_once(tmp_path):
    torchrun = (shutil.which("torchrun", path=os.path.dirname(sys.executable))
                or shutil.which("torchrun") or pytest.skip("torchrun not found"))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "train.py",
                             "--n_head", "5", "--device", "cpu"],  # every rank refuses it
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("error: n_embd (384) must be divisible") == 1


def test_bench_curve_fails_with_train_py_s_reason(monkeypatch):
    real_launch = bench.launch_train_py
    monkeypatch.setattr(bench, "launch_train_py",
                        lambda flags: real_launch([*flags, "--n_head", "5"]))  # 192 % 5 != 0
    code, out, err = run_in_process(bench.main, ["curve", "--device", "cpu", "--seconds", "30"])
    assert code == 2, (out[-2000:], err)
    [line] = err.strip().splitlines()
    assert "train.py --preset cpu failed (exit 2): error: n_embd (192) must be divisible" in line


def test_a_prompt_given_to_interactive_is_refused_not_dropped(home, isolated):
    code, _, err = run_in_process(generate.main, ["--checkpoint", home["earlier"], "--device",
                                                  "cpu", "--interactive", "--prompt", "ROMEO:"])
    assert code == 2 and err.strip() == ("error: --prompt does not apply to --interactive, which "
                                         "asks for each prompt; drop --prompt, or --interactive")


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "0", "--top_p", "0.5"], "--top_p does not apply to --temperature 0"),
    (["--compile", "true", "--no_cache"], "--compile true compiles the cached one-token step")])
def test_generate_flags_that_could_not_act_are_refused_not_ignored(home, isolated, flags, words):
    code, _, err = run_in_process(generate.main, ["--checkpoint", home["earlier"], "--device",
                                                  "cpu", *flags])
    assert code == 2 and err.strip().startswith(f"error: {words}") and len(err.splitlines()) == 1


def test_greedy_sampling_says_top_k_does_not_apply(home, isolated):
    code, out, err = run_in_process(generate.main, ["--checkpoint", home["earlier"], "--device",
                                                    "cpu", "--temperature", "0",
                                                    "--max_new_tokens", "3"])
    assert code == 0, err
    assert "Top-k: 200 (does not apply: greedy)" in out.splitlines()


@pytest.mark.parametrize("stdin", ["empty", "closed"])
def test_interactive_with_no_input_left_ends_quietly(home, stdin):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint",
                             home["earlier"], "--device", "cpu", "--interactive"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                            preexec_fn=(lambda: os.close(0)) if stdin == "closed" else None)
    assert result.returncode == 0 and not result.stderr, result.stderr
    # The prompt's line ended (a closed stdin fails before the prompt shows), nothing else said.
    assert result.stdout.endswith("> \n" if stdin == "empty" else "quits.\n\n"), result.stdout


def test_interactive_with_a_stdin_that_cannot_be_read_is_one_line(home, tmp_path):
    with open(tmp_path / "write_only", "w") as write_only:  # reading it fails: EBADF
        result = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint",
                                 home["earlier"], "--device", "cpu", "--interactive"], cwd=ROOT,
                                stdin=write_only, capture_output=True, text=True, timeout=120)
    expect_one_error_line(result, "cannot read the prompts from stdin (Bad file descriptor)")


@pytest.mark.parametrize("script", ["train.py", "generate.py", "explore.py", "bench.py"])
@pytest.mark.parametrize("library, name, value, reason", [
    ("torch", "TORCH_LOGS", "bogus", "Invalid log settings: bogus"),  # read as torch loads
    ("tqdm", "TQDM_MININTERVAL", "abc", "ValueError: could not convert string to float"),
    ("tqdm", "TQDM_BAR_FORMAT", "{nope}", "KeyError: 'nope'"),  # used when a bar is drawn
    ("tqdm", "TQDM_UNIT_DIVISOR", "0", "ZeroDivisionError")])  # when it counts in thousands
def test_a_setting_torch_or_tqdm_refuses_as_it_loads_is_one_line(script, library, name, value,
                                                                  reason, monkeypatch):
    monkeypatch.setenv(name, value)  # before any flag is read
    monkeypatch.setenv("TQDM_NCOLS", "80")  # a good setting: named only if tqdm failed
    monkeypatch.setenv("TQDM_DELAY", "5")  # the check's bar is drawn at once all the same
    line = expect_one_error_line(run_script(script, "--device", "cpu"),
                                 f"{library} cannot load with {name}='{value}'")
    assert reason in line and ("TQDM_NCOLS" in line) == (library == "tqdm"), line


@pytest.mark.parametrize("script", ["train.py", "generate.py", "explore.py", "bench.py"])
def test_a_deleted_current_folder_is_one_line(script, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--device", "cpu"],
                               cwd=gone, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: os.rmdir(gone), text=True)  # after the cd
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2 and not out, err
    assert err == ("error: the current folder no longer exists (it was deleted); cd to a folder "
                   "that exists\n")


@pytest.mark.parametrize("failure", [
    "MemoryError", "ImportError('libtorch_cpu.so: failed to map segment from shared object')"])
def test_too_little_memory_to_load_torch_is_one_line(failure):
    # A memory limit (ulimit -v) that Python starts under but torch does not load under; here
    # the import of torch fails as it does under such limits (the lower, the earlier).
    code = f"""if True:
        import runpy, sys
        class NoMemoryForTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise {failure}
        sys.meta_path.insert(0, NoMemoryForTorch())
        sys.argv = ["generate.py", "--device", "cpu"]
        runpy.run_path({os.path.join(ROOT, "generate.py")!r}, run_name="__main__")"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: out of memory while loading torch (a memory limit, ulimit -v, "
                             "or too little free memory); raise the limit, or free some memory\n")


def test_a_matplotlib_backend_it_lacks_changes_nothing(home, monkeypatch, tmp_path):
    monkeypatch.setenv("MPLBACKEND", "bogus")  # the pictures are files, drawn with Agg anyway
    result = run_script("explore.py", "--checkpoint", home["earlier"], "--prompt", "RO",
                        "--device", "cpu", "--out", tmp_path / "look")
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path / "look")) == ["attention.png", "embeddings.png"]


def test_bench_curve_fails_when_train_py_is_killed_before_its_deadline(monkeypatch):
    # A train.py killed by something else (the OOM killer's SIGKILL) is a failure, not the
    # curve's own deadline: the same exit code, -9, must not pass for a finished curve.
    script = ("import os, signal; print('Step 0: train loss 4.1, val loss 4.2 (exact) (1.0s)', "
              "flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    monkeypatch.setattr(bench, "launch_train_py", lambda flags: subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
    code, out, err = run_in_process(bench.main, ["curve", "--device", "cpu", "--seconds", "60"])
    assert code == 2, (out[-2000:], err)
    [line] = err.strip().splitlines()
    assert "train.py --preset cpu failed (exit -9)" in line


def test_bench_report_json_that_is_a_fifo_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "report.json")  # reading it would wait for a writer for ever
    result = run_script("bench.py", "report", "--device", "cpu", "--quick", "--json",
                        tmp_path / "report.json", timeout=60)
    expect_one_error_line(result, "is a FIFO or a socket")


@pytest.mark.parametrize("env", [
    dict(RANK="1", WORLD_SIZE="2"), dict(RANK="0", WORLD_SIZE="1"), dict(RANK="x", WORLD_SIZE="y"),
    dict(RANK="1", MASTER_ADDR="node1"),  # a job script's: else exit 2 and not a word
    dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="node1")])  # else torch's traceback
def test_rank_set_without_torchrun_is_one_line_naming_it(env):
    # A RANK left in the shell (or a launcher's part of torchrun's variables): not a traceback
    # from the process group, and said even by a process that thinks it is rank 1.
    result = subprocess.run([sys.executable, "train.py", "--device", "cpu"], cwd=ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: RANK is set, but not the MASTER_ADDR, MASTER_PORT, LOCAL_RANK and WORLD_SIZE (whole "
        "numbers) that torchrun sets; unset RANK to train in one process, or start with torchrun"]


@pytest.mark.parametrize("script, rank, argv, words", [
    (train, "00", ["--max_iters", "-1"], "--max_iters must be"),  # before the process group
    (generate, "1", ["--checkpoint", "nosuch.pt"], "nosuch.pt"),
    (explore, "1", ["--checkpoint", "nosuch.pt"], "nosuch.pt")])
def test_an_error_is_said_by_rank_0_in_any_spelling_and_by_scripts_torchrun_never_runs(
        script, rank, argv, words, monkeypatch):
    # RANK=00 is rank 0; generate.py and explore.py never run under torchrun, whatever RANK says.
    for name, value in dict(RANK=rank, LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    code, _, err = run_in_process(script.main, [*argv, "--device", "cpu"])
    assert code == 2 and err.startswith("error: ") and words in err, err


@pytest.mark.parametrize("env, message", [
    (dict(MASTER_PORT="99999"), "MASTER_PORT is 99999, but torchrun sets it from 1 to 65535"),
    (dict(RANK="3"), "RANK is 3, but torchrun sets it below WORLD_SIZE (2)"),  # waited for ever
    (dict(RANK="1", LOCAL_RANK="5"), "LOCAL_RANK is 5, but torchrun sets it at most RANK (1)"),
    (dict(MASTER_ADDR="no.such.host.invalid"),  # .invalid: a name no DNS server ever knows
     "MASTER_ADDR is 'no.such.host.invalid', a host this machine cannot find ("),
    (dict(WORLD_SIZE="\u00b2"), "RANK is set, but not the"),  # a digit to isdigit(), not int()
])
def test_torchrun_variables_that_make_no_sense_are_named_before_any_wait(env, message, home,
                                                                         isolated, monkeypatch):
    for name, value in {**dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT="29500"), **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group",  # it would wait for ever
                        lambda backend: pytest.fail("the process group was started"))
    code, _, err = run_in_process(train.main, ["--data", home["data"], *TINY_FLAGS])
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert err.endswith("; unset RANK to train in one process, or start with torchrun\n"), err


def test_bench_prepare_on_a_text_too_short_names_no_flag_bench_lacks(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    code, _, err = run_in_process(bench.main, ["prepare", "--data", short, "--device", "cpu"])
    assert code == 2 and err.startswith(f"error: {short} has 3 characters"), err
    assert "--block_size" not in err and "longer text" in err, err


def test_a_bpe_vocab_size_past_a_c_integer_is_one_line(home, home_before, isolated):
    assert train.parse_config(["--tokenizer", "bpe", "--vocab_size", str(2**63 - 1)])
    too_big = ["--tokenizer", "bpe", "--vocab_size", str(2**64 + 1)]  # past the C sizes: a crash
    for main, argv in ((train.main, ["--data", home["data"], *too_big]),
                       (bench.main, ["prepare", "--device", "cpu", "--data", home["data"], *too_big])):
        code, _, err = run_in_process(main, argv)
        assert code == 2 and err == (
            "error: --vocab_size (for --tokenizer bpe) must be at least 256, the byte tokens, and at "
            f"most 2**63 - 1, got {2**64 + 1}\n"), err
    assert_untouched(home, home_before)


def test_bench_prepare_refuses_a_text_bigger_than_the_free_disk(monkeypatch):
    # Else it writes until the disk is full, other programs' files failing with it.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, 2**20))
    code, _, err = run_in_process(bench.main, ["prepare", "--size_mb", "1", "--device", "cpu"])
    assert code == 2 and err.startswith("error: --size_mb 1 needs about 3 MiB free"), err
    assert "set TMPDIR to a folder on a bigger disk" in err, err


# --- bench.py: flags it would ignore, a full disk, a huge --seconds ----------------------------

@pytest.mark.parametrize("args, flag, what", [
    (["train", "--json", "x.json"], "--json", "train"),  # only report writes one
    (["prepare", "--data", "{data}", "--size_mb", "5"], "--size_mb", "prepare --data"),
    (["prepare", "--data", "{data}", "--text", "shakespeare"], "--text", "prepare --data"),
    (["report", "--quick", "--tokens", "5"], "--tokens", "report --quick"),  # --quick: 50
    (["generate", "--steps", "2"], "--steps", "generate"),
])
def test_bench_refuses_a_flag_its_benchmark_would_ignore(args, flag, what, home, isolated):
    code, _, err = run_in_process(bench.main, [fill_in(a, home) for a in args])
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {flag} is not used by bench.py {what}; leave it out"), line


def run_bench_in_a_small_disk(tmp_path, *args, max_file_bytes=4096):
    """bench.py in a real process, its temporary folders in tmp_path, where no file may grow
    past max_file_bytes (ulimit -f): each write fails as on a full disk, without needing one."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *map(str, args),
                             "--device", "cpu"], cwd=ROOT, preexec_fn=limit,
                            env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True,
                            text=True, timeout=300)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("mini-gpt-bench-")]
    return result


@pytest.mark.parametrize("args, written", [
    (["prepare", "--size_mb", "1", "--text", "shakespeare"], "shakespeare-1mb.txt"),
    (["report", "--quick", "--json", "{tmp}/report.json"], "start.txt"),  # the first row's text
    (["explore", "--steps", "1"], "default.pt"),  # the default model, for the server to load
])
def test_bench_on_a_full_disk_is_one_line(tmp_path, args, written):
    result = run_bench_in_a_small_disk(tmp_path, *[a.format(tmp=tmp_path) for a in args])
    expect_one_error_line(result, f"{written} (")
    assert "free some disk space, or set TMPDIR to a folder on a bigger disk" in result.stderr


def test_bench_prepare_data_never_touches_the_texts_own_token_files(tmp_path):
    # Its token files, prepared by an earlier train.py run; bench prepares the text afresh in a
    # temporary folder, so a failure there (here a full disk) cannot lose them.
    data = tmp_path / "text.txt"
    data.write_text(TINY_TEXT * 10)  # its token file, 74 KB, is far past the limit below
    stem = dataset.prepared_stem(str(data), {"tokenizer": "char"})
    dataset.prepare_if_needed([str(data)], {"tokenizer": "char"}, stem)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    bench_tmp = tmp_path / "bench-tmp"
    bench_tmp.mkdir()
    result = run_bench_in_a_small_disk(bench_tmp, "prepare", "--data", data, "--steps", "1")
    before["bench-tmp"] = None
    assert {name: None if (tmp_path / name).is_dir() else (tmp_path / name).read_bytes()
            for name in os.listdir(tmp_path)} == before
    expect_one_error_line(result, f"cannot write the token file {bench_tmp}")


def test_bench_prepare_data_where_links_are_not_allowed_is_one_line(tmp_path, monkeypatch):
    def no_links(source, link):  # as on Windows without Developer Mode
        raise OSError(1, "A required privilege is not held by the client")

    data = tmp_path / "text.txt"
    data.write_text(TINY_TEXT)
    monkeypatch.setattr(os, "symlink", no_links)
    code, out, err = run_in_process(bench.main, ["prepare", "--data", data, "--device", "cpu"])
    assert code == 2 and err.startswith(f"error: cannot link {data} into ") and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["text.txt"]


def test_bench_report_json_on_a_full_disk_keeps_the_earlier_one(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "in_fresh_process", lambda function, *args: dict(
        measurement=function.__name__, result="1 tokens/s", details="made up"))
    monkeypatch.setattr(bench, "time_to_target_row", lambda device, quick: dict(
        measurement="time", result="2.0 s", details="made up"))

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    json_path = tmp_path / "report.json"
    json_path.write_text('{"environment": {}, "rows": []}')  # an earlier report
    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    code, out, err = run_in_process(bench.main, ["report", "--device", "cpu", "--quick",
                                                 "--json", json_path])
    assert code == 2 and "| time | 2.0 s | made up |" in out, err  # the table, printed
    [line] = err.strip().splitlines()
    assert line == (f"error: cannot write {json_path} (No space left on device); the table is "
                    f"above; free some disk space and run again, or pick another --json")
    assert os.listdir(tmp_path) == ["report.json"]
    assert json_path.read_bytes() == b'{"environment": {}, "rows": []}'


def test_bench_curve_takes_a_huge_seconds_as_no_deadline(monkeypatch):
    # A budget past threading's limit (292 years) was a thread's traceback, then no deadline.
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    script = ("import time; print('Step 0: train loss 4.1, val loss 4.2 (exact) (1.0s)', "
              "flush=True); time.sleep(0.5)")
    monkeypatch.setattr(bench, "launch_train_py", lambda flags: subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
    code, out, err = run_in_process(bench.main, ["curve", "--device", "cpu", "--seconds", HUGE])
    assert code == 0 and not err and not thread_errors, (err, thread_errors)
    assert "| --preset cpu | 4.2000 | 1.0 s | 0 |" in out


def test_under_torchrun_a_rank_above_0_waits_for_rank_0_to_say_the_error(monkeypatch, capsys):
    """torchrun stops every rank once one ends: a rank above 0 that met the error first used to
    end at once, and torchrun stopped rank 0 before it printed, so the run ended with no reason
    given. Now it waits (torchrun stops it there, quietly), and prints an error rank 0 did not
    meet after the wait."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(utils, "torchrun_problem", lambda: None)

    def refuse():
        raise utils.UsageError("n_embd (384) must be divisible by n_head (5)")

    waits = []
    monkeypatch.setattr(utils.time, "sleep", waits.append)  # rank 0 never stops this one
    with pytest.raises(SystemExit) as exit_:
        utils.run_main(refuse, torchrun=True)
    assert (exit_.value.code, waits) == (2, [utils.RANK_ERROR_WAIT]) and waits[0] >= 5
    assert capsys.readouterr().err == "error: n_embd (384) must be divisible by n_head (5)\n"

    def stopped_by_torchrun(seconds):
        raise KeyboardInterrupt  # torchrun's SIGTERM, once rank 0 has printed and ended

    monkeypatch.setattr(utils.time, "sleep", stopped_by_torchrun)
    with pytest.raises(SystemExit) as exit_:
        utils.run_main(refuse, torchrun=True)
    assert exit_.value.code == 130 and capsys.readouterr().err == ""
