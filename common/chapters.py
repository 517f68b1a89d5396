"""Import a module from a chapter folder. The folders start with digits, so `import 02_tensor_parallel.x` is a
SyntaxError; every later chapter reuses earlier code through this one helper instead of copying it. A chapter is
a folder whose name starts with two digits and an underscore; nothing in common names one."""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_chapter(dotted):
    """import_chapter("01_single_core.train") -> that module (the repository root goes on sys.path once)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(dotted)


def chapters():
    """The chapter folders' names, in reading order."""
    return sorted(path.name for path in ROOT.glob("[0-9][0-9]_*") if (path / "train.py").exists())


def offering(name):
    """The chapters whose train.py implements the setting `name` (lists it in FLAGS: a parallel one, or the
    experts'), in reading order."""
    return [chapter for chapter in chapters() if name in getattr(import_chapter(f"{chapter}.train"), "FLAGS", ())]


def patched(path, patch, module, args=()):
    """Write to `path` a script that runs `patch` (Python lines, with import_chapter in scope), then `module`'s
    main(args), and return the path: how a check is shown to fail, and a real bug replayed, on this code."""
    path = Path(path)
    path.write_text("from common.chapters import import_chapter\n"
                    f"{patch}\n"
                    f"raise SystemExit(import_chapter({module!r}).main({[str(a) for a in args]!r}))\n")
    return path
