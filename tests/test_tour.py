"""docs/tour.ipynb: committed with its outputs (so it reads on GitHub), and a fresh copy without them runs
top to bottom in a Jupyter kernel; its cells assert that each hand computation equals fst's function."""
import nbformat
from nbclient import NotebookClient

from conftest import ROOT

TOUR = ROOT / "docs" / "tour.ipynb"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_tour_is_committed_with_its_outputs():
    cells = code_cells(nbformat.read(TOUR, as_version=4))
    assert cells and all(c.outputs for c in cells)
    assert not any(o.output_type == "error" for c in cells for o in c.outputs)


def test_tour_runs_from_a_fresh_copy(monkeypatch):
    monkeypatch.delenv("FST_TOUR_REAL_MODEL", raising=False)  # the tiny model: seconds, not minutes
    nb = nbformat.read(TOUR, as_version=4)
    for cell in code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails (its asserts included).
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(TOUR.parent)}}).execute()
    cells = code_cells(nb)
    printed = "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    assert "fst.policy_loss" in printed and "gradient problems: none" in printed
    assert "image/png" in cells[-1].outputs[0].data  # the lineage plot
