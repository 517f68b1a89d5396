"""The training loop every chapter shares: evaluate and checkpoint at intervals, step, log, report progress.

What differs between chapters, how one step computes and synchronises gradients, and how a checkpoint is
gathered, comes in as functions; the loop itself never communicates.
"""
import time

from common.metrics import MetricsLog, format_duration, progress_line
from common.optim import lr_at


def run_training(cfg, start_step, tokens_per_step, train_step, evaluate, save, metrics_path, verbose=True):
    """Steps start_step..max_iters-1 with nanoGPT's cadence: evaluate and save at every eval_interval and at
    the end. train_step(step, lr) -> loss; evaluate() -> val loss; save(step) writes the state before `step`."""
    log = MetricsLog(metrics_path, start_step) if metrics_path else None
    t_start, steps_done = time.perf_counter(), 0
    for step in range(start_step, cfg.max_iters + 1):
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            val = evaluate()
            if log:
                log.log(step=step, val_loss=val)
            if verbose:
                print(f"step {step:>5}/{cfg.max_iters} | val loss {val:.4f}", flush=True)
            if step > start_step or step == cfg.max_iters:
                save(step)
        if step == cfg.max_iters:
            break
        lr = lr_at(step, cfg)
        t0 = time.perf_counter()
        loss = train_step(step, lr)
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
