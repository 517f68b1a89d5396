"""Mixed precision on one core, measured: chapter 01's default 2000-step run in fp32, bf16 and fp16 (with dynamic
loss scaling, and without: --loss-scale 1), how many gradient elements fp16 loses without the scale, and the time
per step of each precision.

    python bench/precision.py                  # the four runs two at a time (~12 minutes on 2 cores), then timing
    python bench/precision.py --timing-only    # only the time per step: 3 alternating rounds of 60 steps

Writes 01_single_core/figures/precision.json (the runs' curves, the underflow shares, the timings) and
precision.png, which chapter 01's README shows and its notebook plots again.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.chapters import import_chapter  # noqa: E402
from common.checkpoint import load_model  # noqa: E402
from common.config import GPTConfig, TrainConfig  # noqa: E402
from common.metrics import read_metrics  # noqa: E402
from common.precision import flushed  # noqa: E402

RUNS = {"fp32": [], "bf16": ["--precision", "bf16"], "fp16": ["--precision", "fp16"],
        "fp16, no loss scaling": ["--precision", "fp16", "--loss-scale", "1"]}
FIGURES = ROOT / "01_single_core" / "figures"
RECORD = FIGURES / "precision.json"


def launch(flags, out, threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, str(ROOT / "01_single_core" / "train.py"), "--out-dir", str(out),
                             "--log-interval", "500", *map(str, flags)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def curves(work, runs=RUNS, also=None):
    """Chapter 01's default run with each of `runs`' flags, two at a time with one BLAS thread each: {run: {steps,
    loss, val_steps, val, ...}}, the train loss every 10 steps (the mean of those 10), and what also(train
    records) adds (here: fp16's loss scale and skipped steps)."""
    also = also or scaling
    out, names = {}, list(runs)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
        procs = {name: launch(runs[name], work / folder(name), 1) for name in pair}
        for name, proc in procs.items():
            _, err = proc.communicate()
            assert proc.returncode == 0, f"{name}: {err}"
            rows = read_metrics(work / folder(name) / "metrics.jsonl")
            train = [r for r in rows if "loss" in r]
            val = [r for r in rows if "val_loss" in r]
            loss = np.array([r["loss"] for r in train])
            out[name] = {"steps": list(range(0, len(loss), 10)),
                         "loss": [float(x) for x in loss.reshape(-1, 10).mean(axis=1)],
                         "val_steps": [r["step"] for r in val], "val": [r["val_loss"] for r in val], **also(train)}
    return out


def folder(name):
    """The out-dir of run `name` under the work folder."""
    return name.replace(", ", "-").replace(" ", "-")


def scaling(train):
    """fp16's loss scale every 10 steps, and the steps it skipped."""
    return {"loss_scale": [r.get("loss_scale") for r in train][::10], "skipped": [r["step"] for r in train
                                                                                   if r.get("skipped")]}


def underflow(precision, loss_scale, weights=None, seed=0):
    """The share of the default model's gradient elements (on one batch, at init or at float32 `weights`) that
    are zero in `precision` with `loss_scale` (1: none) where float32's are not: flushed to zero on the way."""
    train = import_chapter("01_single_core.train")
    gpt_cfg = GPTConfig(vocab_size=65)
    rng = np.random.default_rng(seed)
    x, y = (rng.integers(0, 65, (12, gpt_cfg.block_size)) for _ in range(2))
    grads = {}
    for name, cfg in (("fp32", TrainConfig()), (precision, TrainConfig(precision=precision, loss_scale=loss_scale))):
        np.seterr(over="ignore")
        s = train.build(gpt_cfg, cfg)
        if weights is not None:
            s.load({"params": s.layout.views(weights), "adam_m": s.layout.views(np.zeros_like(weights)),
                    "adam_v": s.layout.views(np.zeros_like(weights))})
        _, _, cache = train.gpt_forward(s.p, x, y, gpt_cfg)
        train.gpt_backward(cache, s.p, s.g, dloss=s.opt.loss_scale)
        grads[name] = s.grads.astype(np.float32)
    return flushed(grads[precision], grads["fp32"])              # (an fp16 overflow is inf: not counted)


def underflows(work):
    """underflow() of fp16 unscaled, fp16 scaled (2^16) and bf16, at init and at the end of the fp32 run."""
    trained = load_model(work / "fp32" / "ckpt.npz")[1]
    cases = {"fp16, no loss scaling": ("fp16", 1.0), "fp16, scale 2^16": ("fp16", 0.0), "bf16": ("bf16", 0.0)}
    return {when: {name: underflow(*case, weights=weights) for name, case in cases.items()}
            for when, weights in (("init", None), ("trained", trained))}


def timing(work, runs=None, rounds=3, steps=60):
    """ms/step of each of `runs` (default: each precision): the median of steps 10..steps-1, `rounds` rounds taken
    in turn (fp32, bf16, fp16, ...), with the machine's whole BLAS pool: {run: [median of each round]}."""
    runs = runs or {name: RUNS[name] for name in ("fp32", "bf16", "fp16")}
    out = {name: [] for name in runs}
    for _ in range(rounds):
        for name, flags in runs.items():
            run = work / f"time-{folder(name)}"
            proc = launch([*flags, "--max-iters", steps, "--eval-interval", 10 * steps, "--eval-iters", 1], run,
                          os.cpu_count())
            _, err = proc.communicate()
            assert proc.returncode == 0, err
            ms = [r["ms"] for r in read_metrics(run / "metrics.jsonl") if "ms" in r][10:]
            out[name].append(float(np.median(ms)))
    return out


def draw(record, path):
    """The four runs' train and val losses, and each one's difference from fp32's, to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    save = import_chapter("bench.plots").save
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for i, (name, run) in enumerate(record["runs"].items()):
        top.plot(run["steps"], run["loss"], lw=1, color=f"C{i}", alpha=0.8, label=f"{name}: val {run['val'][-1]:.3f}")
        top.plot(run["val_steps"], run["val"], "o", ms=3, color=f"C{i}")
    top.set_ylim(1.0, 3.5)
    top.set_ylabel("train loss (dots: val)")
    top.legend()
    top.set_title("chapter 01's default run, 2000 steps, in each precision")
    fp32 = np.array(record["runs"]["fp32"]["loss"])
    for i, (name, run) in enumerate(record["runs"].items()):
        if name != "fp32":
            bottom.plot(run["steps"], np.array(run["loss"]) - fp32, lw=1, color=f"C{i}")
    bottom.axhline(0, color="gray", lw=0.5)
    bottom.set_ylabel("minus fp32")
    bottom.set_xlabel("step")
    save(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing-only", action="store_true", help="measure the time per step, keep the curves")
    parser.add_argument("--work", default=str(ROOT / "out" / "bench_precision"), help="where the runs write")
    args = parser.parse_args(argv)
    work, path = Path(args.work), RECORD
    record = json.loads(path.read_text()) if args.timing_only else {}
    if not args.timing_only:
        record["runs"] = curves(work)
        record["underflow"] = underflows(work)
    record["ms_per_step"] = timing(work)
    FIGURES.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    draw(record, FIGURES / "precision.png")
    for name, run in record.get("runs", {}).items():
        print(f"{name:<24} val {run['val'][-1]:.4f}  skipped {len(run['skipped'])}")
    print("underflow:", record.get("underflow"))
    print("ms/step:", {k: [round(v, 1) for v in vs] for k, vs in record["ms_per_step"].items()})


if __name__ == "__main__":
    main()
