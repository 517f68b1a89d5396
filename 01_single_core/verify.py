"""Prove the hand-written backward pass: every gradient of the whole model against central finite differences.

    python 01_single_core/verify.py            # float64, a tiny model; prints one row per tensor, then PASS/FAIL
"""
import numpy as np

from common.chapters import import_chapter
from common.checks import Report
from common.config import ConfigError, GPTConfig, Parser, exit_with
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params


def gradcheck(gpt_cfg, seed=0, eps=1e-6, tol=1e-6, verbose=True):
    """Compare the analytic gradient of the loss with (L(w + eps) - L(w - eps)) / 2 eps for every element."""
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

    numeric = np.empty_like(params)
    for i in range(params.size):
        saved = params[i]
        params[i] = saved + eps
        up = gpt_forward(p, idx, targets, gpt_cfg)[1]
        params[i] = saved - eps
        down = gpt_forward(p, idx, targets, gpt_cfg)[1]
        params[i] = saved
        numeric[i] = (up - down) / (2 * eps)

    report = Report(tol)
    g, n = layout.views(grads), layout.views(numeric)
    for name in layout.shapes:
        report.compare(name, g[name], n[name], verbose)
    return report


def reference(gpt_cfg, train_cfg, steps, seed=0):
    """What the parallel chapters' verify.py compare against: `steps` random batches, starting weights moved off
    the init (biases off 0, gains off 1), and the single-core run on them with train.py's train_step.
    Returns (batches, start, losses, params, opt): `start` a copy of the weights before the first step."""
    train = import_chapter("01_single_core.train")
    rng = np.random.default_rng(seed)
    batches = [tuple(rng.integers(0, gpt_cfg.vocab_size, (2, train_cfg.batch_size, gpt_cfg.block_size)))
               for _ in range(steps)]
    state = train.build(gpt_cfg, train_cfg)
    state.params += rng.normal(0.0, 0.1, state.params.shape)
    start = state.params.copy()
    losses = [train.train_step(state, batch, train_cfg.learning_rate) for batch in batches]
    return batches, start, losses, state.params, state.opt


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks (default: 2)")
    parser.add_argument("--n-head", type=int, default=2, help="attention heads per block (default: 2)")
    parser.add_argument("--n-embd", type=int, default=8, help="width of the residual stream (default: 8)")
    parser.add_argument("--block-size", type=int, default=5, help="context length in tokens (default: 5)")
    parser.add_argument("--vocab-size", type=int, default=11, help="symbols in the vocabulary (default: 11)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default: 0)")
    try:
        args = parser.parse_args(argv)
        gpt_cfg = GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab_size)
        gpt_cfg.validate()
    except ConfigError as e:
        exit_with(e)
    return gradcheck(gpt_cfg, args.seed).finish()


if __name__ == "__main__":
    raise SystemExit(main())
