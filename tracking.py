"""Experiment tracking for train.py: a JSONL log and a loss-curve PNG beside the checkpoint,
and Weights & Biases on request (--wandb). matplotlib and wandb are optional extras, imported
only when used."""

import contextlib
import importlib.util
import json
import math
import os
import re
from dataclasses import asdict

from tqdm import tqdm

from checkpoint import atomic_write, is_checkpoint, parse_json, png_tagged
from utils import UsageError, regular_file_problem


def log_paths(checkpoint):
    """(metrics log, loss-curve PNG) beside a checkpoint, named after its whole name, so that
    run.pt, run.pth and run never share."""
    return f"{checkpoint}.metrics.jsonl", f"{checkpoint}.loss.png"


CURVE_TAG = {"Software": "Mini-GPT train.py"}  # in each loss curve: how a later run knows it


def check_side_files(checkpoint):
    """Before any work: refuse a file at the metrics log's or loss curve's name unless train.py
    wrote it, whether or not a checkpoint is beside it (a run stopped before its first save
    leaves them alone). A folder there only fails to write, with a note."""
    for path in log_paths(checkpoint):  # the log first: the curve's test may read it
        problem = regular_file_problem(path)
        if problem not in ("does not exist", "is a folder") and (problem or not wrote(path)):
            raise UsageError(f"{path} {problem or 'is a file that train.py did not write'}; "
                             f"pick another --checkpoint, or move that file away")


# How train.py's log begins: json.dumps of dict(step=..., then a loss or the sample).
ROW_START = re.compile(rb'\{"step": \d+, "(loss|train_loss|sample)": ')


def wrote(side_file):
    """Whether train.py wrote this metrics log (empty, or with train.py's rows) or loss curve:
    one with its tag, or, drawn before curves were tagged, one with train.py's rows or
    checkpoint beside it (asked last: it takes loading the checkpoint). An empty log beside a
    picture says nothing about the picture."""
    if side_file.endswith(".png"):
        checkpoint = side_file.removesuffix(".loss.png")
        return png_tagged(side_file, CURVE_TAG) or has_our_rows(log_paths(checkpoint)[0]) or \
            is_checkpoint(checkpoint)
    return os.path.getsize(side_file) == 0 or has_our_rows(side_file)


def has_our_rows(log):
    """Whether the log's first row is train.py's, known by its first bytes (a row holding a long
    sample can be megabytes)."""
    with contextlib.suppress(OSError), open(log, "rb") as f:
        return bool(ROW_START.match(f.read(64)))
    return False


def metrics_recorder(config, resumed=None):
    """Return record(dict): appends to <checkpoint>.metrics.jsonl and logs to W&B with --wandb;
    record(dict, draw_curve=True) also draws <checkpoint>.loss.png, once, after the last
    evaluation (at every one it would slow short runs measurably).

    An earlier run's log is replaced only with its checkpoint, at this run's first save
    (record(dict, saved=True)): until then the rows are held back in memory, so a run stopped
    early (a mistyped flag, Ctrl-C) leaves it intact. A resumed run (resumed: the checkpoint's
    path and step) starts from that run's rows up to its step: not another run's log of the
    same name, nor the steps a killed run logged after its last save, which this run trains
    again. A file or W&B that fails (a full disk, no network) is a note, once: they are a
    convenience, and training goes on."""
    jsonl_path, png_path = log_paths(config.checkpoint)
    held_back = None  # None: append each row as it comes
    if resumed:
        held_back = logged_rows(log_paths(resumed[0])[0], resumed[1])
    elif os.path.exists(jsonl_path):
        held_back = []
    can_draw = matplotlib_or_note("loss-curve PNG")
    wandb_run = start_wandb(config) if config.wandb else None
    failed = set()  # "log", "png", "W&B": what failed once and is not tried again

    def attempt(name, what, errors, action):
        if name in failed:
            return
        try:
            action()
        except errors as err:  # what each may fail with; any other error is a bug: it shows
            failed.add(name)
            reason = getattr(err, "strerror", None) or f"{type(err).__name__}: {str(err)[:100]}"
            tqdm.write(f"Note: {what} failed ({reason}); training goes on without it")

    def record(metrics, draw_curve=False, saved=False):
        nonlocal held_back
        if held_back is not None and not saved:  # the earlier run's log is still the one
            held_back.append(metrics)
        else:
            attempt("log", f"writing the metrics log {jsonl_path}", OSError,
                    lambda: write_rows(jsonl_path, [metrics]) if held_back is None else
                    atomic_write(jsonl_path, lambda tmp: write_rows(tmp, [*held_back, metrics])))
            held_back = None
        if wandb_run is not None:
            attempt("W&B", "logging to W&B", Exception,  # W&B's own: network, quota, ...
                    lambda: log_to_wandb(wandb_run, metrics))
        if can_draw and draw_curve and held_back is None and "log" not in failed:
            attempt("png", f"drawing the loss curve {png_path}", Exception,  # matplotlib's too
                    lambda: plot_losses(jsonl_path, png_path))

    return record


def write_rows(path, rows):
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def logged_rows(path, last_step):
    """The rows of the log at path up to last_step; none if it cannot be read or is not a
    regular file (a FIFO would wait for ever). A line that a killed run cut in half is left
    out, and so is a row whose step is not a number."""
    rows = []
    if not regular_file_problem(path):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            rows = [parse_json(line) for line in f]
    return [row for row in rows if isinstance(row, dict)
            and isinstance(row.get("step", 0), (int, float)) and row.get("step", 0) <= last_step]


def log_to_wandb(wandb_run, metrics):
    if "sample" in metrics:  # the latest sample, on the run's page
        wandb_run.summary["sample"] = metrics["sample"]
    numbers = {k: v for k, v in metrics.items() if k not in ("step", "sample")}
    if numbers:
        wandb_run.log(numbers, step=metrics["step"])
    else:  # only a sample: the one printed after training, the run's last record
        wandb_run.finish()


def start_wandb(config):
    try:
        import wandb  # optional extra, needed only for --wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb") from None
    try:
        return wandb.init(project=config.wandb_project, config=asdict(config))
    except Exception as err:  # not logged in, offline, ...: train anyway
        print(f"Note: W&B did not start ({type(err).__name__}: {str(err)[:100]}); training "
              f"goes on without it")
        return None


def matplotlib_or_note(what):
    """Whether matplotlib (optional, imported only to draw) is installed; if not, says so."""
    found = importlib.util.find_spec("matplotlib") is not None
    if not found:
        print(f"Note: matplotlib is not installed, so no {what} (pip install matplotlib)")
    return found


def pyplot():
    """matplotlib.pyplot, drawing to files (no window): the loss curve, explore.py's pictures."""
    os.environ.pop("MPLBACKEND", None)  # Agg whatever it says: a backend it lacks fails at import
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(jsonl_path, png_path):
    plt = pyplot()
    rows = logged_rows(jsonl_path, math.inf)
    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows if "loss" in r]
    axes.plot(steps, [r["loss"] for r in rows if "loss" in r], alpha=0.3, label="batch loss")
    evals = [r for r in rows if "val_loss" in r]
    eval_steps = [r["step"] for r in evals]
    axes.plot(eval_steps, [r["train_loss"] for r in evals], "o-", label="train loss")
    axes.plot(eval_steps, [r["val_loss"] for r in evals], "o-", label="val loss")
    axes.set(xlabel="step", ylabel="cross-entropy (nats per token)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    save_png(figure, png_path, CURVE_TAG)
    plt.close(figure)


def save_png(figure, path, tag):
    """Save figure as a PNG carrying tag (see checkpoint.png_tagged), whole or not at all: a
    new file renamed into place, so a link there is replaced, never written through."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, metadata=tag))
