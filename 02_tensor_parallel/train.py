"""Train the GPT with its weights split across MPI ranks (Megatron-LM tensor parallelism).

    mpirun -n 2 python 02_tensor_parallel/train.py                     # --tp defaults to the number of ranks
    mpirun -n 4 python 02_tensor_parallel/train.py --max-iters 200 --out-dir out/tp4
    mpirun -n 2 python 02_tensor_parallel/train.py --sequence-parallel
    python 01_single_core/sample.py --out-dir out/tp4                  # checkpoints are layout-independent

Every rank reads the same batch: tensor parallelism splits the model, not the data. What differs from
01_single_core/train.py is where the weights live and how a step computes: see tensor_parallel.py.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import common.startup as startup
from common.chapters import import_chapter
from common.checkpoint import model_state
from common.comm import Comm, world
from common.config import NETWORK_FLAGS, ParallelConfig
from common.driver import for_training
from common.loop import prepare, train
from common.memory import estimate
from common.model import gpt_layout, init_params
from common.optim import decays, make_adamw
from common.precision import describe, grad_dtype, master_dtype, storage, widths

single = import_chapter("01_single_core.train")
tp_lib = import_chapter("02_tensor_parallel.tensor_parallel")


FLAGS = ("tp", "sequence_parallel", *NETWORK_FLAGS)


def setup(argv, world_size):
    gpt_cfg, train_cfg, tokens, val_tokens, par = startup.setup(
        argv, Path(__file__).parent.name, __doc__, {"out_dir": "out/tensor_parallel"}, axis="tp", world_size=world_size,
        flags=FLAGS)
    tp_lib.check_layout(gpt_cfg, par.tp, par.sequence_parallel)
    return gpt_cfg, train_cfg, tokens, val_tokens, par


def memory_estimate(gpt_cfg, train_cfg, par):
    """{kind: bytes} one rank will hold: its shards, their gradient and AdamW, its part of the activations."""
    n = tp_lib.tp_layout(gpt_cfg, par.tp).size
    return estimate(gpt_cfg, widths(train_cfg), params=n, grads=n, optimizer=n,
                    rows=train_cfg.batch_size, blocks=gpt_cfg.n_layer, tp_size=par.tp, sp=par.sequence_parallel,
                    recompute=train_cfg.recompute, whole=gpt_layout(gpt_cfg).size)


@dataclass
class State(single.State):
    """Chapter 01's state holding this rank's shards (`layout` gives their per-rank shapes), and the model's
    parts as the driver runs them for training and for evaluation: the tensor-parallel layers."""
    par: ParallelConfig = field(kw_only=True)
    tp: Comm = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        parts = tp_lib.tp_parts(self.tp, self.par.sequence_parallel)
        self.parts, self.evaluating = for_training(parts, self.train_cfg, self.held)

    def whole(self):
        """Every tensor whole, on every rank (an all-gather over tp)."""
        return {kind: tp_lib.unshard(flat, self.layout, self.gpt_cfg, self.tp)
                for kind, flat in model_state(self.params, self.opt).items()}

    def load(self, whole):
        for kind, flat in model_state(self.params, self.opt).items():
            flat[...] = tp_lib.shard(whole[kind], self.layout, self.gpt_cfg, self.tp.size, self.tp.rank, flat.dtype)
        self.opt.cast(self.params)                      # mixed precision: the 16-bit shards from the master


def build(gpt_cfg, train_cfg, par, tp, full=None):
    """Every rank draws the whole single-core initialisation from the seed (or takes `full`) and keeps its
    shards, so the two models start identical with no communication."""
    dtype = master_dtype(train_cfg)
    full = init_params(gpt_cfg, train_cfg.seed, dtype) if full is None else full
    local = tp_lib.tp_layout(gpt_cfg, tp.size)
    master = tp_lib.shard(gpt_layout(gpt_cfg).views(full), local, gpt_cfg, tp.size, tp.rank, dtype)
    opt = make_adamw(train_cfg, local.mask(decays), master)
    params = master.astype(storage(train_cfg), copy=False)
    return State(gpt_cfg, train_cfg, local, params, np.zeros(local.size, grad_dtype(train_cfg)), opt, par=par, tp=tp)


def train_step(state, batch, lr):
    """One optimizer step; the same loss on every rank, each rank updating its own shards."""
    s, (x, y), sp = state, batch, state.par.sequence_parallel
    s.grads.fill(0)
    _, loss, cache = tp_lib.tp_forward(s.p, x, y, s.gpt_cfg, s.tp, sp, parts=s.parts)
    tp_lib.tp_backward(cache, s.p, s.g, s.tp, sp, dloss=s.opt.loss_scale)
    g = s.opt.unscaled(s.grads)
    s.opt.update(s.params, g, lr, s.train_cfg.grad_clip, tp_lib.grad_norm(g, s.layout, s.tp))
    return loss


def evaluate(state, batches):
    return float(np.mean([tp_lib.tp_forward(state.p, x, y, state.gpt_cfg, state.tp, parts=state.evaluating)[1]
                          for x, y in batches]))


def main(argv=None):
    tp = world()
    tp, (gpt_cfg, train_cfg, tokens, val_tokens, par), budget = prepare(tp, setup, argv, memory_estimate, "raise --tp")
    state = build(gpt_cfg, train_cfg, par, tp)
    train(state, tokens, val_tokens, train_step, evaluate, budget, threads=tp.host.threads, comm=tp,
          banner=f"{gpt_layout(gpt_cfg).size:,} parameters, {state.layout.size:,} on each of {tp.size} ranks, "
                 f"{describe(train_cfg)}, batch {train_cfg.batch_size} x {gpt_cfg.block_size} tokens")


if __name__ == "__main__":
    main()
