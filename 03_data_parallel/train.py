"""Train the GPT with the batch split across MPI ranks (data parallelism), optionally in micro-batches.

    mpirun -n 2 python 03_data_parallel/train.py                       # --dp defaults to the number of ranks
    mpirun -n 2 python 03_data_parallel/train.py --dp-mode naive --grad-accum 2
    mpirun -n 4 python 03_data_parallel/train.py --batch-size 48 --dp-mode bucketed --bucket-mb 0.5

Every rank draws the same global batch (the sampler is a function of seed and step) and keeps its rows;
what differs from 01_single_core/train.py is the loss scale and the all-reduce: see data_parallel.py. The last
step is timed: rank 0 writes <out_dir>/timeline.json, every rank's forward and backward parts and all-reduces
with start and end times (on a simulated network, --network, the overlap is plain to see).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import common.startup as startup
from common.chapters import import_chapter
from common.comm import Comm, world
from common.config import NETWORK_FLAGS, ConfigError, ParallelConfig
from common.driver import SINGLE, for_training, gpt_backward, gpt_forward
from common.loop import prepare, train
from common.memory import estimate
from common.precision import describe, widths

single = import_chapter("01_single_core.train")
dp_lib = import_chapter("03_data_parallel.data_parallel")


FLAGS = ("dp", "grad_accum", "dp_mode", "bucket_mb", "check_replicas", *NETWORK_FLAGS)


def setup(argv, world_size, chapter=Path(__file__).parent.name, description=__doc__, defaults=None, flags=FLAGS):
    gpt_cfg, train_cfg, tokens, val_tokens, par = startup.setup(
        argv, chapter, description, {"out_dir": "out/data_parallel", **(defaults or {})}, axis="dp",
        world_size=world_size, flags=flags)
    if train_cfg.batch_size % (par.dp * par.grad_accum):
        raise ConfigError(f"--batch-size {train_cfg.batch_size} is not divisible by --dp {par.dp} x --grad-accum "
                          f"{par.grad_accum}; choose a multiple of {par.dp * par.grad_accum}")
    return gpt_cfg, train_cfg, tokens, val_tokens, par


def memory_estimate(gpt_cfg, train_cfg, par):
    """{kind: bytes} one rank will hold: the whole model, gradient and AdamW, one micro-batch's activations."""
    n = single.gpt_layout(gpt_cfg).size
    return estimate(gpt_cfg, widths(train_cfg), params=n, grads=n, optimizer=n,
                    rows=train_cfg.batch_size // (par.dp * par.grad_accum), blocks=gpt_cfg.n_layer,
                    recompute=train_cfg.recompute)


@dataclass
class State(single.State):
    """Chapter 01's state, the whole model on every rank, and the gradient sync over the dp replicas; the model
    runs through the driver (common.driver), whose grads_ready hook starts the sync's reductions."""
    par: ParallelConfig = field(kw_only=True)
    dp: Comm = field(kw_only=True)
    sync: dp_lib.GradSync = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        self.parts, self.evaluating = for_training(SINGLE, self.train_cfg, self.held)

    def whole(self):
        """The replicas are identical: rank 0's tensors (None elsewhere)."""
        return super().whole() if self.dp.rank == 0 else None


def build(gpt_cfg, train_cfg, par, dp):
    """Chapter 01's model on every rank, and its gradient sync in --dp-mode."""
    s = single.build(gpt_cfg, train_cfg)
    sync = dp_lib.GradSync(par.dp_mode, s.layout, s.grads, dp, par.bucket_mb, s.params)
    return State(gpt_cfg, train_cfg, s.layout, s.params, s.grads, s.opt, par=par, dp=dp, sync=sync)


def train_step(state, batch, lr):
    """One optimizer step on the global batch (x, y): this rank's micro-batches, the sync's reduction (after the
    last one; chapter 04's ZeRO-2/3 after every one), the optimizer step."""
    s, (x, y), par, dp, sync = state, batch, state.par, state.dp, state.sync
    sync.zero_grad()
    loss, M = np.zeros(1), par.grad_accum
    for micro in range(M):
        rows = dp_lib.micro_batch_rows(s.train_cfg.batch_size, dp.size, M, dp.rank, micro)
        _, micro_loss, cache = gpt_forward(s.p, x[rows], y[rows], s.gpt_cfg, using=sync.forward_hook, parts=s.parts)
        communicate = micro == M - 1 or sync.every_microbatch       # once the sum is complete
        gpt_backward(cache, s.p, s.g, dloss=s.opt.loss_scale / (dp.size * M),
                     grads_ready=sync.ready if communicate else None, using=sync.backward_hook)
        del cache                                # or it lives on through the next micro-batch's forward
        if communicate:
            sync.finish()
        loss += micro_loss / (dp.size * M)
    dp.allreduce(loss)                                           # the global batch's mean loss, for the log
    sync.step(s.opt, lr, s.train_cfg.grad_clip)
    return float(loss[0])


def evaluate(state, batches):
    return dp_lib.mean_over_replicas(batches, state.dp, lambda x, y: gpt_forward(
        state.p, x, y, state.gpt_cfg, using=state.sync.forward_hook, parts=state.evaluating)[1])


def check_replicas(state, step):
    """Chapter 03's after_step: every --check-replicas steps, the replicas must hold identical parameters."""
    every = state.par.check_replicas
    if every and (step + 1) % every == 0:
        dp_lib.check_replicas(state.params, state.dp, step)


def timeline(state):
    """Every rank's trace of the step just recorded (see GradSync.record) and the buckets, on rank 0 (None
    elsewhere)."""
    sync, par = state.sync, state.par
    ranks = state.dp.gather_object(sync.trace)
    if ranks is None:
        return None
    return {"dp_mode": par.dp_mode, "dp": state.dp.size, "grad_accum": par.grad_accum, "network": par.network,
            "bucket_mb": par.bucket_mb, "buckets": sync.buckets, "itemsize": state.grads.itemsize,
            "ranks": [{"trace": trace} for trace in ranks]}


def after_step(state, step):
    """Check the replicas; after a recorded step (main records the last), write the timeline to <out_dir>."""
    check_replicas(state, step)
    if state.sync.trace is None:
        return
    record = timeline(state)
    state.sync.trace = None                                      # recording stops with the step
    if record is not None:
        (Path(state.train_cfg.out_dir) / "timeline.json").write_text(json.dumps(record))


def main(argv=None):
    dp = world()
    dp, (gpt_cfg, train_cfg, tokens, val_tokens, par), budget = prepare(dp, setup, argv, memory_estimate)
    state = build(gpt_cfg, train_cfg, par, dp)
    last = train_cfg.max_iters - 1
    train(state, tokens, val_tokens, train_step, evaluate, budget, threads=dp.host.threads, comm=dp,
          before_step=lambda step: state.sync.record() if step == last else None,
          after_step=lambda step, first: after_step(state, step),
          banner=f"{state.layout.size:,} parameters on each of {dp.size} ranks, {describe(train_cfg)}, global batch "
                 f"{train_cfg.batch_size} x {gpt_cfg.block_size} tokens in {par.grad_accum} micro-batch(es) per "
                 f"rank, {par.dp_mode} all-reduce in {len(state.sync.buckets)} buckets")


if __name__ == "__main__":
    main()
