"""Experiment tracking for train.py: a JSONL log and a loss-curve PNG beside the checkpoint,
and Weights & Biases on request (--wandb). matplotlib and wandb are optional extras, imported
only when used."""

import importlib.util
import json
import os
from dataclasses import asdict

from utils import UsageError


def metrics_recorder(config):
    """Return record(dict): appends to <checkpoint>.metrics.jsonl and logs to W&B with --wandb;
    record(dict, draw_curve=True) also draws <checkpoint>.loss.png (if matplotlib is installed).

    The curve is drawn once, after the last evaluation: drawing takes ~0.5 s, which at every
    evaluation would slow short runs measurably."""
    stem = os.path.splitext(config.checkpoint)[0]
    jsonl_path, png_path = f"{stem}.metrics.jsonl", f"{stem}.loss.png"
    if not config.resume and os.path.exists(jsonl_path):
        os.remove(jsonl_path)  # a fresh run overwrites the checkpoint, so its log starts anew
    can_draw = importlib.util.find_spec("matplotlib") is not None  # imported only to draw
    if not can_draw:
        print("Note: matplotlib is not installed, so no loss-curve PNG (pip install matplotlib)")
    wandb_run = start_wandb(config) if config.wandb else None

    def record(metrics, draw_curve=False):
        with open(jsonl_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if wandb_run is not None:
            if "sample" in metrics:  # the latest sample, on the run's page
                wandb_run.summary["sample"] = metrics["sample"]
            numbers = {k: v for k, v in metrics.items() if k not in ("step", "sample")}
            if numbers:
                wandb_run.log(numbers, step=metrics["step"])
            else:  # only a sample: the one printed after training, the run's last record
                wandb_run.finish()
        if can_draw and draw_curve:
            plot_losses(jsonl_path, png_path)

    return record


def start_wandb(config):
    try:
        import wandb  # optional extra, needed only for --wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb")
    return wandb.init(project=config.wandb_project, config=asdict(config))


def plot_losses(jsonl_path, png_path):
    import matplotlib
    matplotlib.use("Agg")  # draw to files; no window
    import matplotlib.pyplot as plt
    with open(jsonl_path) as f:
        rows = [json.loads(line) for line in f]
    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows if "loss" in r]
    axes.plot(steps, [r["loss"] for r in rows if "loss" in r], alpha=0.3, label="batch loss")
    evals = [r for r in rows if "val_loss" in r]
    axes.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train loss")
    axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per token)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
