"""Regenerate the figures the READMEs show, from real runs: <chapter>/figures/*.png and figures/*.png.

    make figures                               # or: python bench/figures.py (about 4 minutes on 2 cores)
    python bench/figures.py --steps 20 --out-root /tmp/figs    # a quick check, written elsewhere

Every chapter trains the same small model (2 layers x 64 channels, batch 16, float32) as one core does, on the
same batches, and its loss is drawn over one core's with the difference below; each chapter adds what it is
about (what each --recompute mode holds and costs, ZeRO's memory against the formula, the pipeline's timelines
and bubble, the bytes on each 3D axis, every layout of 4 ranks and context parallelism's balance and memory, the
data-parallel modes and one step's overlap on a simulated network) and its bug from bench/gallery.py, replayed
beside the correct run, with verify.py's verdict (figures/gallery.json). Chapter 01's mixed-precision figure is
redrawn from 01_single_core/figures/precision.json, which `python bench/precision.py` writes from its four
2000-step runs (about 20 minutes), and its experts' figure from experts.json, which `python bench/experts.py`
writes likewise.
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
from common.memory import recompute_bytes  # noqa: E402
from common.metrics import read_metrics  # noqa: E402
from common.notebook import launch  # noqa: E402

gallery = import_chapter("bench.gallery")
recompute = import_chapter("bench.recompute")
context = import_chapter("bench.context")
save = import_chapter("bench.plots").save
timelines = import_chapter("bench.timelines")
losses = gallery.losses
PARALLEL = {                                 # chapter: (ranks, flags, label)
    "02_tensor_parallel": (2, ["--tp", 2, "--sequence-parallel"], "tensor + sequence parallel, tp = 2"),
    "03_data_parallel": (2, ["--dp", 2, "--grad-accum", 2], "data parallel, dp = 2, 2 micro-batches"),
    "04_zero": (2, ["--zero-stage", 2, "--grad-accum", 2], "ZeRO-2 on 2 ranks, 2 micro-batches"),
    "05_pipeline": (2, ["--schedule", "1f1b", "--microbatches", 4], "pipeline, 2 stages, 1F1B, M = 4"),
    "06_3d": (4, ["--tp", 2, "--pp", 2, "--microbatches", 4], "3D: tp 2 x pp 2"),
}


def small(steps, out=None):
    return ["--n-layer", 2, "--n-embd", 64, "--batch-size", 16, "--max-iters", steps, "--lr-decay-iters", steps,
            "--warmup-iters", min(10, steps // 2), "--eval-interval", max(1, steps // 2), "--eval-iters", 5,
            "--log-interval", 1000, *(["--out-dir", out] if out else [])]


def overlay(single, parallel, label, path):
    """The chapter's loss over one core's, and their difference below."""
    (s1, l1), (s2, l2) = losses(single), losses(parallel)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    top.plot(s1, l1, lw=3, alpha=0.4, label="one core")
    top.plot(s2, l2, lw=1, label=label)
    top.set_ylabel("train loss")
    top.legend()
    diff = np.abs(l2 - l1)
    bottom.semilogy(s1, np.where(diff > 0, diff, 1e-9), ".", ms=3, color="C3")
    bottom.set_ylim(5e-10, 1e-4)
    bottom.set_yticks([1e-9, 1e-7, 1e-5], ["0 (same bits)", "1e-7", "1e-5"])
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    top.set_title("the same batches, the same steps: float32 rounding apart")
    save(fig, path)


def zero_memory(out_root, work, ranks=(2, 4, 8)):
    """04: model-state bytes per rank, measured from the arrays, against the paper's formula (float32), beside
    plain data parallelism's (chapter 03: every rank holds all of it, the paper's stage 0)."""
    zero_lib = import_chapter("04_zero.zero")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = 0
    for n in ranks:
        for stage in (0, 1, 2, 3):
            if stage == 0:                      # chapter 03 keeps Psi parameters, gradients, and m and v
                psi = import_chapter("common.model").gpt_layout(
                    import_chapter("common.config").GPTConfig(vocab_size=65)).size
                got = want = sum(zero_lib.memory_formula(0, psi, psi, 4).values()) / 2 ** 20
                ax.bar(x, got, color="lightgray", hatch="//", edgecolor="gray",
                       label="data parallelism (chapter 03)" if n == ranks[0] else None)
            else:
                out = work / f"zero_{n}_{stage}"
                launch("04_zero/train.py", "--zero-stage", stage, "--batch-size", 24, "--max-iters", 1,
                       "--eval-interval", 1000, "--eval-iters", 1, "--out-dir", out, ranks=n, quiet=True)
                ledger = json.loads((out / "ledger.json").read_text())
                got = sum(ledger["memory"][k] for k in ("parameters", "gradients", "optimizer")) / 2 ** 20
                want = sum(ledger["memory_formula"].values()) / 2 ** 20
                ax.bar(x, got, color=f"C{stage}", label=f"ZeRO-{stage}, measured" if n == ranks[0] else None)
            ax.plot([x - 0.4, x + 0.4], [want, want], "k-", lw=2, label="the paper's formula" if x == 0 else None)
            x += 1
        x += 1
    ax.set_xticks([1.5 + 5 * i for i in range(len(ranks))], [f"N = {n} ranks" for n in ranks])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)                  # room for the legend above the bars
    ax.set_ylabel("MiB per rank")
    ax.set_title("model state per rank (float32, the default model): measured (bars), formula (lines)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    save(fig, out_root / "04_zero" / "figures" / "memory.png")


def recompute_figure(out_root, work, rounds, steps=20):
    """01: the bytes of activations the caches held at their peak and ms/step for each --recompute mode, the
    default model on one core (bench/recompute.py's runs, the median of `rounds`)."""
    rows = recompute.modes_table("cpu", steps, rounds, work)
    gpt_cfg, batch_size = recompute.CONFIGS["cpu"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 2.8))
    modes, colors = list(rows), ["C0", "C1", "C2"]
    kept = [rows[m]["activations"] / 2 ** 20 for m in modes]
    left.bar(modes, kept, color=colors)
    rebuilt = [recompute_bytes(gpt_cfg, batch_size, recompute=m) / 2 ** 20 for m in modes]
    left.bar(modes, rebuilt, bottom=kept, color="none", edgecolor="C2", hatch="///",
             label="+ the block rebuilt (estimated)")
    for i, m in enumerate(modes):
        left.plot([i - 0.4, i + 0.4], [rows[m]["formula"] / 2 ** 20] * 2, "k-", lw=2,
                  label="formula" if i == 0 else None)
        right.text(i, rows[m]["ms"], f"x{rows[m]['ms'] / rows['none']['ms']:.2f}", ha="center", va="bottom",
                   fontsize=8)
    left.set_ylabel("MiB held by the caches")
    left.set_title("kept by the caches at their peak (bars), formula (lines)", fontsize=8)
    left.set_ylim(0, max(kept) * 1.45)
    left.legend(fontsize=7, loc="upper right")
    right.bar(modes, [rows[m]["ms"] for m in modes], color=colors)
    right.set_ylabel("ms per step")
    right.set_ylim(0, max(r["ms"] for r in rows.values()) * 1.25)
    right.set_title("the training step, measured", fontsize=8)
    fig.suptitle("--recompute on the default model (4 x 128, context 64, batch 12), one core, float32", fontsize=9)
    save(fig, out_root / "01_single_core" / "figures" / "recompute.png", rect=(0, 0, 1, 0.95))
    return rows


def context_figure(out_root, work, block_size, sizes=(1, 2, 4)):
    """06: context parallelism's attention work per rank, zig-zag against contiguous, and a long context's
    activations per rank against cp (bench/context.py's runs)."""
    found = context.balance(work)
    rows = context.long_context(work, block_size, sizes=sizes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    for i, (split, got) in enumerate(found.items()):
        left.bar(np.arange(4) + (i - 0.5) * 0.4, [w / 1e3 for w in got], 0.4, color=f"C{i}",
                 label=f"{split}: max/min {max(got) / min(got):.2f}")
    left.set_xticks(range(4), [f"cp rank {r}" for r in range(4)], fontsize=8)
    left.set_ylabel("score entries per row, thousands")
    left.set_title("attention work of each rank, cp = 4 (one step)", fontsize=8)
    left.legend(fontsize=7)
    labels = [f"cp {cp}" + (f"\n{recompute}" if cp == 1 else "") for cp, recompute in rows]
    right.bar(range(len(rows)), [held / 2 ** 20 for held, *_ in rows.values()], color="C2")
    for i, (held, formula, _, _) in enumerate(rows.values()):
        right.plot([i - 0.4, i + 0.4], [formula / 2 ** 20] * 2, "k-", lw=2, label="formula" if i == 0 else None)
    right.set_xticks(range(len(rows)), labels, fontsize=8)
    right.set_ylabel("MiB held by the caches (fullest rank)")
    right.set_title(f"activations per rank at context {block_size}, batch 4", fontsize=8)
    right.legend(fontsize=7)
    save(fig, out_root / "06_3d" / "figures" / "context.png")


def grid_bytes(out_root, work):
    """06: the bytes each rank of a tp 2 x pp 2 x dp 2 grid passed to each axis's communicator in one step of the
    small model, measured against the formula."""
    out = work / "grid_bytes"
    launch("06_3d/train.py", *small(1, out), "--tp", 2, "--pp", 2, "--dp", 2, "--microbatches", 2, ranks=8,
           quiet=True)
    ledger = json.loads((out / "ledger.json").read_text())
    axes_names = ("tp", "pp", "ends", "dp")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    n = len(ledger["ranks"])
    for r, rank in enumerate(ledger["ranks"]):
        got = [sum(rank["comm"][a].values()) / 2 ** 20 for a in axes_names]
        want = [sum(rank["comm_formula"][a].values()) / 2 ** 20 for a in axes_names]
        xs = np.arange(4) * (n + 1) + r
        ax.bar(xs, got, color=f"C{r}", label=f"rank {r}: tp {rank['tp']}, pp {rank['pp']}, dp {rank['dp']}")
        for x, w in zip(xs, want):
            ax.plot([x - 0.4, x + 0.4], [w, w], "k-", lw=1.5)
    ax.set_xticks(np.arange(4) * (n + 1) + (n - 1) / 2, axes_names)
    ax.set_ylabel("MiB per step")
    ax.set_title("bytes per axis, tp 2 x pp 2 x dp 2: measured (bars) = formula (lines)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    save(fig, out_root / "06_3d" / "figures" / "bytes_per_axis.png")


def network_modes(out_root, steps):
    """03: the data-parallel modes on a simulated network (bench/network.py's runs)."""
    bench = import_chapter("bench.network")
    quick = steps < 50
    rows = bench.chapter_03(argparse.Namespace(steps=6 if quick else 30, skip=2 if quick else 4,
                                               rounds=1 if quick else 3))
    fig, ax = plt.subplots(figsize=(7, 3))
    for i, net in enumerate(("off", "ethernet-10g", "ethernet-1g")):
        for j, mode in enumerate(("naive", "bucketed", "overlapped")):
            row, x = rows[f"{net} {mode}"], i * 4 + j
            ax.bar(x, row["ms"], color=f"C{j}", label=mode if i == 0 else None)
            if "predicted" in row:
                ax.plot([x - 0.4, x + 0.4], [row["predicted"]] * 2, "k-", lw=2,
                        label="no network + modelled" if (i, j) == (1, 0) else None)
    ax.set_xticks([1, 5, 9], ["no network", "ethernet-10g", "ethernet-1g"])
    ax.set_ylabel("ms per step")
    ax.set_title("2 ranks: buckets and overlap on a simulated network")
    ax.legend(fontsize=8)
    save(fig, out_root / "03_data_parallel" / "figures" / "network.png")


def summary(single, runs, out_root):
    """The project in one picture: every chapter's loss curve over one core's, and how far apart they get."""
    s1, l1 = losses(single)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [3, 2]})
    left.plot(s1, l1, lw=4, alpha=0.3, color="k", label="one core")
    worst = {}
    for i, (chapter, path) in enumerate(runs.items()):
        s2, l2 = losses(path)
        left.plot(s2, l2, lw=0.8, color=f"C{i}", label=PARALLEL[chapter][2])
        worst[chapter] = float(np.abs(l2 - l1).max())
    left.set_xlabel("step")
    left.set_ylabel("train loss")
    left.set_title("five ways to split the training, one curve", fontsize=10)
    left.legend(fontsize=6)
    right.barh(range(len(worst)), list(worst.values()), color=[f"C{i}" for i in range(len(worst))])
    right.set_yticks(range(len(worst)), [c.split("_", 1)[0] for c in worst])
    right.set_xscale("log")
    right.set_xlim(1e-9, 1e-3)
    right.axvline(np.finfo(np.float32).eps, color="k", lw=0.8, ls="--")
    right.text(np.finfo(np.float32).eps * 1.3, len(worst) - 0.6, "float32 eps", fontsize=7)
    right.set_xlabel("largest |loss - one core's|")
    right.set_title("float32 rounding, nothing more", fontsize=10)
    save(fig, out_root / "figures" / "summary.png")


def single_core_figure(out_root, work, steps=None):
    """01: what the README's default command (nanoGPT's CPU config, 2000 steps) shows: train and val loss from
    ln 65, a uniform guess over the 65 characters, down to about 1.90; `steps`: a shorter schedule instead."""
    out = work / "default"
    shorter = ["--max-iters", steps, "--lr-decay-iters", steps, "--warmup-iters", steps // 2] if steps else []
    launch("01_single_core/train.py", *shorter, "--out-dir", out, quiet=True, timeout=900)
    steps = steps or 2000
    records = read_metrics(out / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*zip(*[(r["step"], r["loss"]) for r in records if "loss" in r]), lw=0.6, alpha=0.7, label="train")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    ax.plot(*zip(*val), "o-", label=f"val (last {val[-1][1]:.3f})")
    ax.axhline(np.log(65), color="gray", ls=":", lw=1, label="ln 65: a uniform guess")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(f"python 01_single_core/train.py: the default model, {steps} steps on one core", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, out_root / "01_single_core" / "figures" / "loss.png")
    return val[-1][1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps of the loss figures (default: 100)")
    parser.add_argument("--out-root", type=Path, default=ROOT, help="where the figure folders go (default: here)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        launch("01_single_core/train.py", *small(args.steps, work / "single"), quiet=True)
        single = work / "single" / "metrics.jsonl"
        quick = args.steps < 50                                     # the tests' setting: each figure made, fast
        single_core_figure(args.out_root, work, steps=args.steps if quick else None)
        runs, bugs = {}, {}
        for chapter, (ranks, flags, label) in PARALLEL.items():
            out = work / chapter
            launch(f"{chapter}/train.py", *small(args.steps, out), *flags, ranks=ranks, quiet=True)
            runs[chapter] = out / "metrics.jsonl"
            overlay(single, runs[chapter], label, args.out_root / chapter / "figures" / "loss.png")
            buggy, verdict, failed = gallery.replay(chapter, ranks, small(args.steps) + flags, work)
            save(gallery.figure(chapter, single, runs[chapter], buggy, verdict),
                 args.out_root / chapter / "figures" / "bug.png", rect=gallery.verdict_room(verdict))
            bugs[chapter] = {"report": gallery.BUGS[chapter].report, "verdict": verdict, "failed rows": failed,
                             "loss": losses(buggy)[1].tolist(), "correct loss": losses(runs[chapter])[1].tolist()}
        summary(single, runs, args.out_root)
        (args.out_root / "figures" / "gallery.json").write_text(json.dumps(bugs, indent=1) + "\n")
        if args.out_root == ROOT:                               # the READMEs quote this run's verdicts
            for chapter, bug in bugs.items():
                readme = ROOT / chapter / "README.md"
                readme.write_text(gallery.quote(readme.read_text(), bug["verdict"]))
        grid_bytes(args.out_root, work)
        concepts = import_chapter("bench.concepts")                 # drawn from the code, no run needed
        concepts.tensor_parallel(args.out_root)
        concepts.zero_stages(args.out_root)
        concepts.pipeline_schedules(args.out_root)
        concepts.grid(args.out_root)
        import_chapter("bench.layouts").layout_comparison(args.out_root, work)
        import_chapter("bench.dp_timeline").overlap_timeline(args.out_root, work, rounds=1 if quick else 5)
        zero_memory(args.out_root, work, ranks=(2,) if quick else (2, 4, 8))
        timelines.pipeline_figures(args.out_root, work, repeats=1 if quick else 3,
                                   microbatches=(1, 4) if quick else timelines.MICROBATCHES)
        recompute_figure(args.out_root, work, rounds=1 if quick else 3, steps=6 if quick else 20)
        precision = import_chapter("bench.precision")         # its 2000-step runs take ~20 minutes: drawn from
        precision.draw(json.loads(precision.RECORD.read_text()),     # the record bench/precision.py keeps
                       args.out_root / "01_single_core" / "figures" / "precision.png")
        experts = import_chapter("bench.experts")             # likewise bench/experts.py's four runs
        experts.draw(json.loads(experts.RECORD.read_text()),
                     args.out_root / "01_single_core" / "figures" / "experts.png")
        context_figure(args.out_root, work, block_size=256 if quick else 1024, sizes=(1, 2) if quick else (1, 2, 4))
        network_modes(args.out_root, args.steps)
    for path in sorted(args.out_root.glob("**/figures/*.png")):
        print(f"{path.relative_to(args.out_root)}  {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
