"""Every chapter notebook runs top to bottom without an error, takes its helpers from common/notebook.py, and is
committed executed (`make notebooks`): its outputs made from the sources it holds, its loss curves drawn, light
enough to read on the web."""
import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from common.notebook import source_digest

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


def stale(nb):
    """Why a committed notebook's outputs are not those of its cells as they read now ("" if they are)."""
    recorded = nb.metadata.get("numpitron", {}).get("source_sha256")
    if recorded != source_digest(nb):
        return "its cells changed since it was executed" if recorded else "it was never executed by make notebooks"
    unrun = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.execution_count is None]
    return f"cells {unrun} have no outputs" if unrun else ""


def test_committed_notebooks_carry_the_outputs_of_the_sources_they_hold():
    assert NOTEBOOKS, f"no notebooks found under {ROOT}/[0-9][0-9]_*/"
    found = {str(path.relative_to(ROOT)): stale(nbformat.read(path, as_version=4)) for path in NOTEBOOKS}
    assert not any(found.values()), "run `make notebooks`: " + "; ".join(f"{p}: {why}" for p, why in found.items()
                                                                         if why)


def test_a_cell_edited_without_running_the_notebook_again_is_caught():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    assert stale(nb) == ""
    nb.cells[-1].source += "\n"                              # one character more, nothing run
    assert stale(nb) == "its cells changed since it was executed"


def pngs(cell):
    return [base64.b64decode(out["data"]["image/png"]) for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_the_loss_curves_show_on_the_web_and_the_notebook_stays_light(path):
    nb = nbformat.read(path, as_version=4)
    curves = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and "plot_losses(" in cell.source]
    assert curves, f"{path.name} draws no loss curve"
    assert all(pngs(nb.cells[i]) for i in curves), f"loss-curve cells without a plot: {curves}"
    heavy = [(i, len(png) // 1024) for i, cell in enumerate(nb.cells) for png in pngs(cell) if len(png) > 150 * 1024]
    assert not heavy, f"images over 150 KiB (cell, KiB): {heavy}"
    assert path.stat().st_size < 2 * 2 ** 20, f"{path.name} weighs {path.stat().st_size // 1024} KiB"


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
