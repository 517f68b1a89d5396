"""Concept diagrams drawn from the code, not from runs: the collectives and the f/g operators of tensor
parallelism (02), what each rank holds at each ZeRO stage (04), the four pipeline schedules on ideal stages
(05) and the grid's axes (06, also drawn in its notebook). bench/figures.py (`make figures`) draws them with
the rest.
"""
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Rectangle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402

sched = import_chapter("05_pipeline.schedules")
grid_lib = import_chapter("06_3d.grid")
save = import_chapter("bench.plots").save
timelines = import_chapter("bench.timelines")

STATE = (("p", "parameters", "C0"), ("g", "gradients", "C1"), ("m", "Adam m", "C2"), ("v", "Adam v", "C3"))


def _cells(ax, x, y, labels, colors, w=0.55):
    for i, (label, color) in enumerate(zip(labels, colors)):
        ax.add_patch(Rectangle((x + i * w, y), w, 0.5, fc=color, ec="k", lw=0.6))
        ax.text(x + i * w + w / 2, y + 0.25, label, ha="center", va="center", fontsize=7)


def _box(ax, x, y, text, color, w=1.75):
    ax.add_patch(FancyBboxPatch((x, y), w, 0.55, boxstyle="round,pad=0.03", fc=color, ec="k", lw=0.6))
    ax.text(x + w / 2, y + 0.27, text, ha="center", va="center", fontsize=6.5)


def _arrow(ax, x0, x1, y):
    ax.annotate("", (x1, y), (x0, y), arrowprops=dict(arrowstyle="->", lw=0.8))


def tensor_parallel(out_root):
    """02: the three collectives on 2 ranks (each rank's buffer before and after), and one MLP on 2 ranks: f
    before the column-parallel c_fc, g after the row-parallel c_proj, nothing exchanged in between."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [1, 1.7]})
    a, b = ("#9ecae1", "#fdae6b")                             # rank 0's numbers, rank 1's
    rows = (("all-reduce", (["a0", "a1"], ["b0", "b1"]), (["a0+b0", "a1+b1"], ["a0+b0", "a1+b1"])),
            ("reduce-scatter", (["a0", "a1"], ["b0", "b1"]), (["a0+b0"], ["a1+b1"])),
            ("all-gather", (["a0"], ["b1"]), (["a0", "b1"], ["a0", "b1"])))
    for k, (name, before, after) in enumerate(rows):
        y = 2 * (2 - k)
        left.text(0, y + 1.35, name, fontsize=8, weight="bold")
        for r, (cells_before, cells_after) in enumerate(zip(before, after)):
            yy = y + 0.6 - 0.65 * r
            left.text(-0.1, yy + 0.25, f"rank {r}", ha="right", va="center", fontsize=7)
            _cells(left, 0, yy, cells_before, [a if c.startswith("a") else b for c in cells_before])
            _arrow(left, 1.25, 1.85, yy + 0.25)
            _cells(left, 2.0, yy, cells_after, ["#c7e9c0" if "+" in c else a if c.startswith("a") else b
                                                for c in cells_after], w=0.75 if "+" in cells_after[0] else 0.55)
    left.set_xlim(-0.9, 3.6)
    left.set_ylim(-0.4, 5.9)
    left.axis("off")
    left.set_title("the collectives, 2 ranks", fontsize=9)
    for r in range(2):
        y = 1.6 - 1.3 * r
        right.text(-0.25, y + 0.27, f"rank {r}", ha="right", va="center", fontsize=7)
        steps = [("x: LayerNorm\n(whole, replicated)", "#eeeeee"), ("f\nfwd: identity\nbwd: all-reduce", "#fde0dd"),
                 (f"c_fc, columns\n{2 * r}C..{2 * r + 2}C: GELU", a if r == 0 else b),
                 (f"c_proj, rows\n{2 * r}C..{2 * r + 2}C: partial sum", a if r == 0 else b),
                 ("g\nfwd: all-reduce\nbwd: identity", "#fde0dd"), ("+ residual\n(whole, replicated)", "#eeeeee")]
        for i, (text, color) in enumerate(steps):
            _box(right, i * 2.05, y, text, color)
            if i:
                _arrow(right, i * 2.05 - 0.3, i * 2.05 - 0.05, y + 0.27)
    right.set_xlim(-1.0, 12.2)
    right.set_ylim(-0.2, 2.6)
    right.axis("off")
    right.set_title("an MLP on 2 ranks: one all-reduce forward (g), one backward (f); nothing in between",
                    fontsize=9)
    save(fig, out_root / "02_tensor_parallel" / "figures" / "f_g.png")


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


def draw_grid(tp, pp, dp, ax, slots=None):
    """One box per world rank of a tp x pp x dp grid: columns tp, rows the pipeline stages (stage 0 on top),
    replicas side by side, each axis's communication drawn between the boxes; `slots`: ranks per host."""
    colors = plt.cm.tab10.colors
    w, h, gx, gy, pad = 1.7, 1.05, 0.5, 0.75, 0.35
    width = tp * w + (tp - 1) * gx + 2 * pad
    centre = {}
    for r in range(tp * pp * dp):
        t, _, p, d = grid_lib.coords(r, tp=tp, pp=pp)
        x = d * (width + 0.8) + pad + t * (w + gx)
        y = (pp - 1 - p) * (h + gy) + pad
        centre[r] = (x + w / 2, y + h / 2)
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colors[p], alpha=0.55, ec="k"))
        ax.text(x + w / 2, y + h / 2, f"rank {r}\n(tp {t}, pp {p}, dp {d})", ha="center", va="center", fontsize=8)
    height = pp * h + (pp - 1) * gy + 2 * pad
    for d in range(dp):
        x0 = d * (width + 0.8)
        ax.add_patch(FancyBboxPatch((x0, 0), width, height, boxstyle="round,pad=0.05", fc="none", ec="gray", ls="--"))
        host = f", host {d * tp * pp // slots}" if slots else ""
        ax.text(x0 + width / 2, height + 0.1, f"dp replica {d}{host}", ha="center", fontsize=9)
    for r, (x, y) in centre.items():
        t, _, p, d = grid_lib.coords(r, tp=tp, pp=pp)
        if t + 1 < tp:                                   # tp: neighbours in a row
            ax.annotate("", centre[r + 1], (x, y), arrowprops=dict(arrowstyle="<->", color="tab:red", lw=2,
                                                                  shrinkA=42, shrinkB=42))
        if p + 1 < pp:                                   # pp: down the column
            ax.annotate("", centre[r + tp], (x, y), arrowprops=dict(arrowstyle="<->", color="tab:green", lw=2,
                                                                   shrinkA=20, shrinkB=20))
        if d + 1 < dp:                                   # dp: the same position in the next replica
            ax.annotate("", centre[r + tp * pp], (x, y), arrowprops=dict(
                arrowstyle="<->", color="tab:purple", lw=1, ls=":", shrinkA=38, shrinkB=38,
                connectionstyle="arc3,rad=-0.25"))
    ax.plot([], [], color="tab:red", lw=2, label="tp: all-reduce of activations, every block and micro-batch")
    ax.plot([], [], color="tab:green", lw=2,
            label="pp: one activation forward, its gradient back, per micro-batch and boundary")
    ax.plot([], [], color="tab:purple", lw=1, ls=":", label="dp: all-reduce of the gradient, once per step")
    ax.set_xlim(-0.3, dp * (width + 0.8))
    ax.set_ylim(-0.4, height + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=1, fontsize=8, frameon=False)
    ax.set_title(f"(tp, pp, dp) = ({tp}, {pp}, {dp}): colour = pipeline stage")


def grid(out_root):
    """06: the 8 ranks of a tp 2 x pp 2 x dp 2 grid on hosts of 4, and which axis talks where."""
    fig, ax = plt.subplots(figsize=(10, 5))
    draw_grid(2, 2, 2, ax, slots=4)
    save(fig, out_root / "06_3d" / "figures" / "grid.png")


if __name__ == "__main__":
    plt.switch_backend("Agg")                  # a script draws to files (imported by a notebook, it draws inline)
    tensor_parallel(ROOT)
    zero_stages(ROOT)
    pipeline_schedules(ROOT)
    grid(ROOT)
