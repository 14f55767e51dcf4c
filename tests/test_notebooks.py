"""The notebooks: paired with their py:percent twins, committed with outputs, and they run."""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_seven_notebooks():
    assert [p.stem for p in SOURCES] == [
        "01_quickstart",
        "02_m_sharpness",
        "03_label_noise",
        "04_sharpness_analysis",
        "05_flax",
        "06_efficient_sam",
        "07_language_model",
    ]


@pytest.mark.parametrize("py", SOURCES, ids=[p.stem for p in SOURCES])
def test_pair_is_in_sync_and_committed_with_outputs(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} is missing: run python notebooks/execute.py"
    twin, notebook = jupytext.read(py), nbformat.read(ipynb, as_version=4)
    assert _cells(twin) == _cells(notebook), (
        f"{ipynb.name} and {py.name} differ: run python notebooks/execute.py"
    )
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), (
        f"{ipynb.name} was not executed"
    )
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert any(o.get("data", {}).get("image/png") for c in code for o in c.outputs), "no plot saved"


@pytest.mark.slow
@pytest.mark.parametrize("py", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_runs_in_fast_mode(py, monkeypatch, tmp_path):
    # A real kernel, with the notebook's environment variable for small grids.
    monkeypatch.setenv("SAM_OPTAX_FAST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = jupytext.read(py)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)
