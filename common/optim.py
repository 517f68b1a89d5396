"""AdamW over a flat buffer, nanoGPT's warmup + cosine learning-rate schedule, global grad-norm clipping."""
import math

import numpy as np


def lr_at(step, train_cfg):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr (as nanoGPT)."""
    if step < train_cfg.warmup_iters:
        return train_cfg.learning_rate * (step + 1) / (train_cfg.warmup_iters + 1)
    if step > train_cfg.lr_decay_iters:
        return train_cfg.min_lr
    ratio = (step - train_cfg.warmup_iters) / max(1, train_cfg.lr_decay_iters - train_cfg.warmup_iters)
    return train_cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train_cfg.learning_rate - train_cfg.min_lr)


def decays(name, shape):
    """Weight decay applies to matrices and embeddings, never to biases or LayerNorm gains (as nanoGPT)."""
    return len(shape) == 2


class Diverged(ArithmeticError):
    """A non-finite loss or gradient: training stops before the optimizer writes it into the weights."""


def clip_grad_norm(g, max_norm, norm=None):
    """Scale g in place so its L2 norm is at most max_norm (0: never); returns the norm before clipping.
    A sharded caller passes the norm it reduced across ranks, so every rank raises Diverged together when
    the norm is not finite."""
    if norm is None:
        norm = math.sqrt(float(np.dot(g, g)))
    if not math.isfinite(norm):
        raise Diverged(f"the gradient norm is {norm}")
    if max_norm > 0 and norm > max_norm:
        g *= max_norm / (norm + 1e-6)
    return norm


def global_norm(g, ranges, comm=None):
    """The L2 norm of a gradient spread over ranks: each rank sums the squares of its `ranges` of g (every
    element of the whole gradient in exactly one rank's ranges), one all-reduce over `comm` adds them up."""
    sq = np.array([sum(float(np.dot(g[a:b], g[a:b])) for a, b in ranges)], dtype=np.float64)
    return math.sqrt(float(comm.allreduce(sq)[0] if comm is not None else sq[0]))


class AdamW:
    """PyTorch's AdamW on flat arrays: m, v and the decay mask share the layout of the (slice of) parameters
    given to `step`, so ZeRO can hand each rank one slice of the whole."""

    def __init__(self, decay_mask, beta1, beta2, weight_decay, eps=1e-8, dtype=np.float32):
        edges = np.flatnonzero(np.diff(np.r_[0, np.asarray(decay_mask, dtype=np.int8), 0]))
        self.decayed = list(zip(edges[::2], edges[1::2]))    # [start, stop) runs where weight decay applies
        self.m = np.zeros(decay_mask.shape, dtype)
        self.v = np.zeros(decay_mask.shape, dtype)
        self.tmp = np.zeros(decay_mask.shape, dtype)
        self.beta1, self.beta2, self.weight_decay, self.eps = beta1, beta2, weight_decay, eps
        self.t = 0

    loss_scale = 1.0            # what the backward multiplies the loss by (common.precision's optimizer: fp16's)

    def unscaled(self, grads):
        """The gradient the update takes: here `grads` itself (common.precision's: float32, divided by the scale)."""
        return grads

    def update(self, params, g, lr, grad_clip, norm=None):
        """Clip g by its global `norm` (None: g's own) and step `params`."""
        clip_grad_norm(g, grad_clip, norm)
        self.step(params, g, lr)

    def cast(self, params):
        """Make `params` what the optimizer holds (in mixed precision: round them from the master)."""

    def status(self):
        """What the last update did beyond stepping, for the log (in mixed precision, fp16's loss scale)."""
        return {}

    def step(self, p, g, lr):
        self.t += 1
        b1, b2, tmp = self.beta1, self.beta2, self.tmp
        self.m *= b1
        np.multiply(g, 1.0 - b1, out=tmp)
        self.m += tmp                                       # m = b1 m + (1 - b1) g
        self.v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        self.v += tmp                                       # v = b2 v + (1 - b2) g^2
        for a, b in self.decayed:
            p[a:b] *= 1.0 - lr * self.weight_decay          # decoupled decay, as PyTorch: p *= 1 - lr wd
        bias1 = 1.0 - b1 ** self.t
        bias2 = 1.0 - b2 ** self.t
        np.sqrt(self.v, out=tmp)
        tmp *= 1.0 / math.sqrt(bias2)
        tmp += self.eps
        np.divide(self.m, tmp, out=tmp)
        tmp *= lr / bias1
        p -= tmp                                            # p -= lr m_hat / (sqrt(v_hat) + eps)
