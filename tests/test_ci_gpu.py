""".ci/gpu's tables, from train.py's eval lines: here a stand-in `python` prints them (no GPU)."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")

DIVERGED = """Step 0: train loss 4.1869, val loss 4.1911 (exact), val bpc 6.0464 (5.5s)
Step 250: train loss 2.1000, val loss 2.2000 (exact), val bpc 3.1000 (20.5s) new best
Step 500: train loss nan, val loss nan (exact), val bpc nan (40.5s)
error: the loss became NaN or infinite
"""


def ci_gpu_table(tmp_path, train_output, *stage, **settings):
    """$OUT/table.md after `.ci/gpu STAGE`, each train.py run printing train_output."""
    (tmp_path / "bin").mkdir(parents=True)
    (tmp_path / "train_output.txt").write_text(train_output)
    python = tmp_path / "bin" / "python"
    python.write_text(f"#!/bin/sh\ncat '{tmp_path / 'train_output.txt'}'\n")
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}",
           "OUT": str(tmp_path / "out"), "DEVICE": "cpu", **settings}
    subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu"), *stage], env=env, check=True,
                   capture_output=True, timeout=60, cwd=tmp_path)
    return (tmp_path / "out" / "table.md").read_text()


def test_a_recipe_whose_loss_became_nan_has_not_reached_the_target(tmp_path):
    (tmp_path / "recipes.txt").write_text("--preset fast  # the one recipe\n")
    table = ci_gpu_table(tmp_path, DIVERGED, "sweep", str(tmp_path / "recipes.txt"))
    assert table.splitlines()[-1] == ("| `--preset fast` | not reached | 2.2000 at step 250 | "
                                      "nan at step 500, 40.5 s |")


def test_the_default_run_s_table_says_its_own_time_limit(tmp_path):
    table = ci_gpu_table(tmp_path, DIVERGED, "default")
    assert "limit 400 s a run" in table


def test_the_default_recipes_keep_the_default_run_s_fixed_settings(tmp_path):
    """`sweep default` tries only what the default run may change: 5000 steps, dropout 0.2,
    the seed's model and an evaluation every 500 stay, under the default run's time limit."""
    table = ci_gpu_table(tmp_path, DIVERGED, "sweep", "default")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 3 and "limit 400 s a run" in table
    for name in ("max_iters", "dropout", "n_embd", "n_layer", "n_head", "block_size",
                 "eval_interval", "preset"):
        assert not any(f"--{name}" in row for row in rows), name


def test_a_recipe_file_is_read_from_where_the_user_is(tmp_path):
    (tmp_path / "recipes.txt").write_text("--preset fast\n")
    table = ci_gpu_table(tmp_path, DIVERGED, "sweep", "recipes.txt")  # relative to the cwd
    assert table.splitlines()[-1].startswith("| `--preset fast` | not reached |")


def test_a_recipe_file_that_is_not_there_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu"), "sweep", "nothere.txt"],
                            env={**os.environ, "OUT": str(tmp_path / "out")}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.splitlines()[-1] == (
        "error: cannot read the recipe file nothere.txt; pass fast, default, or a file of train.py "
        "flags, one run a line")


def test_a_time_limit_the_user_sets_holds_for_the_default_run_too(tmp_path, monkeypatch):
    monkeypatch.setenv("LIMIT", "7")  # e.g. DEVICE=cpu LIMIT=5: trying the script, not training
    assert "limit 7 s a run" in ci_gpu_table(tmp_path, DIVERGED, "sweep", "default")


def recipe_rows(table):
    return [line for line in table.splitlines() if line.startswith("| `")]


def test_all_runs_every_stage_and_skips_what_its_budget_leaves_no_time_for(tmp_path):
    table = ci_gpu_table(tmp_path / "ample", DIVERGED, "all")
    assert "Recipes: fast" in table and "Recipes: default" in table
    assert len(recipe_rows(table)) >= 6 and "skipped" not in table
    assert {"generate.log", "cuda-tests.log"} <= set(os.listdir(tmp_path / "ample" / "out"))
    spent = recipe_rows(ci_gpu_table(tmp_path / "spent", DIVERGED, "all", BUDGET="5"))
    assert len(spent) == len(recipe_rows(table))
    assert all(row.endswith("| skipped: the 5 s budget is spent | | |") for row in spent)
