"""Concept diagrams drawn from the code, not from runs: what each rank holds at each ZeRO stage (04) and the
four pipeline schedules on ideal stages (05). bench/figures.py (`make figures`) draws them with the rest.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402

sched = import_chapter("05_pipeline.schedules")
save = import_chapter("bench.plots").save
timelines = import_chapter("bench.timelines")

STATE = (("p", "parameters", "C0"), ("g", "gradients", "C1"), ("m", "Adam m", "C2"), ("v", "Adam v", "C3"))


def zero_stages(out_root, ranks=4):
    """04: each rank's model state at stages 0 (plain data parallelism) to 3: a full bar is the whole tensor
    kept, a quarter bar the rank's 1/N shard; stage s shards the first s of (m and v, g, p) from the right."""
    fig, axes = plt.subplots(1, 4, figsize=(9, 2.6), sharey=True)
    sharded = {0: set(), 1: {"m", "v"}, 2: {"m", "v", "g"}, 3: {"m", "v", "g", "p"}}
    for stage, ax in enumerate(axes):
        for r in range(ranks):
            y = ranks - 1 - r
            for k, (key, _, color) in enumerate(STATE):
                x = k * 1.2
                ax.add_patch(Rectangle((x, y + 0.15), 1, 0.7, fill=False, ec="lightgray"))
                if key in sharded[stage]:
                    ax.add_patch(Rectangle((x + r / ranks, y + 0.15), 1 / ranks, 0.7, color=color))
                else:
                    ax.add_patch(Rectangle((x, y + 0.15), 1, 0.7, color=color, alpha=0.85))
                if r == 0:
                    ax.text(x + 0.5, ranks + 0.1, key, ha="center", fontsize=9)
        ax.set_xlim(-0.1, 4.8)
        ax.set_ylim(0, ranks + 0.6)
        ax.set_xticks([])
        ax.set_yticks([ranks - 1 - r + 0.5 for r in range(ranks)], [f"rank {r}" for r in range(ranks)])
        ax.set_title("plain data parallelism" if stage == 0 else f"ZeRO-{stage}", fontsize=9)
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
    fig.suptitle("what each of 4 ranks holds: p parameters, g gradients, m and v AdamW's moments "
                 "(a full bar: the whole tensor; a quarter: the rank's shard)", fontsize=8)
    save(fig, out_root / "04_zero" / "figures" / "stages.png", rect=(0, 0, 1, 0.93))


def pipeline_schedules(out_root, P=4, M=8):
    """05: the four schedules on P ideal stages, M micro-batches, a forward taking 1 and a backward 2 (zb-h1:
    its B 1 and its W 1), simulated by schedules.simulate: white is the bubble."""
    cases = (("afab", 1, (1, 2, 0)), ("1f1b", 1, (1, 2, 0)), ("interleaved", 2, (0.5, 1, 0)), ("zb-h1", 1, (1, 1, 1)))
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, 6.4), sharex=True)
    for ax, (kind, V, costs) in zip(axes, cases):
        traces = sched.simulate(kind, M, P, *(c * 1e-3 for c in costs), virtual=V)   # drawn in thousandths
        span = max(trace[-1][4] for trace in traces)
        bubble = max(sched.bubble(trace, span) for trace in traces)
        timelines.draw_trace(ax, traces, f"{kind}{f' (V = {V} chunks per stage, each half as long)' if V > 1 else ''}"
                                         f": idle {bubble:.0%} of the step", label_over=0.4e-3)
    axes[-1].set_xlabel("time (a forward of one micro-batch through one stage = 1)")
    fig.suptitle(f"{P} stages, {M} micro-batches: forwards (blue), backwards (orange), zb-h1's weight "
                 "gradients W (green)", fontsize=8)
    save(fig, out_root / "05_pipeline" / "figures" / "schedules.png", rect=(0, 0, 1, 0.97))


if __name__ == "__main__":
    zero_stages(ROOT)
    pipeline_schedules(ROOT)
