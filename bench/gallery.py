"""The bug gallery: for each parallel chapter, one real-world bug from a public report, replayed on this code.

Each bug is a patch (Python lines run before the chapter's script starts) that breaks the code the way the
report describes. Trained with it, the model learns: its loss falls beside the correct run's. Only the exact
comparison sees it: verify.py, run with the same patch, FAILs. bench/figures.py (`make figures`) draws each one
into <chapter>/figures/bug.png and keeps the verdicts in figures/gallery.json.
"""
import textwrap
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from common.chapters import patched
from common.metrics import read_metrics
from common.notebook import launch


@dataclass(frozen=True)
class Bug:
    report: str             # where it was reported: owner/repository#number
    title: str              # the report's title
    what: str               # what goes wrong, in this code's terms
    patch: str              # Python lines, import_chapter in scope
    train_flags: tuple = ()     # besides the chapter's own flags in bench/figures.py
    verify_flags: tuple = ()

    @property
    def url(self):
        repo, number = self.report.split("#")
        return f"https://github.com/{repo}/issues/{number}"


BUGS = {
    "02_tensor_parallel": Bug(
        "NVIDIA/Megatron-LM#1446", "final_layernorm gradient mismatch when TP+SP enabled",
        "with sequence parallelism each tp rank sees its own part of the sequence, so its LayerNorm gradients are "
        "partial sums; left un-summed, every rank steps its copy of the LayerNorms differently and the copies drift",
        "tp_lib = import_chapter('02_tensor_parallel.tensor_parallel')\n"
        "tp_lib.sync_replicated_grads = lambda *args: None               # LayerNorm grads stay partial sums",
        verify_flags=("--sequence-parallel",)),
    "03_data_parallel": Bug(
        "modelscope/FunASR#3472", "align DDP no_sync with gradient accumulation",
        "`batch_idx % accum_grad` chose the first micro-batch to all-reduce and kept the last one, the optimizer "
        "step's, local: every replica adds its own later micro-batches to a synchronised first one",
        "dp_lib = import_chapter('03_data_parallel.data_parallel')\n"
        "S = dp_lib.GradSync\n"
        "S.every_microbatch = True                                      # the hook is armed on every backward\n"
        "zero_grad, ready, finish = S.zero_grad, S.ready, S.finish\n"
        "S.zero_grad = lambda self: (setattr(self, 'micro', 0), zero_grad(self))[1]\n"
        "S.ready = lambda self, name: ready(self, name) if self.micro == 0 else None\n"
        "def first_only(self):                                          # ... but fires on the first one only\n"
        "    if self.micro == 0:\n"
        "        finish(self)\n"
        "    self.micro += 1\n"
        "S.finish = first_only",
        train_flags=("--check-replicas", 0)),        # train.py's replica check would stop this run at step 0
    "04_zero": Bug(
        "allenai/open-instruct#1498", "Fix ZeRO-2 discarding gradients during manual accumulation",
        "every backward is taken for the accumulation boundary, so each micro-batch's reduce-scatter overwrites "
        "the gradient shard instead of adding to it: only the last micro-batch's gradient reaches the optimizer",
        "zero_lib = import_chapter('04_zero.zero')\n"
        "reduce_scatter = zero_lib.Zero._reduce_scatter\n"
        "def restart(self, i):                                          # the shard is reset, then written\n"
        "    if self.stage > 1:\n"
        "        self.gshard[self._own(*self.buckets[i])] = 0\n"
        "    reduce_scatter(self, i)\n"
        "zero_lib.Zero._reduce_scatter = restart"),
    "05_pipeline": Bug(
        "deepspeedai/DeepSpeed#7773",
        "Gradients are summed instead of averaged when using gradient accumulation steps with pipeline parallelism",
        "the last stage starts each micro-batch's backward from dloss = 1 instead of 1/M, so the gradient is the "
        "sum of the M micro-batches' gradients, M times the mean's; clipping and Adam's epsilon hide most of it",
        "pipe = import_chapter('05_pipeline.pipeline')\n"
        "backward = pipe.stage_backward\n"
        "pipe.stage_backward = lambda cache, p, g, dout, *args, **kw: backward(\n"
        "    cache, p, g, 1.0 if isinstance(dout, float) else dout, *args, **kw)    # dloss 1, not 1/M"),
    "06_3d": Bug(
        "NVIDIA/Megatron-LM#656", "LM head weights get untied while training",
        "the first stage's embedding and the last stage's LM head are one tied matrix, wte; each end holds a "
        "copy and only half its gradient, and without the sum over the two ends the copies drift apart",
        "grid_lib = import_chapter('06_3d.grid')\n"
        "grid_lib.pipe.sync_tied_embedding = lambda *args: None           # wte's halves never summed",
        verify_flags=("--pp", 2)),
}


def replay(chapter, ranks, flags, work):
    """Train with the chapter's bug (`flags`: the correct run's) and run verify.py with it: (the run's metrics
    path, verify's verdict line, its failed rows)."""
    bug, out = BUGS[chapter], work / f"{chapter}_bug"
    out.mkdir(parents=True, exist_ok=True)
    launch(patched(out / "train.py", bug.patch, f"{chapter}.train", [*flags, *bug.train_flags, "--out-dir", out]),
           ranks=ranks, quiet=True)
    verify = launch(patched(out / "verify.py", bug.patch, f"{chapter}.verify", bug.verify_flags), ranks=ranks,
                    quiet=True, check=False)
    lines = verify.strip().splitlines() or [""]
    return out / "metrics.jsonl", lines[-1], [" ".join(line.split()) for line in lines[:-1] if line.endswith(" FAIL")]


def stable(verdict):
    """What of verify's FAIL line reads the same on every machine: how many tensors failed of how many, and the
    one named first (the worst, ties broken by name); the names after it are not compared, a few may swap with
    another CPU's rounding."""
    counts, culprits = verdict.split(" FAIL: ")[1].split(": ", 1)
    return counts, culprits.split(", ")[0]


def quote(readme, verdict):
    """`readme` (text) with the line that quotes verify's verdict (the line that starts as `verdict` does, up to
    its FAIL) replaced by `verdict`; unchanged if it quotes none."""
    start = verdict.split(" FAIL: ")[0] + " FAIL: "
    return "".join(verdict + "\n" if line.startswith(start) else line for line in readme.splitlines(keepends=True))


def losses(path):
    return np.array([(r["step"], r["loss"]) for r in read_metrics(path) if "loss" in r]).T


def verdict_lines(verdict):
    return textwrap.wrap("verify.py: " + verdict, 105)


def verdict_room(verdict):
    """The tight_layout rect that leaves room below the axes for the verdict's lines."""
    return (0, 0.015 + 0.032 * len(verdict_lines(verdict)), 1, 1)


def figure(chapter, single, correct, buggy, verdict):
    """The bug's loss beside the correct run's (both fall), each one's distance from one core's, and verify.py's
    verdict on the bug, whole, wrapped below the axes (save it with rect=verdict_room(verdict))."""
    bug = BUGS[chapter]
    (_, l0), (s1, l1), (s2, l2) = losses(single), losses(correct), losses(buggy)
    lines = verdict_lines(verdict)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.2 + 0.13 * len(lines)), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1.3]})
    top.plot(s1, l1, lw=3, alpha=0.4, label="correct")
    top.plot(s2, l2, lw=1, color="C3", label="with the bug")
    top.set_ylabel("train loss")
    top.legend()
    top.set_title(textwrap.fill(f"{bug.report}: {bug.title}", 75), fontsize=9)
    for s, l, color, label in ((s1, l1, "C0", "correct"), (s2, l2, "C3", "with the bug")):
        diff = np.abs(l - l0)
        bottom.semilogy(s, np.where(diff > 0, diff, 1e-9), ".", ms=3, color=color, label=label)
    bottom.set_ylim(5e-10, 1)
    bottom.set_yticks([1e-9, 1e-6, 1e-3], ["0 (same bits)", "1e-6", "1e-3"])
    bottom.set_ylabel("|loss - one core's|", fontsize=8)
    bottom.set_xlabel("step")
    fig.text(0.01, 0.008, "\n".join(lines), fontsize=7, family="monospace", color="C3", va="bottom")
    return fig
