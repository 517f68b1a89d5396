"""Execute every chapter notebook in place, so that the committed notebooks show their plots and checks on the web.

    make notebooks                                  # or: python bench/notebooks.py (about 2.5 minutes on 2 cores)
    python bench/notebooks.py 05_pipeline/pipeline.ipynb

Each notebook runs top to bottom in its own folder, as a reader runs it; its outputs are saved in it, with the
digest of the sources they were made from in its metadata (common.notebook.source_digest), so that the tests
notice a cell edited without re-running. Images stay under IMAGE_KB and notebooks under NOTEBOOK_KB.
"""
import argparse
import base64
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.notebook import source_digest  # noqa: E402

IMAGE_KB, NOTEBOOK_KB = 150, 2048
NOTEBOOKS = sorted(ROOT.glob("[0-9][0-9]_*/*.ipynb"))


def images(nb):
    """(cell index, bytes) of every PNG output."""
    return [(i, len(base64.b64decode(out["data"]["image/png"]))) for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" for out in cell.outputs if "image/png" in out.get("data", {})]


def execute(path):
    """Run the notebook at `path` and save it with its outputs and its sources' digest; returns what it weighs."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, record_timing=False,      # no timestamps to diff
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata["numpitron"] = {"source_sha256": source_digest(nb)}
    nbformat.write(nb, path)
    return images(nb), path.stat().st_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: every chapter's)")
    args = parser.parse_args(argv)
    too_big = []
    for path in [p.resolve() for p in args.notebooks] or NOTEBOOKS:
        t0 = time.perf_counter()
        pngs, size = execute(path)
        name = path.relative_to(ROOT)
        print(f"{name}: {time.perf_counter() - t0:.0f} s, {len(pngs)} images, largest "
              f"{max((b for _, b in pngs), default=0) // 1024} KiB, {size // 1024} KiB in all", flush=True)
        too_big += [f"{name} cell {i}: {b // 1024} KiB" for i, b in pngs if b > IMAGE_KB * 1024]
        too_big += [f"{name}: {size // 1024} KiB" for _ in [0] if size > NOTEBOOK_KB * 1024]
    if too_big:
        raise SystemExit("over the size budget (images 150 KiB, notebooks 2 MiB): " + "; ".join(too_big))


if __name__ == "__main__":
    main()
