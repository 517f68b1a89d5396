"""Each chapter's default command: the memory its start-up estimate gives rank 0 beside the peak rank 0 measured.

    python bench/memory.py                     # every chapter, 30 steps each (the peak is reached in the first)
    python bench/memory.py --steps 100 --only 06_3d

The estimate is the banner's (`memory: ~...`), the peak the last line's (the kernel's high-water mark of the
rank's resident pages); both are parsed from the runs' output.
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.notebook import launch  # noqa: E402

COMMANDS = {                                 # chapter: (ranks, flags), as each README's first command runs it
    "01_single_core": (1, []),
    "02_tensor_parallel": (2, []),
    "03_data_parallel": (2, []),
    "04_zero": (2, ["--zero-stage", 2, "--grad-accum", 2]),
    "05_pipeline": (2, ["--schedule", "1f1b"]),
    "06_3d": (8, ["--tp", 2, "--pp", 2, "--dp", 2]),
}
UNITS = {"MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}


def mib(text):
    value, unit = text.split()
    return float(value) * UNITS[unit] / 2 ** 20


def measure(chapter, steps, work):
    """(estimated MiB, measured peak MiB, the estimate's parts) of rank 0 in `chapter`'s default run."""
    ranks, flags = COMMANDS[chapter]
    output = launch(f"{chapter}/train.py", *flags, "--max-iters", steps, "--eval-interval", steps,
                    "--out-dir", work / chapter, ranks=ranks, quiet=True)
    banner = next(line for line in output.splitlines() if line.startswith("memory: ~"))
    summary = next(line for line in output.splitlines() if line.startswith("memory: peak"))
    estimated = mib(re.search(r"~([\d.]+ \w+)", banner).group(1))
    peak = mib(re.search(r"peak ([\d.]+ \w+)", summary).group(1))
    return estimated, peak, re.search(r"\((.*?)\)", banner).group(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps each run trains (default: 30)")
    parser.add_argument("--only", nargs="*", default=list(COMMANDS), help="chapters to run (default: all)")
    args = parser.parse_args(argv)
    print("| chapter | command | estimated | measured peak | measured / estimated |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for chapter in args.only:
            ranks, flags = COMMANDS[chapter]
            estimated, peak, parts = measure(chapter, args.steps, Path(tmp))
            command = (f"mpirun -n {ranks} " if ranks > 1 else "") + f"python {chapter}/train.py " + \
                " ".join(map(str, flags))
            print(f"| {chapter} | `{command.strip()}` | {estimated:.1f} MiB | {peak:.1f} MiB | "
                  f"{peak / estimated:.2f} |", flush=True)
            print(f"|  | {parts} | | | |", flush=True)


if __name__ == "__main__":
    main()
