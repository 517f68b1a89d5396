"""06: every layout of 4 ranks side by side: the planner's memory, bytes per axis and bubble beside real runs.

    python bench/layouts.py                          # 06_3d/figures/layouts.png, about 10 s on 2 cores
    python bench/layouts.py --out-root /tmp/figs     # written elsewhere

Each layout trains bench/figures.py's small model, with 4 blocks instead of 2 so that pp = 4 fits, for one
step; its ledger.json gives what the ranks held and sent. Time is left out: 4 ranks on a 2-core machine are
oversubscribed, and their ms/step changes by a factor 2 from one run to the next.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402
from common.config import GPTConfig, ParallelConfig, TrainConfig  # noqa: E402
from common.data import load_meta  # noqa: E402
from common.memory import available_bytes  # noqa: E402
from common.notebook import launch  # noqa: E402

save = import_chapter("bench.plots").save
planner = import_chapter("06_3d.planner")
train3d = import_chapter("06_3d.train")
RANKS, N_LAYER, N_EMBD, BATCH, MICROBATCHES = 4, 4, 64, 16, 4
AXES = {"tp": "C1", "pp": "C2", "ends": "C4", "dp": "C0"}         # axis: colour
QUICK = ["--max-iters", 1, "--eval-interval", 1000, "--eval-iters", 1, "--log-interval", 1000]


def ledger_axes(ledger):
    """{axis: bytes of the first step on the busiest rank of that axis}, as planner.predict counts them."""
    return {axis: max(sum(r["comm"][axis].values()) for r in ledger["ranks"]) for axis in AXES}


def model_state(record):
    """Bytes of parameters, gradients and AdamW's m and v that a ledger rank's record counts."""
    return record["parameters"] + record["gradients"] + record["optimizer"]


def predicted_state(estimate):
    """The same from a memory estimate, whose optimizer share also counts AdamW's work array: a third of it."""
    return estimate["parameters"] + estimate["gradients"] + estimate["optimizer"] * 2 // 3


def fullest(gpt_cfg, train_cfg, par):
    """(world rank, {kind: bytes}) of the rank whose estimate is the planner's memory per rank: the largest."""
    estimates = [train3d.memory_estimate(gpt_cfg, train_cfg, par, r) for r in range(par.tp * par.pp * par.dp)]
    rank = max(range(len(estimates)), key=lambda r: sum(estimates[r].values()))
    return rank, estimates[rank]


def measure(work):
    """The planner's table for the model (one row per tp x pp x dp, no ZeRO), each row with its run's ledger,
    and the recommended row."""
    gpt_cfg = GPTConfig(n_layer=N_LAYER, n_embd=N_EMBD, vocab_size=load_meta(ROOT / "data/shakespeare_char")
                        ["vocab_size"])
    train_cfg = TrainConfig(batch_size=BATCH)
    available = available_bytes()
    rows, best = planner.plan(gpt_cfg, train_cfg, RANKS, MICROBATCHES,
                              budget=available / RANKS if available else None)
    rows = [r for r in rows if r["zero"] == 0 and r["cp"] == 1]
    for row in rows:
        out = work / f"layout_{row['tp']}{row['pp']}{row['dp']}"
        launch("06_3d/train.py", "--n-layer", N_LAYER, "--n-embd", N_EMBD, "--batch-size", BATCH, "--microbatches",
               MICROBATCHES, "--tp", row["tp"], "--pp", row["pp"], "--dp", row["dp"], *QUICK, "--out-dir", out,
               ranks=RANKS, quiet=True)
        row["ledger"] = json.loads((out / "ledger.json").read_text())
        par = ParallelConfig(tp=row["tp"], pp=row["pp"], dp=row["dp"], microbatches=MICROBATCHES)
        row["rank"], row["estimate"] = fullest(gpt_cfg, train_cfg, par)
    return rows, best


def draw(rows, best, path):
    """Three panels over the layouts: memory of the fullest rank, bytes per axis, bubble; the recommended one
    shaded. Light bars: the planner; solid bars: the run."""
    MiB, x, w = 2 ** 20, np.arange(len(rows)), 0.38
    fig, (mem, comm, bub) = plt.subplots(1, 3, figsize=(8, 3.5))
    for i, row in enumerate(rows):
        est = row["estimate"]
        state = predicted_state(est) / MiB
        record = next(r for r in row["ledger"]["ranks"] if r["rank"] == row["rank"])
        acts, total = est["activations"] / MiB, sum(est.values()) / MiB
        mem.bar(i - w / 2, state, w, color="C0", alpha=0.4)
        mem.bar(i - w / 2, acts, w, bottom=state, color="C2", alpha=0.4)
        mem.bar(i - w / 2, total - state - acts, w, bottom=state + acts, color="0.85", hatch="////",
                edgecolor="0.55", lw=0, label="temporaries (planner only)" if i == 0 else None)
        mem.bar(i + w / 2, model_state(record) / MiB, w, color="C0",
                label="parameters, gradients, AdamW m and v" if i == 0 else None)
        mem.bar(i + w / 2, record["activations"] / MiB, w, bottom=model_state(record) / MiB, color="C2",
                label="activations the caches held" if i == 0 else None)
        mem.text(i - w / 2, total, f"{total:.1f}", ha="center", va="bottom", fontsize=6)
        predicted, got = row["axes"], ledger_axes(row["ledger"])
        for offset, values, alpha in ((-w / 2, predicted, 0.4), (w / 2, got, 1.0)):
            bottom = 0.0
            for axis, colour in AXES.items():
                comm.bar(i + offset, values[axis] / MiB, w, bottom=bottom, color=colour, alpha=alpha,
                         label=axis if i == 0 and alpha == 1.0 else None)
                bottom += values[axis] / MiB
        comm.text(i, bottom, f"{bottom:.2f}", ha="center", va="bottom", fontsize=6)
        bub.bar(i, row["bubble"], 0.6, color="C3")
        bub.text(i, row["bubble"] + 0.01, f"{row['bubble']:.2f}", ha="center", va="bottom", fontsize=7)
    chosen = next(i for i, r in enumerate(rows) if (r["tp"], r["pp"], r["dp"]) == (best["tp"], best["pp"],
                                                                                      best["dp"]))
    labels = [f"{r['tp']}·{r['pp']}·{r['dp']}" for r in rows]
    panels = ((mem, "(a) memory of the fullest rank", "MiB"), (comm, "(b) bytes sent per step, by axis",
              "MiB (busiest rank on each axis)"), (bub, f"(c) pipeline bubble, M = {MICROBATCHES}",
              "idle fraction of a step (planner)"))
    for ax, title, ylabel in panels:
        ax.axvspan(chosen - 0.5, chosen + 0.5, color="gold", alpha=0.2, lw=0)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xticks(x, labels, fontsize=7, rotation=45)
        ax.get_xticklabels()[chosen].set_fontweight("bold")
        ax.set_xlabel("tp · pp · dp", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.45)                     # room for the legend above the bars
    mem.legend(fontsize=6, loc="upper left", handlelength=1.2)
    comm.legend(fontsize=6, loc="upper left", ncol=4, handlelength=1, columnspacing=0.8)
    bub.set_ylim(0, 0.6)
    bub.text(chosen, 0.3, "recommended", rotation=90, ha="center", va="center", fontsize=7)
    fig.suptitle(f"Every layout of {RANKS} ranks (small model, {N_LAYER} layers for pp = 4): planner (light) vs "
                 f"one real step (solid)\nAll fit, so it picks the least split, {labels[chosen]} (shaded): no "
                 f"bubble, no tp all-reduces, only dp's gradient sum", fontsize=8.5)
    save(fig, path)


def layout_comparison(out_root, work):
    """Run every layout of 4 ranks for one step and draw <out_root>/06_3d/figures/layouts.png."""
    rows, best = measure(Path(work))
    draw(rows, best, Path(out_root) / "06_3d" / "figures" / "layouts.png")
    return rows, best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", type=Path, default=ROOT, help="where 06_3d/figures/ goes (default: here)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        layout_comparison(args.out_root, Path(tmp))
    print(args.out_root / "06_3d" / "figures" / "layouts.png")


if __name__ == "__main__":
    main()
