"""Metrics: one JSON line per training step (and per evaluation), a progress line, and loss-curve plots."""
import json
from pathlib import Path


class MetricsLog:
    """Appends JSON lines to `path`; on resume from `start_step`, first drops lines from steps not yet redone."""

    def __init__(self, path, start_step=0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] < start_step] if start_step else []
        self.file = open(self.path, "w")
        for record in kept:
            self.log(**record)

    def log(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def read_metrics(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_duration(seconds):
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step, max_iters, loss, ms, tokens_per_s, eta_s):
    return (f"step {step:>5}/{max_iters} | loss {loss:.4f} | {ms:7.1f} ms/step | "
            f"{tokens_per_s:9,.0f} tok/s | ETA {format_duration(eta_s)}")


def plot_losses(runs, ax=None):
    """Plot train (thin) and val (markers) loss against step for {label: metrics.jsonl path}."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    for label, path in runs.items():
        records = read_metrics(path)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        line, = ax.plot(*zip(*train), lw=0.8, alpha=0.7, label=f"{label} train") if train else (None,)
        if val:
            ax.plot(*zip(*val), "o-", color=line.get_color() if line else None, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    return ax
