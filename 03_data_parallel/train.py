"""Train the GPT with the batch split across MPI ranks (data parallelism), optionally in micro-batches.

    mpirun -n 2 python 03_data_parallel/train.py                       # --dp defaults to the number of ranks
    mpirun -n 2 python 03_data_parallel/train.py --dp-mode naive --grad-accum 2
    mpirun -n 4 python 03_data_parallel/train.py --batch-size 48 --dp-mode bucketed --bucket-mb 0.5

Every rank draws the same global batch (the sampler is a function of seed and step) and keeps its rows;
what differs from 01_single_core/train.py is the loss scale and the all-reduce: see data_parallel.py.
"""
from pathlib import Path

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import save_training_state, single_core_state, load_training_state
from common.comm import checked, world
from common.config import ConfigError
from common.data import batch_offsets, eval_batches, get_batch
from common.loop import run_training
from common.memory import check_fits, estimate, reuse_freed_memory
from common.model import gpt_backward, gpt_forward
from common.optim import clip_grad_norm

single = import_chapter("01_single_core.train")
dp_lib = import_chapter("03_data_parallel.data_parallel")


def setup(argv, world_size, chapter=Path(__file__).parent.name, description=__doc__, defaults=None):
    gpt_cfg, cfg, train, val, par = single.setup(argv, chapter=chapter, description=description,
                                                 defaults={"out_dir": "out/data_parallel", **(defaults or {})},
                                                 shown={"dp": "every rank"})
    par.use_every_rank("dp", world_size)
    if cfg.batch_size % (par.dp * par.grad_accum):
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --dp {par.dp} x --grad-accum "
                          f"{par.grad_accum}; choose a multiple of {par.dp * par.grad_accum}")
    return gpt_cfg, cfg, train, val, par


def memory_estimate(gpt_cfg, cfg, par):
    """{kind: bytes} one rank will hold: the whole model, gradient and AdamW, one micro-batch's activations."""
    n = single.gpt_layout(gpt_cfg).size
    return estimate(gpt_cfg, np.dtype(cfg.dtype).itemsize, params=n, grads=n, optimizer=n,
                    rows=cfg.batch_size // (par.dp * par.grad_accum), blocks=gpt_cfg.n_layer)


def train_step(p, g, params, grads, opt, x, y, gpt_cfg, cfg, par, dp, sync, lr):
    """One optimizer step on the global batch (x, y): this rank's micro-batches, one all-reduce, AdamW."""
    grads.fill(0)
    loss = np.zeros(1)
    for micro in range(par.grad_accum):
        rows = dp_lib.micro_batch_rows(cfg.batch_size, dp.size, par.grad_accum, dp.rank, micro)
        _, micro_loss, cache = gpt_forward(p, x[rows], y[rows], gpt_cfg)
        last = micro == par.grad_accum - 1                       # communicate only once the sum is complete
        gpt_backward(cache, p, g, dloss=1.0 / (dp.size * par.grad_accum), grads_ready=sync.ready if last else None)
        loss += micro_loss / (dp.size * par.grad_accum)
    sync.finish()
    dp.allreduce(loss)                                           # the global batch's mean loss, for the log
    clip_grad_norm(grads, cfg.grad_clip)                         # the same gradient, so the same norm, everywhere
    opt.step(params, grads, lr)
    return float(loss[0])


def main(argv=None):
    dp = world()
    gpt_cfg, cfg, train, val, par = checked(dp, setup, argv, dp.size)
    budget = checked(dp, check_fits, memory_estimate(gpt_cfg, cfg, par), dp.host.comm)
    reuse_freed_memory()
    layout, params, grads, opt = single.build(gpt_cfg, cfg)      # the whole model on every rank
    p, g = layout.views(params), layout.views(grads)
    sync = dp_lib.GradSync(par.dp_mode, layout, grads, dp, par.bucket_mb)
    ckpt = Path(cfg.out_dir) / "ckpt.npz"
    start = checked(dp, load_training_state, ckpt, layout, params, opt, cfg.max_iters) if cfg.resume else 0
    if dp.rank == 0:
        print(f"{layout.size:,} parameters on each of {dp.size} ranks, {cfg.dtype}, global batch {cfg.batch_size} "
              f"x {gpt_cfg.block_size} tokens in {par.grad_accum} micro-batch(es) per rank, {par.dp_mode} "
              f"all-reduce in {len(sync.buckets)} buckets" + (f", resuming at step {start}" if start else "") +
              f"\nruntime: {dp.host.threads}\n{budget.banner()}")
    val_batches = eval_batches(val, cfg, gpt_cfg.block_size)

    def step_fn(step, lr):
        offsets = batch_offsets(len(train), gpt_cfg.block_size, cfg.batch_size, cfg.seed, step)
        x, y = get_batch(train, offsets, gpt_cfg.block_size)
        loss = train_step(p, g, params, grads, opt, x, y, gpt_cfg, cfg, par, dp, sync, lr)
        if par.check_replicas and (step + 1) % par.check_replicas == 0:
            dp_lib.check_replicas(params, dp, step)
        return loss

    def save(step):
        if dp.rank == 0:                                         # replicas are identical: one writes
            save_training_state(ckpt, single_core_state(layout, params, opt), opt.t, step, gpt_cfg, cfg)

    run_training(cfg, start, cfg.batch_size * gpt_cfg.block_size, step_fn,
                 evaluate=lambda: dp_lib.mean_over_replicas(val_batches, dp,
                                                            lambda x, y: gpt_forward(p, x, y, gpt_cfg)[1]),
                 save=save,
                 metrics_path=Path(cfg.out_dir) / "metrics.jsonl" if dp.rank == 0 else None, verbose=dp.rank == 0)
    if dp.rank == 0:
        print(budget.summary())


if __name__ == "__main__":
    main()
