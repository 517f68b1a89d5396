"""Train the GPT with its weights split across MPI ranks (Megatron-LM tensor parallelism).

    mpirun -n 2 python 02_tensor_parallel/train.py                     # --tp defaults to the number of ranks
    mpirun -n 4 python 02_tensor_parallel/train.py --max-iters 200 --out-dir out/tp4
    mpirun -n 2 python 02_tensor_parallel/train.py --sequence-parallel
    python 01_single_core/sample.py --out-dir out/tp4                  # checkpoints are layout-independent

Every rank reads the same batch: tensor parallelism splits the model, not the data. What differs from
01_single_core/train.py is where the weights live and how a step computes: see tensor_parallel.py.
"""
from pathlib import Path

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import read_training_state, save_training_state
from common.comm import checked, world
from common.data import batch_offsets, eval_batches, get_batch
from common.loop import run_training
from common.memory import check_fits, estimate, reuse_freed_memory
from common.model import gpt_layout, init_params
from common.optim import AdamW, clip_grad_norm, decays

single = import_chapter("01_single_core.train")
tp_lib = import_chapter("02_tensor_parallel.tensor_parallel")


def setup(argv, world_size):
    gpt_cfg, cfg, train, val, par = single.setup(argv, chapter=Path(__file__).parent.name, description=__doc__,
                                                 defaults={"out_dir": "out/tensor_parallel"},
                                                 shown={"tp": "every rank"})
    par.use_every_rank("tp", world_size)
    tp_lib.check_layout(gpt_cfg, par.tp, par.sequence_parallel)
    return gpt_cfg, cfg, train, val, par


def memory_estimate(gpt_cfg, cfg, par):
    """{kind: bytes} one rank will hold: its shards, their gradient and AdamW, its part of the activations."""
    n = tp_lib.tp_layout(gpt_cfg, par.tp).size
    return estimate(gpt_cfg, np.dtype(cfg.dtype).itemsize, params=n, grads=n, optimizer=n, rows=cfg.batch_size,
                    blocks=gpt_cfg.n_layer, tp_size=par.tp, sp=par.sequence_parallel)


def train_step(p, g, params, grads, opt, x, y, gpt_cfg, cfg, lr, layout, tp, sp):
    """One optimizer step; the same loss on every rank, each rank updating its own shards."""
    grads.fill(0)
    _, loss, cache = tp_lib.tp_forward(p, x, y, gpt_cfg, tp, sp)
    tp_lib.tp_backward(cache, p, g, tp, sp)
    clip_grad_norm(grads, cfg.grad_clip, tp_lib.grad_norm(grads, layout, tp))
    opt.step(params, grads, lr)
    return loss


def main(argv=None):
    tp = world()
    gpt_cfg, cfg, train, val, par = checked(tp, setup, argv, tp.size)
    budget = checked(tp, check_fits, memory_estimate(gpt_cfg, cfg, par), tp.host.comm)
    reuse_freed_memory()
    dtype = np.dtype(cfg.dtype)
    layout, local = gpt_layout(gpt_cfg), tp_lib.tp_layout(gpt_cfg, tp.size)
    # every rank draws the whole single-core initialisation from the same seed and keeps its shards, so the
    # two models start identical with no communication
    params = tp_lib.shard(layout.views(init_params(gpt_cfg, cfg.seed, dtype)), local, gpt_cfg, tp.size, tp.rank, dtype)
    grads = np.zeros_like(params)
    p, g = local.views(params), local.views(grads)
    opt = AdamW(local.mask(decays), cfg.beta1, cfg.beta2, cfg.weight_decay, dtype=dtype)
    ckpt = Path(cfg.out_dir) / "ckpt.npz"
    start = 0
    if cfg.resume:
        state, opt.t, start = checked(tp, read_training_state, ckpt, layout.shapes, cfg.max_iters)
        for flat, part in ((params, "params"), (opt.m, "adam_m"), (opt.v, "adam_v")):
            flat[...] = tp_lib.shard(state[part], local, gpt_cfg, tp.size, tp.rank, dtype)
    if tp.rank == 0:
        print(f"{layout.size:,} parameters, {local.size:,} on each of {tp.size} ranks, {cfg.dtype}, "
              f"batch {cfg.batch_size} x {gpt_cfg.block_size} tokens" +
              (f", resuming at step {start}" if start else "") +
              f"\nruntime: {tp.host.threads}\n{budget.banner()}")

    val_batches = eval_batches(val, cfg, gpt_cfg.block_size)

    def step_fn(step, lr):
        offsets = batch_offsets(len(train), gpt_cfg.block_size, cfg.batch_size, cfg.seed, step)
        x, y = get_batch(train, offsets, gpt_cfg.block_size)
        return train_step(p, g, params, grads, opt, x, y, gpt_cfg, cfg, lr, local, tp, par.sequence_parallel)

    def evaluate():
        return float(np.mean([tp_lib.tp_forward(p, x, y, gpt_cfg, tp, par.sequence_parallel)[1]
                              for x, y in val_batches]))

    def save(step):
        state = {part: tp_lib.unshard(flat, local, gpt_cfg, tp)
                 for part, flat in (("params", params), ("adam_m", opt.m), ("adam_v", opt.v))}
        if tp.rank == 0:
            save_training_state(ckpt, state, opt.t, step, gpt_cfg, cfg)

    run_training(cfg, start, cfg.batch_size * gpt_cfg.block_size, step_fn, evaluate, save,
                 metrics_path=Path(cfg.out_dir) / "metrics.jsonl" if tp.rank == 0 else None, verbose=tp.rank == 0)
    if tp.rank == 0:
        print(budget.summary())


if __name__ == "__main__":
    main()
