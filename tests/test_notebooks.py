"""Every chapter notebook runs top to bottom without an error, takes its helpers from common/notebook.py, and is
committed without outputs."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("[0-9][0-9]_*/*.ipynb"))
META = ROOT / "data" / "shakespeare_char" / "meta.json"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_notebook_executes_every_cell_without_error(path):
    # the notebooks train on the real corpus; a missing dataset must fail loudly, never skip
    assert META.exists(), f"{META} is missing: run `python data/prepare.py` first (`make test` does it)"
    nb = nbformat.read(path, as_version=4)
    # the kernel inherits this process's environment; the notebook's folder is its working directory
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()                                # raises CellExecutionError naming the failing cell


def test_committed_notebooks_have_no_outputs_or_execution_counts():
    assert NOTEBOOKS, f"no notebooks found under {ROOT}/[0-9][0-9]_*/"
    dirty = []
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{path.relative_to(ROOT)} cell {i}")
    assert not dirty, ("notebooks saved with outputs (clear them with `jupyter nbconvert --clear-output "
                       f"--inplace <notebook>`): {', '.join(dirty)}")


# what common/notebook.py provides, and the switch that importing common/comm.py no longer needs
OWN_COPIES = ("def first_line(", "def show_diff(", "def launch(", "MPIEXEC", "ENV = ", "mpi4py.rc")


def test_notebooks_use_the_shared_helpers_instead_of_their_own_copies():
    copies = []
    for path in NOTEBOOKS:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            found = [text for text in OWN_COPIES if cell.cell_type == "code" and text in cell.source]
            if found:
                copies.append(f"{path.relative_to(ROOT)} cell {i}: {', '.join(found)}")
    assert not copies, "import these from common.notebook instead: " + "; ".join(copies)
