"""Time the README's parallel commands as a reader runs them (no thread variables) beside the same commands
with one BLAS thread per rank set by hand: the defaults should cost nothing (ratio <= 1.15).

    python bench/thread_defaults.py                        # 3 rounds, alternating, medians with the spread
    python bench/thread_defaults.py --rounds 5 --old-default   # also one round of every rank on every core

Each run trains the default model for --steps steps (no evaluation on the way) and is timed from its own
metrics.jsonl: the median ms/step after the first --skip steps. With --old-default, one more run per command
gives every rank as many BLAS threads as the host has cores, as OpenBLAS does when nobody sizes its pool.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.notebook import mpiexec  # noqa: E402
from common.threads import ENV_VARS as THREAD_VARS  # noqa: E402

COMMANDS = {"mpirun -n 2 python 02_tensor_parallel/train.py": (2, ["02_tensor_parallel/train.py"]),
            "mpirun -n 4 python 06_3d/train.py --tp 2 --pp 2": (4, ["06_3d/train.py", "--tp", "2", "--pp", "2"])}


def environment(threads):
    """A reader's environment (threads None) or one with every thread variable set to `threads`."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return env if threads is None else {**env, **{var: str(threads) for var in THREAD_VARS}}


def ms_per_step(ranks, args, threads, steps, skip, data_dir):
    with tempfile.TemporaryDirectory() as out:
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, *args, "--max-iters", str(steps), "--eval-interval",
               str(10 * steps), "--eval-iters", "1", "--log-interval", str(steps), "--out-dir", out,
               "--data-dir", str(data_dir)]
        result = subprocess.run(cmd, cwd=ROOT, env=environment(threads), capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stderr}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["ms"] for r in records if "ms" in r and r["step"] >= skip)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each setting (default: 3)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: 30)")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the median (default: 5)")
    parser.add_argument("--old-default", action="store_true",
                        help="also time one run with every rank on every core (slow: seconds per step)")
    parser.add_argument("--data-dir", default="data/shakespeare_char", help="prepared dataset (data/prepare.py)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    data_dir = ROOT / args.data_dir                      # the runs start in the repository root
    if not (data_dir / "meta.json").exists():
        raise SystemExit(f"error: {data_dir} has no prepared data; run python data/prepare.py first")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    figures = {}
    for label, (ranks, script) in COMMANDS.items():
        times = {"default": [], "one thread": []}
        for _ in range(args.rounds):
            for setting, threads in (("default", None), ("one thread", 1)):     # side by side, alternating
                times[setting].append(ms_per_step(ranks, script, threads, args.steps, args.skip, data_dir))
        ratios = [d / o for d, o in zip(times["default"], times["one thread"])]
        row = {**times, "ratio": ratios}
        if args.old_default:
            row["every core"] = [ms_per_step(ranks, script, cores, max(args.skip + 3, 8), args.skip, data_dir)]
        figures[label] = row
        print(f"{label}\n  no thread variables: {fmt(times['default'])} ms/step\n"
              f"  OPENBLAS_NUM_THREADS=1: {fmt(times['one thread'])} ms/step\n"
              f"  ratio default / one thread: median {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}, target <= 1.15)"
              + (f"\n  every rank on all {cores} cores (no sizing): {row['every core'][0]:.0f} ms/step"
                 if args.old_default else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    worst = max(statistics.median(row["ratio"]) for row in figures.values())
    return 0 if worst <= 1.15 else 1


def fmt(values):
    return f"median {statistics.median(values):.1f} (range {min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    raise SystemExit(main())
