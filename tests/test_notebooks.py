"""The notebooks: each ``notebooks/*.py`` (jupytext percent format) is paired with an output-free ``.ipynb``
holding the same cells, and executes top to bottom in smoke mode (micro zoo, a few steps)."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_there_are_three_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_priors", "02_svi", "03_run_posteriors"]


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_is_in_sync_and_has_no_outputs(source):
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"{paired} is missing; run `jupytext --sync {source}`"
    notebook = nbformat.read(paired, as_version=4)
    nbformat.validate(notebook)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{paired} cell {i} has outputs"
    text = jupytext.read(source)
    cells = [(c.cell_type, c.source) for c in notebook.cells]
    assert [(c.cell_type, c.source) for c in text.cells] == cells, (
        f"{source} and {paired} differ; run `jupytext --sync {source}`")


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_smoke_mode(source, micro_zoo, monkeypatch):
    monkeypatch.setenv("VTVC_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("VTVC_RUN_DIR", raising=False)
    notebook = jupytext.read(source)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(source.parent)}})
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{source.name} drew no figure"
