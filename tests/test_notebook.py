"""The results notebook runs top to bottom against a populated database, so it cannot rot."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "results.ipynb"


def test_results_notebook_executes(pipeline, evaluated, subprocess_env, tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith(("DJ_", "NEUREG_"))]:
        monkeypatch.delenv(name)
    for name, value in subprocess_env.items():
        if name.startswith(("DJ_", "NEUREG_")):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEUREG_FIGURES", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(str(o) for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "Traceback" not in outputs
    assert re.search(r"\| None( \([^|]*\))? \|", outputs) and "Neural (model)" in outputs  # other tests' None runs
    assert (tmp_path / "robustness_noise.png").exists() and (tmp_path / "robustness_perturbation.png").exists()
