"""A mixture of experts on one core, measured: chapter 01's default 2000-step run dense and with 8 experts per
block, top 1 (as many parameters per token as the dense model: Switch's comparison), top 1 without the balance
loss, and top 2; how the routers spread the tokens and how many they drop; and the time per step.

    python bench/experts.py                    # the four runs two at a time (~15 minutes on 2 cores), then timing
    python bench/experts.py --timing-only      # only the time per step: 3 alternating rounds of 60 steps

Writes 01_single_core/figures/experts.json (the runs' curves and routing, the timings) and experts.png, which
chapter 01's README shows and its notebook plots again.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402

precision = import_chapter("bench.precision")
SWITCH = ["--n-experts", 8, "--top-k", 1]
RUNS = {"dense": [], "8 experts, top 1": SWITCH, "8 experts, top 1, no balance loss": [*SWITCH, "--aux-loss-coef", 0],
        "8 experts, top 2": ["--n-experts", 8, "--top-k", 2]}
RECORD = precision.FIGURES / "experts.json"


def routing(train):
    """Every 10 steps (their mean): the balance loss, the share of assignments dropped, and the busiest expert's
    share of its block's assignments, the mean over blocks (1/E when balanced)."""
    if "expert_load" not in train[0]:
        return {}
    load = np.array([r["expert_load"] for r in train], dtype=float)              # (steps, blocks, E)
    busiest = (load.max(axis=-1) / load.sum(axis=-1)).mean(axis=-1)
    every = {"aux_loss": [r["aux_loss"] for r in train], "dropped": [r["dropped"] for r in train], "busiest": busiest}
    return {name: [float(x) for x in np.reshape(values, (-1, 10)).mean(axis=1)] for name, values in every.items()}


def draw(record, path=None):
    """Train and val losses of the four runs; the share dropped and the busiest expert's share over training: the
    figure, saved to `path` if given."""
    import matplotlib
    if path:                                                  # a file; in a notebook, the figure inline
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    save = import_chapter("bench.plots").save
    fig, (losses, dropped, busiest) = plt.subplots(1, 3, figsize=(13, 4))
    for i, (name, run) in enumerate(record["runs"].items()):
        losses.plot(run["steps"], run["loss"], lw=1, color=f"C{i}", alpha=0.8,
                    label=f"{name}: val {run['val'][-1]:.3f}")
        losses.plot(run["val_steps"], run["val"], "o", ms=3, color=f"C{i}")
        if "dropped" in run:
            dropped.plot(run["steps"], np.array(run["dropped"]) * 100, lw=1, color=f"C{i}", label=name)
            busiest.plot(run["steps"], np.array(run["busiest"]) * 100, lw=1, color=f"C{i}", label=name)
    losses.set(ylim=(1.0, 3.5), ylabel="train loss (dots: val)", xlabel="step", title="chapter 01's default run")
    losses.legend(fontsize=8)
    dropped.set(ylabel="assignments dropped (%)", xlabel="step", title="over capacity (factor 1.25)")
    busiest.axhline(100 / 8, color="gray", lw=0.5, ls="--")
    busiest.set(ylabel="busiest expert's share (%)", xlabel="step", title="load balance (dashed: 1/8)")
    busiest.legend(fontsize=8)
    if path:
        save(fig, path)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing-only", action="store_true", help="measure the time per step, keep the curves")
    parser.add_argument("--work", default=str(ROOT / "out" / "bench_experts"), help="where the runs write")
    args = parser.parse_args(argv)
    work = Path(args.work)
    record = json.loads(RECORD.read_text()) if args.timing_only else {}
    if not args.timing_only:
        record["runs"] = precision.curves(work, RUNS, also=routing)
    timed = ("dense", "8 experts, top 1", "8 experts, top 2")
    record["ms_per_step"] = precision.timing(work, {name: RUNS[name] for name in timed})
    precision.FIGURES.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    draw(record, precision.FIGURES / "experts.png")
    for name, run in record.get("runs", {}).items():
        print(f"{name:<36} val {run['val'][-1]:.4f}" + (f"  dropped {run['dropped'][-1]:.3f}  busiest "
                                                         f"{run['busiest'][-1]:.3f}" if "dropped" in run else ""))
    print("ms/step:", {k: [round(v, 1) for v in vs] for k, vs in record["ms_per_step"].items()})


if __name__ == "__main__":
    main()
