"""Train the GPT with ZeRO: data parallelism whose ranks shard the optimizer state (stage 1), the gradients too
(stage 2) and the parameters too (stage 3).

    mpirun -n 4 python 04_zero/train.py --zero-stage 3
    mpirun -n 2 python 04_zero/train.py --zero-stage 2 --grad-accum 2
    mpirun -n 2 python 04_zero/train.py --zero-stage 1 --bucket-mb 0.25

Batches, micro-batches and the loss scale are chapter 03's; where the model state lives is not: see zero.py.
Checkpoints hold whole tensors, so a run can resume on any number of ranks, at any stage, or on one core.
After its first step, rank 0 prints its model-state memory beside the paper's formula and writes that and the
step's communication (measured and formula) to <out_dir>/ledger.json.
"""
import json
from pathlib import Path

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import read_training_state, save_training_state
from common.comm import checked, world
from common.config import ConfigError
from common.data import batch_offsets, eval_batches, get_batch
from common.loop import run_training
from common.memory import check_fits, estimate, reuse_freed_memory
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params, modules
from common.optim import AdamW, decays

dp_train = import_chapter("03_data_parallel.train")
dp_lib = import_chapter("03_data_parallel.data_parallel")
zero_lib = import_chapter("04_zero.zero")


def setup(argv, world_size):
    gpt_cfg, cfg, train, val, par = dp_train.setup(argv, world_size, chapter=Path(__file__).parent.name,
                                                   description=__doc__,
                                                   defaults={"out_dir": "out/zero", "zero_stage": 1, "bucket_mb": 0.25})
    if par.zero_stage not in zero_lib.STAGES:
        raise ConfigError(f"--zero-stage {par.zero_stage} is plain data parallelism: run 03_data_parallel/train.py, "
                          f"or choose stage 1, 2 or 3")
    return gpt_cfg, cfg, train, val, par


def memory_estimate(gpt_cfg, cfg, par):
    """{kind: bytes} one rank will hold: what its stage keeps of the model state (stage 3: its shard and the
    part of the model being gathered; stages 2-3: a gradient bucket besides the shard), one micro-batch's
    activations."""
    layout = gpt_layout(gpt_cfg)
    psi, stage = layout.size, par.zero_stage
    shard = -(-psi // par.dp)
    part = max(sum(int(np.prod(layout.shapes[n])) for n in names) for names in modules(gpt_cfg).values())
    bucket = int(par.bucket_mb * 2 ** 20) // np.dtype(cfg.dtype).itemsize
    return estimate(gpt_cfg, np.dtype(cfg.dtype).itemsize, params=shard + part if stage == 3 else psi,
                    grads=psi if stage == 1 else shard + bucket, optimizer=shard,
                    rows=cfg.batch_size // (par.dp * par.grad_accum), blocks=gpt_cfg.n_layer)


def build(gpt_cfg, cfg, par, dp, params=None):
    """Every rank draws the whole init from the seed (or takes `params`) and keeps what its stage keeps; AdamW
    holds m and v for this rank's shard only."""
    layout = gpt_layout(gpt_cfg)
    params = init_params(gpt_cfg, cfg.seed, np.dtype(cfg.dtype)) if params is None else params
    zero = zero_lib.Zero(par.zero_stage, layout, modules(gpt_cfg), params, dp, par.bucket_mb)
    opt = AdamW(layout.mask(decays)[zero.lo:zero.hi], cfg.beta1, cfg.beta2, cfg.weight_decay, dtype=params.dtype)
    return layout, zero, opt


def train_step(zero, opt, x, y, gpt_cfg, cfg, par, dp, lr):
    """One optimizer step on the global batch (x, y): this rank's micro-batches, then its shard's AdamW step."""
    zero.zero_grad()
    loss = np.zeros(1)
    for micro in range(par.grad_accum):
        rows = dp_lib.micro_batch_rows(cfg.batch_size, dp.size, par.grad_accum, dp.rank, micro)
        _, micro_loss, cache = gpt_forward(zero.p, x[rows], y[rows], gpt_cfg, using=zero.forward_hook)
        # stage 1 sums the micro-batches in its full gradient and reduce-scatters once; stages 2-3 have no
        # full gradient to sum into, so every micro-batch reduce-scatters into the shard
        communicate = micro == par.grad_accum - 1 or zero.stage > 1
        gpt_backward(cache, zero.p, zero.g, dloss=1.0 / (dp.size * par.grad_accum),
                     grads_ready=zero.ready if communicate else None, using=zero.backward_hook)
        if communicate:
            zero.finish()
        loss += micro_loss / (dp.size * par.grad_accum)
    dp.allreduce(loss)
    zero.step(opt, lr, cfg.grad_clip)
    return float(loss[0])


def evaluate(zero, batches, gpt_cfg, dp):
    return dp_lib.mean_over_replicas(batches, dp,
                                     lambda x, y: gpt_forward(zero.p, x, y, gpt_cfg, using=zero.forward_hook)[1])


def ledgers(zero, opt, dp, gpt_cfg, par):
    """This rank's model-state bytes measured from its arrays and the bytes of one step's collectives, each
    beside its formula (zero.py)."""
    itemsize = opt.m.itemsize
    return {"stage": zero.stage, "ranks": dp.size, "parameters": zero.layout.size,
            "memory": zero.memory(opt),
            "memory_formula": zero_lib.memory_formula(zero.stage, zero.layout.size, zero.hi - zero.lo, itemsize),
            "comm": {kind: row["bytes"] for kind, row in dp.ledger.as_dict().items()},
            "comm_formula": zero_lib.comm_formula(zero.stage, zero.layout, gpt_cfg, par.grad_accum, itemsize)}


def memory_table(ledger):
    lines = [f"memory per rank (rank 0, stage {ledger['stage']}, N={ledger['ranks']}):      measured      formula"]
    for kind, nbytes in ledger["memory"].items():
        want = ledger["memory_formula"].get(kind)
        lines.append(f"  {kind:<28} {nbytes / 2 ** 20:9.3f} MiB" + (f" {want / 2 ** 20:9.3f} MiB" if want else ""))
    return "\n".join(lines)


def main(argv=None):
    dp = world()
    gpt_cfg, cfg, train, val, par = checked(dp, setup, argv, dp.size)
    budget = checked(dp, check_fits, memory_estimate(gpt_cfg, cfg, par), dp.host.comm, "--n-layer or --n-embd, or "
                     "raise --zero-stage or the number of ranks")
    reuse_freed_memory()
    layout, zero, opt = build(gpt_cfg, cfg, par, dp)
    ckpt = Path(cfg.out_dir) / "ckpt.npz"
    start = 0
    if cfg.resume:
        state, opt.t, start = checked(dp, read_training_state, ckpt, layout.shapes, cfg.max_iters)
        zero.load_state(state, opt)
        del state
    if dp.rank == 0:
        print(f"{layout.size:,} parameters, ZeRO stage {zero.stage} on {dp.size} ranks ({zero.hi - zero.lo:,} per "
              f"shard), {cfg.dtype}, global batch {cfg.batch_size} x {gpt_cfg.block_size} tokens in "
              f"{par.grad_accum} micro-batch(es) per rank, {len(zero.buckets)} gradient buckets"
              + (f", resuming at step {start}" if start else "") + f"\nruntime: {dp.host.threads}\n{budget.banner()}")
    val_batches = eval_batches(val, cfg, gpt_cfg.block_size)

    def step_fn(step, lr):
        offsets = batch_offsets(len(train), gpt_cfg.block_size, cfg.batch_size, cfg.seed, step)
        x, y = get_batch(train, offsets, gpt_cfg.block_size)
        dp.ledger.reset()
        loss = train_step(zero, opt, x, y, gpt_cfg, cfg, par, dp, lr)
        if step == start and dp.rank == 0:                          # the first step's figures, once
            ledger = ledgers(zero, opt, dp, gpt_cfg, par)
            print(memory_table(ledger))
            (Path(cfg.out_dir) / "ledger.json").write_text(json.dumps(ledger, indent=1))
        if zero.stage < 3 and par.check_replicas and (step + 1) % par.check_replicas == 0:
            dp_lib.check_replicas(zero.params, dp, step)           # stage 3 has no replicas to compare
        return loss

    def save(step):
        state = zero.full_state(opt)                                # a collective: every rank takes part
        if dp.rank == 0:
            save_training_state(ckpt, state, opt.t, step, gpt_cfg, cfg)

    run_training(cfg, start, cfg.batch_size * gpt_cfg.block_size, step_fn,
                 evaluate=lambda: evaluate(zero, val_batches, gpt_cfg, dp), save=save,
                 metrics_path=Path(cfg.out_dir) / "metrics.jsonl" if dp.rank == 0 else None, verbose=dp.rank == 0)
    if dp.rank == 0:
        print(budget.summary())


if __name__ == "__main__":
    main()
