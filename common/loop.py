"""The training loop every chapter shares: evaluate and checkpoint at intervals, step, log, report progress.

What differs between chapters, how one step computes and synchronises gradients, and how a checkpoint is
gathered, comes in as functions; the loop itself never communicates. A loss, val loss or gradient norm that
is not finite stops the run at once, before anything is saved, on every rank alike (each of those values is
the same on every rank), with exit status 3.
"""
import math
import sys
import time

import numpy as np

from common.metrics import MetricsLog, format_duration, progress_line
from common.optim import Diverged, lr_at

DIVERGED = 3


def stop_diverged(cfg, step, what, saved, log, verbose):
    """One line on what went wrong and what to try; the last checkpoint (`saved`: its step) stays as it was."""
    if log:
        log.log(step=step, diverged=what)
        log.close()
    if verbose:
        kept = (f"{cfg.out_dir}/ckpt.npz of step {saved} is left as it was" if saved is not None else
                "this run wrote no checkpoint")
        tries = f"lower --learning-rate (it is {cfg.learning_rate:g})" + (
            " or clip with --grad-clip 1.0" if cfg.grad_clip == 0 else "")
        print(f"error: training diverged at step {step}: {what}; stopped, {kept}; {tries}", file=sys.stderr,
              flush=True)
    sys.exit(DIVERGED)


def run_training(cfg, start_step, tokens_per_step, train_step, evaluate, save, metrics_path, verbose=True):
    """Steps start_step..max_iters-1 with nanoGPT's cadence: evaluate and save at every eval_interval and at
    the end. train_step(step, lr) -> loss; evaluate() -> val loss; save(step) writes the state before `step`."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _run(cfg, start_step, tokens_per_step, train_step, evaluate, save, metrics_path, verbose)


def _run(cfg, start_step, tokens_per_step, train_step, evaluate, save, metrics_path, verbose):
    log = MetricsLog(metrics_path, start_step) if metrics_path else None
    t_start, steps_done, saved = time.perf_counter(), 0, (start_step if start_step else None)
    for step in range(start_step, cfg.max_iters + 1):
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            val = evaluate()
            if not math.isfinite(val):
                stop_diverged(cfg, step, f"the val loss is {val}", saved, log, verbose)
            if log:
                log.log(step=step, val_loss=val)
            if verbose:
                print(f"step {step:>5}/{cfg.max_iters} | val loss {val:.4f}", flush=True)
            if step > start_step or step == cfg.max_iters:
                save(step)
                saved = step
        if step == cfg.max_iters:
            break
        lr = lr_at(step, cfg)
        t0 = time.perf_counter()
        try:
            loss = train_step(step, lr)
        except Diverged as e:                       # raised before the optimizer step: weights still good
            stop_diverged(cfg, step, str(e), saved, log, verbose)
        if not math.isfinite(loss):
            stop_diverged(cfg, step, f"the loss is {loss}", saved, log, verbose)
        dt = time.perf_counter() - t0
        steps_done += 1
        if log:
            log.log(step=step, loss=loss, lr=lr, ms=dt * 1e3, tokens_per_s=tokens_per_step / dt)
        if verbose and (step % cfg.log_interval == 0 or step == cfg.max_iters - 1):
            elapsed = time.perf_counter() - t_start
            eta = elapsed / steps_done * (cfg.max_iters - step - 1)
            print(progress_line(step, cfg.max_iters, loss, dt * 1e3, tokens_per_step / dt, eta), flush=True)
    if log:
        log.close()
    if verbose:
        print(f"done in {format_duration(time.perf_counter() - t_start)}", flush=True)
