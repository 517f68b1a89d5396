"""Train the GPT on one process: the reference every parallel chapter must reproduce exactly.

    python 01_single_core/train.py                              # nanoGPT's CPU config, 2000 iterations
    python 01_single_core/train.py --max-iters 200 --out-dir out/quick
    python 01_single_core/train.py --out-dir out/quick --max-iters 400 --resume
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.checkpoint import single_core_state
from common.config import (ConfigError, GPTConfig, ParallelConfig, Parser, TrainConfig, add_config_args,
                           config_from_args, exit_with, refuse_several_processes)
from common.data import load_meta, load_tokens
from common.loop import train
from common.memory import Transient, check_fits, estimate, reuse_freed_memory
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params
from common.optim import AdamW, clip_grad_norm, decays
from common.params import Layout
from common.threads import size_blas_pool

CHAPTER = Path(__file__).parent.name


FLAGS = ()                      # the parallel settings this chapter implements: none


def setup(argv, chapter=CHAPTER, description=__doc__, defaults=None, shown=None, axis=None, world_size=1,
          flags=FLAGS, choices=None):
    """Configs (with a chapter's own `defaults`, and only the parallel flags `flags` that `chapter` implements,
    with the `choices` it defines) and data, all checked before any compute; a chapter with one parallel `axis`
    ("tp", "dp" or "pp") gives it every rank. Returns gpt_cfg, train_cfg, the train and val tokens, and the
    ParallelConfig."""
    parser = Parser(description=description.splitlines()[0])
    classes = GPTConfig, TrainConfig, ParallelConfig
    shown = {**({axis: "every rank"} if axis else {}), **(shown or {})}
    offer = dict(chapter=chapter, flags=flags, choices=choices)
    add_config_args(parser, *classes, defaults=defaults, shown=shown, **offer)
    gpt_cfg, train_cfg, par = config_from_args(parser.parse_args(argv), *classes, defaults=defaults, **offer)
    if axis:
        par.use_every_rank(axis, world_size)
    meta = load_meta(train_cfg.data_dir)
    if gpt_cfg.vocab_size not in (0, meta["vocab_size"]):
        raise ConfigError(f"--vocab-size {gpt_cfg.vocab_size} differs from the data's {meta['vocab_size']} "
                          f"symbols; leave it at 0 to take it from the data")
    gpt_cfg.vocab_size = meta["vocab_size"]
    tokens, val_tokens = load_tokens(train_cfg.data_dir, "train"), load_tokens(train_cfg.data_dir, "val")
    for split, split_tokens in (("train", tokens), ("val", val_tokens)):
        if len(split_tokens) <= gpt_cfg.block_size:
            raise ConfigError(f"the {split} split of {train_cfg.data_dir} has {len(split_tokens)} tokens, too few for "
                              f"--block-size {gpt_cfg.block_size}; choose a smaller block size")
    check_out_dir(train_cfg.out_dir)
    ckpt = Path(train_cfg.out_dir) / "ckpt.npz"
    if train_cfg.resume and not ckpt.exists():
        raise ConfigError(f"--resume given but {ckpt} does not exist; train without --resume first")
    return gpt_cfg, train_cfg, tokens, val_tokens, par


def check_out_dir(out_dir):
    """Raise unless `out_dir` is a folder this process can write in, or can be made as one."""
    path = Path(out_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ConfigError(f"--out-dir {out_dir}: {existing} is a file, not a folder; name a folder for the "
                          f"checkpoint and metrics")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir {out_dir}: {existing} is not writable; name a folder you can write in")


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

    def views(self):
        return self.layout.views(self.params), self.layout.views(self.grads)

    def whole(self):
        return single_core_state(self.layout, self.params, self.opt)

    def load(self, whole):
        for kind, views in self.whole().items():
            for name, view in views.items():
                view[...] = whole[kind][name]


def build(gpt_cfg, train_cfg):
    """The flat parameters (nanoGPT's init from the seed), a gradient buffer of the same layout, and AdamW."""
    dtype = np.dtype(train_cfg.dtype)
    layout = gpt_layout(gpt_cfg)
    params = init_params(gpt_cfg, train_cfg.seed, dtype)
    opt = AdamW(layout.mask(decays), train_cfg.beta1, train_cfg.beta2, train_cfg.weight_decay, dtype=dtype)
    return State(gpt_cfg, train_cfg, layout, params, np.zeros_like(params), opt)


def memory_estimate(gpt_cfg, train_cfg):
    """{kind: bytes} this process will hold: the whole model, its gradient and AdamW, one batch's activations."""
    n = gpt_layout(gpt_cfg).size
    return estimate(gpt_cfg, np.dtype(train_cfg.dtype).itemsize, params=n, grads=n, optimizer=n,
                    rows=train_cfg.batch_size, blocks=gpt_cfg.n_layer, recompute=train_cfg.recompute)


def train_step(state, batch, lr):
    """One optimizer step on one batch (x, y); returns the loss."""
    s, (x, y) = state, batch
    s.grads.fill(0)
    _, loss, cache = gpt_forward(s.p, x, y, s.gpt_cfg, s.train_cfg.recompute)
    s.held.hold("activations", cache)                   # the bytes it keeps for the backward, measured
    gpt_backward(cache, s.p, s.g)
    clip_grad_norm(s.grads, s.train_cfg.grad_clip)
    s.opt.step(s.params, s.grads, lr)
    return loss


def evaluate(state, batches):
    """The mean loss; no backward follows, so each block keeps only its input (as full recomputation does)."""
    return float(np.mean([gpt_forward(state.p, x, y, state.gpt_cfg, "full")[1] for x, y in batches]))


def main(argv=None):
    refuse_several_processes("01_single_core/train.py", "train on several ranks with a parallel chapter: "
                             "mpirun -n 2 python 03_data_parallel/train.py")
    threads = size_blas_pool(host_ranks=1)
    try:
        gpt_cfg, train_cfg, tokens, val_tokens, _ = setup(argv)
        budget = check_fits(memory_estimate(gpt_cfg, train_cfg), None, (gpt_cfg, train_cfg))
    except ConfigError as e:
        exit_with(e)
    reuse_freed_memory()
    state = build(gpt_cfg, train_cfg)
    train(state, tokens, val_tokens, train_step, evaluate, budget, threads=threads,
          banner=f"{state.layout.size:,} parameters, {train_cfg.dtype}, batch {train_cfg.batch_size} x "
                 f"{gpt_cfg.block_size} tokens")


if __name__ == "__main__":
    main()
