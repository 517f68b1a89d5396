"""03's overlap in one picture: one step of 2 ranks on a simulated network, bucketed against overlapped.

    from pathlib import Path                              # from the repository root: about 10 s on 2 cores
    from bench.dp_timeline import overlap_timeline
    overlap_timeline(Path("/tmp/figs"), Path("/tmp/work"))

Each run's last step is recorded by 03_data_parallel/train.py (timeline.json): when each part of the backward ran,
and when each bucket's all-reduce was called (bucketed) or launched (overlapped) and when the modelled link
delivered it. On ethernet-1g a block's gradient (0.2 MB here) takes about 1.7 ms to all-reduce, half as long as
its backward, so the overlapped buckets of one block fit under the next block's backward: only the first block's
and the embedding's are left after it. Four blocks rather than figures.py's two, so most of them are hidden.
"""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from common.chapters import import_chapter  # noqa: E402
from common.network import PRESETS, collective_time  # noqa: E402
from common.notebook import launch  # noqa: E402

save = import_chapter("bench.plots").save
MODEL = ["--n-layer", 4, "--n-embd", 64, "--batch-size", 16]     # bench/figures.py's small model, 4 layers deep
NETWORK, BUCKET_MB, RANKS = "ethernet-1g", 0.1, 2
WIRE = ("tab:green", "yellowgreen")             # neighbouring buckets told apart


def recorded(mode, work, steps, rounds):
    """The timeline.json of the quietest (shortest recorded step) of `rounds` runs of `mode`: other processes on
    the machine only ever add time."""
    records = []
    for i in range(rounds):
        out = work / f"dp_timeline_{mode}_{i}"
        launch("03_data_parallel/train.py", *MODEL, "--max-iters", steps, "--eval-interval", 1000, "--eval-iters", 1,
               "--dp-mode", mode, "--network", NETWORK, "--bucket-mb", BUCKET_MB, "--out-dir", out, ranks=RANKS,
               quiet=True)
        records.append(json.loads((out / "timeline.json").read_text()))
    return min(records, key=lambda r: max(end for rank in r["ranks"] for _, _, _, end in rank["trace"]))


def slowest(record):
    """The rank whose backward ended last: the one the others wait for, so the one whose waits are the link's."""
    ends = [max(end for op, _, _, end in rank["trace"] if op == "backward") for rank in record["ranks"]]
    return ends.index(max(ends))


def draw(ax, record, rank):
    """`rank`'s backward, part by part, on one row, and each bucket's all-reduce on the row below: a thick bar for
    the link's modelled time, ending when the sum arrived, and a thin line for any wait before it (for the other
    rank, or for the link to finish the buckets queued ahead). Times in ms from the backward's start."""
    trace, link = record["ranks"][rank]["trace"], PRESETS[record["network"]]
    t0 = min(start for op, _, start, _ in trace if op == "backward")
    for op, name, start, end in trace:
        ms = ((start - t0) * 1e3, (end - t0) * 1e3)
        if op == "backward":
            ax.broken_barh([(ms[0], ms[1] - ms[0])], (0.6, 0.8), color="tab:orange")
            if end - start > 1.5e-3:
                ax.text(sum(ms) / 2, 1, name, ha="center", va="center", fontsize=7)
        elif op in ("allreduce", "iallreduce"):
            lo, hi = record["buckets"][name]
            wire = 1e3 * collective_time(op, (hi - lo) * record["itemsize"], record["dp"], link)
            ax.plot([ms[0], ms[1] - wire], [0, 0], color="k", lw=0.8)
            ax.broken_barh([(ms[1] - wire, wire)], (-0.35, 0.7), color=WIRE[name % 2])
            ax.text(ms[1] - wire / 2, 0, str(name), ha="center", va="center", fontsize=7)
    ax.set_yticks([0, 1], ["all-reduce", "backward"])
    ax.set_ylim(-0.6, 1.6)


def summary(record, rank):
    """`rank`'s milestones in ms from the backward's start: its end, the last all-reduce's end, and how many of
    the buckets were started while the backward still ran."""
    trace = record["ranks"][rank]["trace"]
    t0 = min(start for op, _, start, _ in trace if op == "backward")
    backward = max(end for op, _, _, end in trace if op == "backward") - t0
    sums = [(start - t0, end - t0) for op, _, start, end in trace if op in ("allreduce", "iallreduce")]
    return {"rank": rank, "backward_ms": 1e3 * backward, "allreduce_end_ms": 1e3 * max(end for _, end in sums),
            "buckets": len(sums), "started_during_backward": sum(start < backward for start, _ in sums),
            "allreduce_ms": [(1e3 * start, 1e3 * end) for start, end in sums]}


def overlap_timeline(out_root, work, steps=6, rounds=5):
    """Run 03 bucketed and overlapped (RANKS ranks, MODEL, on NETWORK), `rounds` times each, and draw the quietest
    recorded steps into <out_root>/03_data_parallel/figures/overlap.png; returns each mode's summary()."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 3.4), sharex=True)
    numbers = {}
    for ax, mode in zip(axes, ("bucketed", "overlapped")):
        record = recorded(mode, work, steps, rounds)
        rank = slowest(record)
        draw(ax, record, rank)
        numbers[mode] = s = summary(record, rank)
        ax.axvline(s["backward_ms"], color="k", lw=0.6, ls="--")
        ax.set_title(f"{mode} (rank {rank}): the backward ends at {s['backward_ms']:.1f} ms (dashed), the "
                     f"all-reduces at {s['allreduce_end_ms']:.1f}; {s['started_during_backward']} of {s['buckets']} "
                     "started before", fontsize=9)
    axes[0].legend(handles=[Patch(color=WIRE[0], label="bucket k on the wire"),
                            Line2D([], [], color="k", lw=0.8, label="waiting: other rank, link")],
                   loc="lower left", fontsize=7)                # the empty corner: no all-reduce yet
    axes[-1].set_xlabel(f"ms from the start of the backward, on the rank whose backward ended last ({RANKS} ranks, "
                        f"{NETWORK}, --bucket-mb {BUCKET_MB})", fontsize=8)
    save(fig, out_root / "03_data_parallel" / "figures" / "overlap.png")
    return numbers
