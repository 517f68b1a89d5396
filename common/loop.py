"""The training every chapter shares: its main() once the state is built (resume, banner, batches, checkpoints)
and the loop inside it (evaluate and checkpoint at intervals, step, log, report progress).

What differs between chapters comes in as the chapter's state and functions: how one step computes and
synchronises gradients (train_step), how a checkpoint is gathered and taken (state.whole, state.load); the
loop itself communicates only to agree on stopping. A loss, val loss or gradient norm that is not finite stops
the run at once, before anything is saved, on every rank alike (each of those values is the same on every rank),
with exit status 3.

SIGTERM (what a batch scheduler sends before it kills a job) and SIGINT (Ctrl-C), on any rank, stop the run after
the step in flight: the ranks agree on it after every step, save a checkpoint, print the command that continues
the run and exit with 128 + the signal's number (143, 130). A further signal while they do so is noted and
ignored: the checkpoint being written completes, and the one before it is replaced only once it has.
"""
import math
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np

from common.checkpoint import read_training_state, save_training_state
from common.config import ConfigError, exit_with
from common.data import batch_offsets, eval_batches, get_batch
from common.memory import check_fits, reuse_freed_memory
from common.metrics import MetricsLog, format_duration, progress_line
from common.model import gpt_layout
from common.network import simulated
from common.optim import Diverged, lr_at

DIVERGED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopping:
    """While active, SIGTERM and SIGINT are noted (the largest signal number seen) instead of ending the process.
    Once the ranks agree to stop, both are ignored until the process ends: a signal reaching a rank on its way out
    would kill it as MPI finalises (Python has put back the default handlers by then), and the launcher would then
    kill the rank still writing the checkpoint."""

    def __init__(self, agree=None):
        self.noted, self.agree, self.previous, self.final = 0, agree, {}, False

    def note(self, signum, frame):
        self.noted = max(self.noted, signum)

    def agreed(self):
        """The signal to stop on (the largest any rank noted), or 0; with `agree`, a collective."""
        signum = self.agree(self.noted) if self.agree else self.noted
        if signum:
            self.final = True
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        return signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        if not self.final:
            for s, handler in self.previous.items():
                signal.signal(s, handler)


def stop_signalled(train_cfg, step, signum, save, log, verbose, resume):
    """After step `step`: save the state before step + 1, say how to continue, exit with 128 + signum."""
    save(step + 1)
    name = signal.Signals(signum).name
    if log:
        log.log(step=step, stopped=name)
        log.close()
    if verbose:
        print(f"stopped by {name} after step {step}: {train_cfg.out_dir}/ckpt.npz holds step {step + 1}; "
              f"continue with: {resume}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def stop_diverged(train_cfg, step, what, saved, log, verbose):
    """One line on what went wrong and what to try; the last checkpoint (`saved`: its step) stays as it was."""
    if log:
        log.log(step=step, diverged=what)
        log.close()
    if verbose:
        kept = (f"{train_cfg.out_dir}/ckpt.npz of step {saved} is left as it was" if saved is not None else
                "this run wrote no checkpoint")
        tries = f"lower --learning-rate (it is {train_cfg.learning_rate:g})" + (
            " or clip with --grad-clip 1.0" if train_cfg.grad_clip == 0 else "")
        print(f"error: training diverged at step {step}: {what}; stopped, {kept}; {tries}", file=sys.stderr,
              flush=True)
    sys.exit(DIVERGED)


def run_training(train_cfg, start_step, tokens_per_step, train_step, evaluate, save, metrics_path, verbose=True,
                 agree=None, resume="--resume", status=dict):
    """Steps start_step..max_iters-1 with nanoGPT's cadence: evaluate and save at every eval_interval and at
    the end. train_step(step, lr) -> loss; evaluate() -> val loss; save(step) writes the state before `step`.
    agree(n) -> the largest n over the ranks (a collective; one process: n itself): the signal to stop on, if
    any; `resume`: the command that continues a stopped run; status() -> what else the step did, logged with
    it (fp16: the loss scale, and whether the step was skipped; experts: their routing)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), Stopping(agree) as stopping:
        _run(train_cfg, start_step, tokens_per_step, train_step, evaluate, save, metrics_path, verbose,
             stopping.agreed, resume, status)


def _run(train_cfg, start_step, tokens_per_step, train_step, evaluate, save, metrics_path, verbose, signalled,
         resume, status):
    log = MetricsLog(metrics_path, start_step) if metrics_path else None
    t_start, steps_done, saved = time.perf_counter(), 0, (start_step if start_step else None)
    for step in range(start_step, train_cfg.max_iters + 1):
        if step % train_cfg.eval_interval == 0 or step == train_cfg.max_iters:
            val = evaluate()
            if not math.isfinite(val):
                stop_diverged(train_cfg, step, f"the val loss is {val}", saved, log, verbose)
            if log:
                log.log(step=step, val_loss=val)
            if verbose:
                print(f"step {step:>5}/{train_cfg.max_iters} | val loss {val:.4f}", flush=True)
            if step > start_step or step == train_cfg.max_iters:
                save(step)
                saved = step
        if step == train_cfg.max_iters:
            break
        lr = lr_at(step, train_cfg)
        t0 = time.perf_counter()
        try:
            loss = train_step(step, lr)
        except Diverged as e:                       # raised before the optimizer step: weights still good
            stop_diverged(train_cfg, step, str(e), saved, log, verbose)
        if not math.isfinite(loss):
            stop_diverged(train_cfg, step, f"the loss is {loss}", saved, log, verbose)
        dt = time.perf_counter() - t0
        steps_done += 1
        update = status()
        if log:
            log.log(step=step, loss=loss, lr=lr, ms=dt * 1e3, tokens_per_s=tokens_per_step / dt, **update)
        if verbose and update.get("skipped"):           # fp16's overflow: not a divergence, the scale adapts
            print(f"step {step:>5}: gradients not finite, step skipped; loss scale now {update['loss_scale']:g}",
                  flush=True)
        if verbose and (step % train_cfg.log_interval == 0 or step == train_cfg.max_iters - 1):
            elapsed = time.perf_counter() - t_start
            eta = elapsed / steps_done * (train_cfg.max_iters - step - 1)
            print(progress_line(step, train_cfg.max_iters, loss, dt * 1e3, tokens_per_step / dt, eta), flush=True)
        signum = signalled()
        if signum:
            stop_signalled(train_cfg, step, signum, save, log, verbose, resume)
    if log:
        log.close()
    if verbose:
        print(f"done in {format_duration(time.perf_counter() - t_start)}", flush=True)


def prepare(comm, setup, argv, memory_estimate, also=""):
    """What a parallel chapter's main() checks on every rank of `comm` (the world) before any work: setup(argv,
    world size) (configs and data) and whether the ranks of each host fit in its memory, by
    memory_estimate(gpt_cfg, train_cfg, par) (`also`: the chapter's ways to shrink the model state besides a
    smaller model, e.g. "raise --tp"); a mistake is one line from rank 0 and exit status 2 on every rank. Then
    the allocator is tuned. Returns the world the run uses (on the simulated network, with --network: every
    communicator split from it inherits the model), setup's result and the memory Budget."""
    configs = _checked(comm, setup, argv, comm.size)
    gpt_cfg, train_cfg, *_, par = configs
    budget = _checked(comm, check_fits, memory_estimate(gpt_cfg, train_cfg, par), comm.host.comm,
                      (gpt_cfg, train_cfg), also)
    reuse_freed_memory()
    return simulated(comm, par), configs, budget


def train(state, tokens, val_tokens, train_step, evaluate, budget, banner, threads, comm=None, before_step=None,
          after_step=None, report=None):
    """A chapter's main() once its `state` is built: resume from <out_dir>/ckpt.npz if asked, print the banner
    (what the chapter built, the threads, the memory), run the loop on batch k = f(seed, k) of `tokens` with
    train_step(state, (x, y), lr) and evaluate(state, val batches), save state.whole() (a collective) at every
    evaluation, and print the measured memory. `state` has gpt_cfg, train_cfg, opt, held (a
    common.memory.Transient holding the caches train_step keeps), whole() -> the single-core
    {"params" | "adam_m" | "adam_v": {name: tensor}} on the rank that writes (None elsewhere), and load(that).
    `comm`: every rank of the job (None: one process); before_step(step) and after_step(step, first) run around
    each step (a ledger reset; a check of the replicas, the first step's figures); report() -> what else the log
    records of each step (the experts' routing)."""
    gpt_cfg, train_cfg = state.gpt_cfg, state.train_cfg
    leader = comm is None or comm.rank == 0
    ckpt = Path(train_cfg.out_dir) / "ckpt.npz"
    start, scaler = 0, getattr(state.opt, "scaler", None)
    if train_cfg.resume:
        whole, state.opt.t, start, loss_scale = _checked(comm, read_training_state, ckpt,
                                                         gpt_layout(gpt_cfg).shapes, train_cfg.max_iters)
        state.load(whole)
        if scaler and scaler.dynamic and loss_scale:    # fp16 goes on at the scale it had reached
            scaler.restore(loss_scale)
        del whole
    if leader:
        network = getattr(comm, "network", None)
        modelled = f"\n{network.describe()}" if network else ""
        print(banner + (f", resuming at step {start}" if start else "") + f"\nruntime: {threads}{modelled}\n"
              f"{budget.banner('per rank' if comm is None or comm.size == 1 else 'on rank 0')}", flush=True)
    T, B = gpt_cfg.block_size, train_cfg.batch_size
    val_batches = eval_batches(val_tokens, train_cfg, T)

    def step_fn(step, lr):
        x, y = get_batch(tokens, batch_offsets(len(tokens), T, B, train_cfg.seed, step), T)
        if before_step:
            before_step(step)
        loss = train_step(state, (x, y), lr)
        if after_step:
            after_step(step, first=step == start)
        return loss

    def save(step):
        whole = state.whole()
        if leader:
            save_training_state(ckpt, whole, state.opt.t, step, gpt_cfg, train_cfg,
                                scaler.state() if scaler else None)

    run_training(train_cfg, start, B * T, step_fn, evaluate=lambda: evaluate(state, val_batches), save=save,
                 metrics_path=Path(train_cfg.out_dir) / "metrics.jsonl" if leader else None, verbose=leader,
                 agree=comm.agree if comm is not None else None, resume=resume_command(comm),
                 status=lambda: {**state.opt.status(), **(report() if report else {})})
    if leader:
        print(budget.summary(state.held.peak["activations"]))


def resume_command(comm):
    """The command line that started this run, with --resume: how a stopped run continues."""
    argv = ["python", *sys.argv] + ([] if "--resume" in sys.argv else ["--resume"])
    launcher = f"mpirun -n {comm.size} " if comm is not None and comm.size > 1 else ""
    return launcher + shlex.join(argv)


def _checked(comm, fn, *args):
    """fn(*args), a ConfigError reported as one line on rank 0 with exit status 2 on every rank."""
    if comm is not None:
        from common.comm import checked        # here, not at the top: one process needs no MPI
        return checked(comm, fn, *args)
    try:
        return fn(*args)
    except ConfigError as e:
        exit_with(e)

