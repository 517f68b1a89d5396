"""Prove the hand-written backward pass: every gradient of the whole model against central finite differences.

    python 01_single_core/verify.py            # float64, a tiny model; prints one row per tensor, then PASS/FAIL
    python 01_single_core/verify.py --n-experts 4 --top-k 2 --capacity-factor 1    # experts, some tokens dropped
"""
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from common.chapters import import_chapter
from common.checks import Report
from common.config import ConfigError, GPTConfig, Parser, exit_with
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params, objective
from common.precision import storage, unit_roundoff


def gradcheck(gpt_cfg, seed=0, eps=1e-6, tol=1e-6, verbose=True):
    """Compare the analytic gradient of the objective (the loss, with experts plus their balance term) with
    (L(w + eps) - L(w - eps)) / 2 eps for every element."""
    layout = gpt_layout(gpt_cfg)
    rng = np.random.default_rng(seed)
    params = init_params(gpt_cfg, seed, np.float64)
    params += rng.normal(0.0, 0.1, params.shape)   # move biases off 0 and gains off 1, where errors could hide
    p = layout.views(params)
    idx = rng.integers(0, gpt_cfg.vocab_size, (2, gpt_cfg.block_size))
    idx[1, :3] = idx[0, 0]                          # repeated tokens: their embedding gradients must add up
    targets = rng.integers(0, gpt_cfg.vocab_size, idx.shape)

    grads = np.zeros_like(params)
    _, _, cache = gpt_forward(p, idx, targets, gpt_cfg)
    gpt_backward(cache, p, layout.views(grads))

    def loss():
        _, value, c = gpt_forward(p, idx, targets, gpt_cfg)
        return objective(value, c, gpt_cfg)

    numeric = np.empty_like(params)
    for i in range(params.size):
        saved = params[i]
        params[i] = saved + eps
        up = loss()
        params[i] = saved - eps
        down = loss()
        params[i] = saved
        numeric[i] = (up - down) / (2 * eps)

    report = Report(tol)
    g, n = layout.views(grads), layout.views(numeric)
    for name in layout.shapes:
        report.compare(name, g[name], n[name], verbose)
    return report


class Run(NamedTuple):
    """A single-core run as the parallel verify.py compare against it: `start` the weights before the first
    step (in mixed precision, as everywhere below, the float32 master), `params` after the last, `grads` the
    first step's gradient."""
    batches: list
    start: np.ndarray
    losses: list
    params: np.ndarray
    opt: object
    grads: np.ndarray


def reference(gpt_cfg, train_cfg, steps, seed=0):
    """What the parallel chapters' verify.py compare against: `steps` random batches, starting weights moved off
    the init (biases off 0, gains off 1), and the single-core run on them with train.py's train_step (a Run)."""
    train = import_chapter("01_single_core.train")
    rng = np.random.default_rng(seed)
    batches = [tuple(rng.integers(0, gpt_cfg.vocab_size, (2, train_cfg.batch_size, gpt_cfg.block_size)))
               for _ in range(steps)]
    state = train.build(gpt_cfg, train_cfg)
    start_weights(state, weights(state) + rng.normal(0.0, 0.1, state.params.shape))
    start, losses, grads = weights(state).copy(), [], None
    for batch in batches:
        losses.append(train.train_step(state, batch, train_cfg.learning_rate))
        grads = state.grads.copy() if grads is None else grads
    return Run(batches, start, losses, weights(state), state.opt, grads)


def weights(state):
    """The weights the optimizer updates: the parameters, or in mixed precision their float32 master."""
    return getattr(state.opt, "master", state.params)


def start_weights(state, start):
    """Set the weights (in mixed precision the master, and the 16-bit parameters rounded from it)."""
    weights(state)[...] = start
    state.opt.cast(state.params)


def mixed(train_cfg, precision="bf16"):
    """The float64 verify's training config in mixed precision (float32 master weights and arithmetic)."""
    return replace(train_cfg, dtype="float32", precision=precision)


def mixed_tolerance(train_cfg, n_layer, reductions):
    """How far a first-step gradient (or loss) of two mixed-precision runs of the same step may differ, relative to
    its largest element, when they round to 16 bits at different points: (2 L + 4 + reductions) u. Each rounding
    moves a value by at most u (the unit roundoff) of its size; on the way to a weight's gradient a value is
    rounded once per part in the forward (the embedding, L blocks, the head: L + 2) and in the backward (at most
    L + 2), then the gradient itself and its reduction's partial sums (`reductions`). See chapter 01's README."""
    return (2 * n_layer + 4 + reductions) * unit_roundoff(storage(train_cfg))


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks (default: 2)")
    parser.add_argument("--n-head", type=int, default=2, help="attention heads per block (default: 2)")
    parser.add_argument("--n-embd", type=int, default=8, help="width of the residual stream (default: 8)")
    parser.add_argument("--block-size", type=int, default=5, help="context length in tokens (default: 5)")
    parser.add_argument("--vocab-size", type=int, default=11, help="symbols in the vocabulary (default: 11)")
    parser.add_argument("--n-experts", type=int, default=0, help="experts per block (default: 0, the dense MLP)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    parser.add_argument("--capacity-factor", type=float, default=1.25, help="expert capacity, in shares of "
                        "T k / E assignments of a sequence (default: 1.25)")
    parser.add_argument("--aux-loss-coef", type=float, default=0.1, help="weight of the balance loss (default: 0.1, "
                        "ten times training's, so a wrong gradient of it shows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default: 0)")
    try:
        args = parser.parse_args(argv)
        gpt_cfg = GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab_size,
                            args.n_experts, args.top_k, args.capacity_factor, args.aux_loss_coef)
        gpt_cfg.validate()
    except ConfigError as e:
        exit_with(e)
    return gradcheck(gpt_cfg, args.seed).finish()


if __name__ == "__main__":
    raise SystemExit(main())
