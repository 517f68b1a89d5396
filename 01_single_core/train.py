"""Train the GPT on one process: the reference every parallel chapter must reproduce exactly.

    python 01_single_core/train.py                              # nanoGPT's CPU config, 2000 iterations
    python 01_single_core/train.py --max-iters 200 --out-dir out/quick
    python 01_single_core/train.py --out-dir out/quick --max-iters 400 --resume
    python 01_single_core/train.py --n-experts 8 --top-k 1 --out-dir out/experts   # a mixture of experts
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.checkpoint import single_core_state
from common.config import EXPERTS, ConfigError, GPTConfig, TrainConfig, exit_with
from common.loop import train
from common.memory import Transient, check_fits, estimate, reuse_freed_memory
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params, routing
from common.moe import parameters, summary
from common.optim import AdamW, decays, make_adamw
from common.params import Layout
from common.precision import describe, grad_dtype, master_dtype, storage, widths
from common.startup import refuse_several_processes, setup
from common.threads import size_blas_pool

CHAPTER = Path(__file__).parent.name


FLAGS = EXPERTS                 # the settings beyond the dense model's: a mixture of experts, no parallel one


@dataclass
class State:
    """One process's training state: the whole model in a flat buffer, its gradient (the same layout, `p` and
    `g` are their named views) and AdamW; `held` measures the bytes of activations the caches keep."""
    gpt_cfg: GPTConfig
    train_cfg: TrainConfig
    layout: Layout
    params: np.ndarray
    grads: np.ndarray
    opt: AdamW

    def __post_init__(self):
        self.p, self.g = self.views()
        self.held = Transient()
        self.routings = []                              # with experts: what the last step's routers decided

    def views(self):
        return self.layout.views(self.params), self.layout.views(self.grads)

    def whole(self):
        return single_core_state(self.layout, self.params, self.opt)

    def load(self, whole):
        for kind, views in self.whole().items():
            for name, view in views.items():
                view[...] = whole[kind][name]
        self.opt.cast(self.params)                      # mixed precision: the 16-bit weights from the master


def build(gpt_cfg, train_cfg):
    """The flat parameters (nanoGPT's init from the seed), a gradient buffer of the same layout, and AdamW; in
    mixed precision the init is AdamW's float32 master, and the model reads 16-bit weights rounded from it."""
    layout = gpt_layout(gpt_cfg)
    master = init_params(gpt_cfg, train_cfg.seed, master_dtype(train_cfg))
    opt = make_adamw(train_cfg, layout.mask(decays), master)
    params = master.astype(storage(train_cfg), copy=False)
    return State(gpt_cfg, train_cfg, layout, params, np.zeros(layout.size, grad_dtype(train_cfg)), opt)


def memory_estimate(gpt_cfg, train_cfg):
    """{kind: bytes} this process will hold: the whole model, its gradient and AdamW, one batch's activations."""
    n = gpt_layout(gpt_cfg).size
    return estimate(gpt_cfg, widths(train_cfg), params=n, grads=n, optimizer=n,
                    rows=train_cfg.batch_size, blocks=gpt_cfg.n_layer, recompute=train_cfg.recompute)


def train_step(state, batch, lr):
    """One optimizer step on one batch (x, y); returns the loss."""
    s, (x, y) = state, batch
    s.grads.fill(0)
    _, loss, cache = gpt_forward(s.p, x, y, s.gpt_cfg, s.train_cfg.recompute)
    s.held.hold("activations", cache)                   # the bytes it keeps for the backward, measured
    s.routings = [r for r in map(routing, cache[1]) if r is not None]
    gpt_backward(cache, s.p, s.g, dloss=s.opt.loss_scale)   # fp16: the loss scaled, so small gradients survive
    s.opt.update(s.params, s.opt.unscaled(s.grads), lr, s.train_cfg.grad_clip)
    return loss


def evaluate(state, batches):
    """The mean loss; no backward follows, so each block keeps only its input (as full recomputation does)."""
    return float(np.mean([gpt_forward(state.p, x, y, state.gpt_cfg, "full")[1] for x, y in batches]))


def main(argv=None):
    refuse_several_processes("01_single_core/train.py", "train on several ranks with a parallel chapter: "
                             "mpirun -n 2 python 03_data_parallel/train.py")
    threads = size_blas_pool(host_ranks=1)
    try:
        gpt_cfg, train_cfg, tokens, val_tokens, _ = setup(argv, CHAPTER, __doc__, flags=FLAGS)
        budget = check_fits(memory_estimate(gpt_cfg, train_cfg), None, (gpt_cfg, train_cfg))
    except ConfigError as e:
        exit_with(e)
    reuse_freed_memory()
    state = build(gpt_cfg, train_cfg)
    train(state, tokens, val_tokens, train_step, evaluate, budget, threads=threads,
          banner=f"{parameters(gpt_cfg, state.layout.size)}, {describe(train_cfg)}, batch "
                 f"{train_cfg.batch_size} x {gpt_cfg.block_size} tokens",
          report=(lambda: summary(state.routings)) if gpt_cfg.n_experts else None)


if __name__ == "__main__":
    main()
