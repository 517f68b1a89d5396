"""Chapter 05's figures from real runs: one step's timeline of each schedule under its ideal one, and the measured
bubble against the number of micro-batches beside each schedule's formula (bench/figures.py calls this).
"""
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402
from common.notebook import launch  # noqa: E402

sched = import_chapter("05_pipeline.schedules")
save = import_chapter("bench.plots").save

COLORS = {"forward": "tab:blue", "backward": "tab:orange", "weights": "tab:green", "send_fwd": "tab:red",
          "send_bwd": "tab:red"}
SCHEDULE_FLAGS = {"afab": [], "1f1b": [], "interleaved": ["--virtual-stages", 2], "zb-h1": []}   # on 2 stages
MICROBATCHES = (1, 2, 4, 8)


def op_costs(traces):
    """The median time of a forward, a backward and a W (0 if none) over every stage's trace."""
    return [float(np.median([end - start for trace in traces for o, _, _, start, end in trace if o == op] or [0]))
            for op in ("forward", "backward", "weights")]


def draw_trace(ax, traces, title, label_over=2e-3):
    """Each stage's operations as bars on its row (stage 0 at the bottom), in thousandths of the trace's time
    unit; an operation longer than `label_over` is labelled with its micro-batch (and chunk)."""
    for s, trace in enumerate(traces):
        for op, m, c, start, end in trace:
            if op in COLORS:
                ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (s - 0.4, 0.8), color=COLORS[op])
                if op in ("forward", "backward", "weights") and end - start > label_over:
                    ax.text((start + end) / 2 * 1e3, s, f"{m}{chr(ord('a') + c) if c else ''}", ha="center",
                            va="center", fontsize=6)
    ax.set_yticks(range(len(traces)), [f"stage {s}" for s in range(len(traces))])
    ax.set_title(title, fontsize=8)


def simulated_bubble(record):
    """The worst stage's idle fraction when a run's schedule runs on ideal stages, each forward, backward and W
    taking its median time in that run: the bubble the schedule itself leaves, the ops' own cost included."""
    traces = sched.simulate(record["schedule"], record["microbatches"], record["pp"],
                            *op_costs([r["trace"] for r in record["ranks"]]), virtual=record["virtual_stages"])
    span = max(trace[-1][4] for trace in traces)
    return max(sched.bubble(trace, span) for trace in traces)


def pipeline_figures(out_root, work, repeats=3, microbatches=MICROBATCHES):
    """05: one step's real timeline of each schedule under its ideal one, and the measured bubble against M
    beside each schedule's formula; each measured bubble is the median over `repeats` runs of the worst stage's
    in the last step (one step on a shared machine is noisy). Returns {schedule: {M: measured bubble}} and the
    formulas."""
    records, bubbles = {}, {}
    for kind, flags in SCHEDULE_FLAGS.items():
        for M in microbatches:
            if kind == "interleaved" and M % 2:
                continue
            for r in range(repeats):
                out = work / f"pipe_{kind}_{M}_{r}"
                launch("05_pipeline/train.py", "--schedule", kind, *flags, "--microbatches", M, "--batch-size", 16,
                       "--max-iters", 6, "--eval-interval", 1000, "--eval-iters", 1, "--out-dir", out, ranks=2,
                       quiet=True)
                record = json.loads((out / "timeline.json").read_text())
                records.setdefault((kind, M), record)
                bubbles.setdefault((kind, M), []).append(max(rank["bubble"] for rank in record["ranks"]))
    fig, axes = plt.subplots(8, 1, figsize=(8, 10.5), sharex=True)
    for i, kind in enumerate(sched.SCHEDULES):
        real = [r["trace"] for r in records[kind, 4]["ranks"]]
        V = records[kind, 4]["virtual_stages"]
        ideal = sched.simulate(kind, 4, 2, *op_costs(real), virtual=V)   # the same instructions at median times
        for ax, traces, what in ((axes[2 * i], ideal, "ideal: each op its median time"),
                                 (axes[2 * i + 1], real, "real, one step")):
            draw_trace(ax, traces, f"{kind}{f' (V = {V}: chunk b after a)' if V > 1 else ''}, 2 stages, M = 4, "
                                   f"{what}")
    fig.suptitle("forwards (blue), backwards (orange), zb-h1's deferred weight gradients W (green), sends (red); "
                 "white: the bubble", fontsize=8)
    axes[-1].set_xlabel("ms into the step")
    save(fig, out_root / "05_pipeline" / "figures" / "timeline.png", rect=(0, 0, 1, 0.98))

    measured = {kind: {M: float(np.median(bubbles[kind, M])) for k, M in records if k == kind}
                for kind in sched.SCHEDULES}
    simulated = {kind: {M: simulated_bubble(records[kind, M]) for M in measured[kind]} for kind in sched.SCHEDULES}
    costs = op_costs([r["trace"] for M in microbatches for r in records["zb-h1", M]["ranks"]])
    formulas = {kind: {M: sched.bubble_formula(kind, M, 2, 2 if kind == "interleaved" else 1, costs)
                       for M in measured[kind]} for kind in sched.SCHEDULES}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    grid = np.linspace(1, 8, 50)
    for i, (kind, label) in enumerate((("afab", "afab and 1f1b: (p-1) / (M+p-1)"), ("1f1b", None),
                                       ("interleaved", "interleaved, V = 2: (p-1) / (VM+p-1)"),
                                       ("zb-h1", "zb-h1: (p-1)(F+B-W) / (M(F+B+W) + (p-1)(F+B-W))"))):
        Ms = sorted(measured[kind])
        ax.plot(Ms, [measured[kind][M] for M in Ms], "osD^"[i], color=f"C{i}", label=f"{kind}, measured")
        ax.plot(Ms, [simulated[kind][M] for M in Ms], ":", marker="osD^"[i], mfc="none", ms=4, lw=0.8, color=f"C{i}",
                label=f"{kind}, simulated from the run's own F, B, W" if i in (0, 2, 3) else None)
        if label:
            V = 2 if kind == "interleaved" else 1
            Ms = grid[grid >= 2] if kind == "zb-h1" else grid            # zb-h1's holds from M = P on
            ax.plot(Ms, [sched.bubble_formula(kind, M, 2, V, costs) for M in Ms], "-", lw=1, color=f"C{i}",
                    label=label)
    ax.set_xlabel("micro-batches M")
    ax.set_ylabel("idle fraction of the step\n(worst stage, median of runs)")
    ax.set_title("2 stages: the bubble against M; formulas (lines), and the schedule simulated with each run's op\n"
                 "times (dotted): what lies above that is time between the ops (sends, Python), not the schedule",
                 fontsize=8)
    ax.legend(fontsize=7)
    save(fig, out_root / "05_pipeline" / "figures" / "bubble.png")
    print(f"zb-h1's median F, B, W here: {', '.join(f'{t * 1e3:.1f}' for t in costs)} ms")
    print("M      " + "".join(f"{kind:>22}" for kind in sched.SCHEDULES) + "   (measured / formula)")
    for M in microbatches:
        print(f"{M:<7}" + "".join(f"{measured[k][M]:>13.2f} / {formulas[k][M]:.2f}" if M in measured[k] else
                                  f"{'-':>22}" for k in sched.SCHEDULES))
    return measured, formulas
