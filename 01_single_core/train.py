"""Train the GPT on one process: the reference every parallel chapter must reproduce exactly.

    python 01_single_core/train.py                              # nanoGPT's CPU config, 2000 iterations
    python 01_single_core/train.py --max-iters 200 --out-dir out/quick
    python 01_single_core/train.py --out-dir out/quick --max-iters 400 --resume
"""
from pathlib import Path

import numpy as np

from common.checkpoint import load_training_state, save_training_state, single_core_state
from common.config import (ConfigError, GPTConfig, ParallelConfig, Parser, TrainConfig, add_config_args,
                           config_from_args, exit_with)
from common.data import batch_offsets, eval_batches, get_batch, load_meta, load_tokens
from common.loop import run_training
from common.memory import check_fits, estimate, reuse_freed_memory
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params
from common.optim import AdamW, clip_grad_norm, decays
from common.threads import size_blas_pool

CHAPTER = Path(__file__).parent.name


def setup(argv, chapter=CHAPTER, description=__doc__, defaults=None, shown=None):
    """Configs (with a chapter's own `defaults`, and only the parallel flags `chapter` implements) and data,
    all checked before any compute. Returns gpt_cfg, train_cfg, train and val tokens, and the ParallelConfig."""
    parser = Parser(description=description.splitlines()[0])
    classes = GPTConfig, TrainConfig, ParallelConfig
    add_config_args(parser, *classes, defaults=defaults, chapter=chapter, shown=shown)
    gpt_cfg, cfg, par = config_from_args(parser.parse_args(argv), *classes, defaults=defaults, chapter=chapter)
    meta = load_meta(cfg.data_dir)
    if gpt_cfg.vocab_size not in (0, meta["vocab_size"]):
        raise ConfigError(f"--vocab-size {gpt_cfg.vocab_size} differs from the data's {meta['vocab_size']} "
                          f"symbols; leave it at 0 to take it from the data")
    gpt_cfg.vocab_size = meta["vocab_size"]
    train, val = load_tokens(cfg.data_dir, "train"), load_tokens(cfg.data_dir, "val")
    for split, tokens in (("train", train), ("val", val)):
        if len(tokens) <= gpt_cfg.block_size:
            raise ConfigError(f"the {split} split of {cfg.data_dir} has {len(tokens)} tokens, too few for "
                              f"--block-size {gpt_cfg.block_size}; choose a smaller block size")
    ckpt = Path(cfg.out_dir) / "ckpt.npz"
    if cfg.resume and not ckpt.exists():
        raise ConfigError(f"--resume given but {ckpt} does not exist; train without --resume first")
    return gpt_cfg, cfg, train, val, par


def build(gpt_cfg, cfg):
    """The flat parameters (nanoGPT's init from cfg.seed), a gradient buffer of the same layout, and AdamW."""
    dtype = np.dtype(cfg.dtype)
    layout = gpt_layout(gpt_cfg)
    params = init_params(gpt_cfg, cfg.seed, dtype)
    opt = AdamW(layout.mask(decays), cfg.beta1, cfg.beta2, cfg.weight_decay, dtype=dtype)
    return layout, params, np.zeros_like(params), opt


def memory_estimate(gpt_cfg, cfg):
    """{kind: bytes} this process will hold: the whole model, its gradient and AdamW, one batch's activations."""
    n = gpt_layout(gpt_cfg).size
    return estimate(gpt_cfg, np.dtype(cfg.dtype).itemsize, params=n, grads=n, optimizer=n, rows=cfg.batch_size,
                    blocks=gpt_cfg.n_layer)


def train_step(p, g, params, grads, opt, x, y, gpt_cfg, cfg, lr):
    """One optimizer step on one batch; returns the loss."""
    grads.fill(0)
    _, loss, cache = gpt_forward(p, x, y, gpt_cfg)
    gpt_backward(cache, p, g)
    clip_grad_norm(grads, cfg.grad_clip)
    opt.step(params, grads, lr)
    return loss


def evaluate(p, batches, gpt_cfg):
    return float(np.mean([gpt_forward(p, x, y, gpt_cfg)[1] for x, y in batches]))


def main(argv=None):
    threads = size_blas_pool(host_ranks=1)
    try:
        gpt_cfg, cfg, train, val, _ = setup(argv)
        budget = check_fits(memory_estimate(gpt_cfg, cfg), host=None)
    except ConfigError as e:
        exit_with(e)
    reuse_freed_memory()
    layout, params, grads, opt = build(gpt_cfg, cfg)
    p, g = layout.views(params), layout.views(grads)
    ckpt = Path(cfg.out_dir) / "ckpt.npz"
    start = 0
    if cfg.resume:
        try:
            start = load_training_state(ckpt, layout, params, opt, cfg.max_iters)
        except ConfigError as e:
            exit_with(e)
        print(f"resuming from {ckpt} at step {start}")
    print(f"{layout.size:,} parameters, {cfg.dtype}, batch {cfg.batch_size} x {gpt_cfg.block_size} tokens\n"
          f"runtime: {threads}\n{budget.banner()}")

    val_batches = eval_batches(val, cfg, gpt_cfg.block_size)

    def step_fn(step, lr):
        offsets = batch_offsets(len(train), gpt_cfg.block_size, cfg.batch_size, cfg.seed, step)
        x, y = get_batch(train, offsets, gpt_cfg.block_size)
        return train_step(p, g, params, grads, opt, x, y, gpt_cfg, cfg, lr)

    run_training(cfg, start, cfg.batch_size * gpt_cfg.block_size, step_fn,
                 evaluate=lambda: evaluate(p, val_batches, gpt_cfg),
                 save=lambda step: save_training_state(ckpt, single_core_state(layout, params, opt), opt.t, step,
                                                     gpt_cfg, cfg),
                 metrics_path=Path(cfg.out_dir) / "metrics.jsonl")
    print(budget.summary())


if __name__ == "__main__":
    main()
