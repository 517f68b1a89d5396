"""What the chapter notebooks share: the repository's files and diffs shown, the dataset checked, scripts launched.

Nothing here imports MPI: a notebook runs train.py and verify.py as subprocesses, under mpiexec when asked.
"""
import ast
import difflib
import hashlib
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_line(doc):
    """The first line of a docstring, or "" when there is none."""
    return doc.splitlines()[0] if doc else ""


def show_files(*folders):
    """Print each .py file of the folders (relative to ROOT) with the first line of its docstring."""
    paths = [path for folder in folders for path in sorted((ROOT / folder).glob("*.py"))]
    names = [str(path.relative_to(ROOT)) for path in paths]
    width = max(map(len, names))
    for name, path in zip(names, paths):
        # parsed, not imported: nothing in the file runs
        print(f"{name:<{width}} {first_line(ast.get_docstring(ast.parse(path.read_text())))}")


def _source(what):
    """(text, name) of a file (a path relative to ROOT) or of a function."""
    if isinstance(what, (str, Path)):
        return (ROOT / what).read_text(), str(what)
    path = Path(inspect.getsourcefile(what)).resolve().relative_to(ROOT)
    return inspect.getsource(what), f"{path}: {what.__name__}"


def show_diff(old, new, context=3):
    """Print the unified diff from `old` to `new`: two files (paths relative to ROOT) or two functions; computed
    now, from the code as it is."""
    (a, a_name), (b, b_name) = _source(old), _source(new)
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), a_name, b_name,
                                 n=context)
    print("".join(lines) or f"{a_name} and {b_name} are identical")


def data_dir():
    """data/shakespeare_char, which every training run reads; raises if it has not been prepared."""
    data = ROOT / "data" / "shakespeare_char"
    if not (data / "meta.json").exists():
        raise FileNotFoundError(f"{data / 'meta.json'} does not exist: prepare the dataset first by running "
                                f"`python data/prepare.py` in {ROOT}")
    return data


def mpiexec():
    """The mpiexec beside this Python (the mpich wheel puts it in the virtualenv), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("no mpiexec: install the project (pip install -e '.[test]'), whose mpich wheel "
                                "provides it")
    return found


def launch(*args, ranks=None, quiet=False, timeout=300, check=True):
    """Run `[mpiexec -n ranks] python args` from ROOT; print (unless quiet) and return its output, raise if it
    fails (unless not `check`) or runs longer than `timeout` seconds."""
    cmd = ([mpiexec(), "-n", str(ranks)] if ranks else []) + [sys.executable, *map(str, args)]
    # this process's environment as it is, with no thread variables added: each rank sizes its own BLAS pool
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if not quiet:
        print(run.stdout, end="")
    if check and run.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with status {run.returncode}:\n{run.stdout}\n{run.stderr}")
    return run.stdout


def source_digest(nb):
    """sha256 of a notebook's cells as written (type and source of each, in order): what its committed outputs
    were made from, recorded in its metadata by `make notebooks` (bench/notebooks.py)."""
    cells = [(cell.cell_type, cell.source) for cell in nb.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()
