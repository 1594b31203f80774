"""notebooks/mini_gpt.ipynb runs top to bottom, as a learner would run it (in about two minutes on
2 CPU cores), and shows what it promises: the tree, a trained model's loss curve, a sample, an
attention map and the next-character table."""

import json
import os

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "mini_gpt.ipynb")


def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt "
                                   "(nbclient, ipykernel) to run the notebook")
    nbformat = pytest.importorskip("nbformat")
    if not os.path.exists(os.path.join(ROOT, "data", "input.txt")):
        pytest.skip("data/input.txt (Tiny Shakespeare) is not there; the notebook trains on it")
    monkeypatch.setenv("MINI_GPT_NOTEBOOK_CHECKPOINT", str(tmp_path / "notebook.pt"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    outputs = [cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"]
    text = ["".join(o.get("text", "") for o in cell_outputs) for cell_outputs in outputs]
    images = [sum("image/png" in o.get("data", {}) for o in cell_outputs) for cell_outputs in outputs]
    assert "working in " + ROOT in text[0]
    assert "total of the five top-level boxes: 10,788,929 parameters" in text[1]
    assert "Step 200: train loss" in text[2] and (tmp_path / "notebook.pt").exists()
    assert images[3] == 1  # the loss curve
    assert text[4].startswith("GENERATING TEXT") and "ROMEO:" in text[4]
    assert "top 5 guesses" in text[5] and images[5] == 1  # the table, one attention map
    # The notebook is committed without outputs, so that its diffs stay readable.
    with open(NOTEBOOK) as f:
        assert all(not cell.get("outputs") for cell in json.load(f)["cells"])
