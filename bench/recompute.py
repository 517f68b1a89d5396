"""Activation recomputation measured: for each --recompute mode, the bytes of activations the caches held at their
peak, the resident peak and ms/step on one core, and a pipeline's peak per stage, each beside its formula.

    python bench/recompute.py                           # the CPU config and the baby GPT (about 6 minutes)
    python bench/recompute.py --only cpu --rounds 3     # one config, the median of 3 runs of each mode
    python bench/recompute.py --only pipeline           # chapter 05: AFAB and 1F1B on 2 stages, each mode

Each run is a real training run (01_single_core/train.py, or 05_pipeline/train.py under mpiexec) with no
evaluation on the way: ms/step is the median over its steps after the first, the activation peak what its last
line reports (rank 0's caches, counted by common.memory.Transient; equal to the formula by the tests), the
resident peak what the kernel reports (VmHWM), which also holds the temporaries and everything else.
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402
from common.memory import activation_bytes  # noqa: E402
from common.metrics import read_metrics  # noqa: E402
from common.notebook import launch  # noqa: E402

CONFIGS = import_chapter("01_single_core.bench").CONFIGS             # "cpu" and "baby": (GPTConfig, batch size)
MODES = ("none", "selective", "full")
QUICK = ["--eval-interval", 100000, "--eval-iters", 1, "--log-interval", 100000]
UNITS = {"KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}


def parse_size(text):
    """'12.3 MiB' -> bytes (to the printed precision)."""
    number, unit = text.split()[:2]
    return float(number) * UNITS[unit]


def flags(gpt_cfg, batch_size):
    return ["--n-layer", gpt_cfg.n_layer, "--n-head", gpt_cfg.n_head, "--n-embd", gpt_cfg.n_embd, "--block-size",
            gpt_cfg.block_size, "--batch-size", batch_size]


def single_core(name, mode, steps, work):
    """One run of chapter 01 on config `name` with --recompute `mode`: {ms, activations, resident}."""
    gpt_cfg, batch_size = CONFIGS[name]
    out = work / f"{name}_{mode}"
    text = launch("01_single_core/train.py", *flags(gpt_cfg, batch_size), *QUICK, "--max-iters", steps,
                  "--recompute", mode, "--out-dir", out, quiet=True, timeout=3600)
    last = text.strip().splitlines()[-1]                  # memory: peak R resident ...; activations: peak A held ...
    ms = [r["ms"] for r in read_metrics(out / "metrics.jsonl") if "ms" in r and r["step"] >= 1]
    return {"ms": statistics.median(ms), "resident": parse_size(last.split("memory: peak ")[1]),
            "activations": parse_size(last.split("activations: peak ")[1])}


def formula(name, mode):
    """The bytes the caches keep (full recomputation's one rebuilt block is a working set, not counted here)."""
    gpt_cfg, batch_size = CONFIGS[name]
    return activation_bytes(gpt_cfg, batch_size, gpt_cfg.n_layer, recompute=mode)


def modes_table(name, steps, rounds, work):
    """Every mode on config `name`, `rounds` times in turn (so drift hits each mode alike): the medians."""
    runs = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            runs[mode].append(single_core(name, mode, steps, work))
    rows = {mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for mode, rs in runs.items()}
    for mode, rs in runs.items():
        rows[mode]["ms_range"] = (min(r["ms"] for r in rs), max(r["ms"] for r in rs))
        rows[mode]["formula"] = formula(name, mode)
    return rows


def print_modes(name, rows, rounds):
    gpt_cfg, batch_size = CONFIGS[name]
    base = rows["none"]
    print(f"\n{name}: {gpt_cfg.n_layer} layers x {gpt_cfg.n_embd} channels, {gpt_cfg.n_head} heads, context "
          f"{gpt_cfg.block_size}, batch {batch_size}, float32, one core; median of {rounds} run(s)\n")
    print("| --recompute | activations held (MiB) | formula (MiB) | vs none | resident peak (MiB) | ms/step "
          "(range) | vs none |")
    print("|---|---|---|---|---|---|---|")
    for mode, row in rows.items():
        lo, hi = row["ms_range"]
        print(f"| {mode} | {row['activations'] / 2 ** 20:.1f} | {row['formula'] / 2 ** 20:.1f} | "
              f"{row['activations'] / base['activations']:.2f} | {row['resident'] / 2 ** 20:.0f} | "
              f"{row['ms']:.1f} ({lo:.1f}-{hi:.1f}) | {row['ms'] / base['ms']:.2f} |")


def pipeline(work, steps=4, microbatches=4):
    """Chapter 05 on 2 stages, the default model and batch: each schedule and mode's activation peak per stage,
    measured and by the formula (timeline.json)."""
    rows = {}
    for kind in ("afab", "1f1b"):
        for mode in MODES:
            out = work / f"pipe_{kind}_{mode}"
            launch("05_pipeline/train.py", *QUICK, "--max-iters", steps, "--schedule", kind, "--microbatches",
                   microbatches, "--recompute", mode, "--out-dir", out, ranks=2, quiet=True)
            ranks = json.loads((out / "timeline.json").read_text())["ranks"]
            rows[kind, mode] = [(r["activations"], r["activations_formula"], r["peak"]) for r in ranks]
    return rows


def print_pipeline(rows, microbatches=4):
    print(f"\n05: the default model on 2 stages, batch 12 in M = {microbatches} micro-batches, float32: the activation "
          "peak of each stage\n")
    print("| schedule | --recompute | micro-batches alive (stage 0, 1) | measured MiB (stage 0, 1) | formula MiB |")
    print("|---|---|---|---|---|")
    for (kind, mode), ranks in rows.items():
        alive = ", ".join(str(peak) for _, _, peak in ranks)
        got = ", ".join(f"{held / 2 ** 20:.2f}" for held, _, _ in ranks)
        want = ", ".join(f"{f / 2 ** 20:.2f}" for _, f, _ in ranks)
        print(f"| {kind} | {mode} | {alive} | {got} | {want} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("cpu", "baby", "pipeline"), help="one table (default: all three)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode, the median taken (default: 1)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 20 for cpu, 4 for baby)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not (ROOT / "data" / "shakespeare_char" / "meta.json").exists():
        raise SystemExit("error: data/shakespeare_char has no prepared data; run python data/prepare.py first")
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, default_steps in (("cpu", 20), ("baby", 4)):
            if args.only in (None, name):
                found[name] = modes_table(name, args.steps or default_steps, args.rounds, Path(tmp))
                print_modes(name, found[name], args.rounds)
        if args.only in (None, "pipeline"):
            rows = pipeline(Path(tmp))
            print_pipeline(rows)
            found["pipeline"] = {f"{kind} {mode}": ranks for (kind, mode), ranks in rows.items()}
    if args.json:
        args.json.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
