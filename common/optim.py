"""AdamW over a flat buffer, nanoGPT's warmup + cosine learning-rate schedule, global grad-norm clipping; and in
mixed precision AdamW on float32 master weights, with fp16's dynamic loss scaling."""
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
    """Weight decay applies to matrices and embeddings (the experts' stacks of them too), never to biases or
    LayerNorm gains (as nanoGPT)."""
    return len(shape) >= 2 and not name.endswith(".b")


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

    def kept(self):
        """The arrays of state it keeps from step to step (what ZeRO's paper counts), and its work arrays."""
        return (self.m, self.v), (self.tmp,)

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


# ----------------------------------------------------------------------------- in mixed precision (common/precision.py)

class LossScaler:
    """Dynamic loss scaling, as PyTorch's GradScaler and Megatron's: the backward runs on scale x loss. A step
    whose gradients are not finite (on any rank: their norm is global) is skipped and halves the scale; after
    `window` finite steps in a row the scale doubles. At a scale of 1, gradients that are still not finite are
    a divergence. `dynamic` False: a fixed scale, and a non-finite gradient is a divergence at once."""

    def __init__(self, scale=2.0 ** 16, window=1000, dynamic=True):
        self.scale, self.window, self.dynamic = float(scale), window, dynamic
        self.clean = 0                  # finite steps since the scale last changed
        self.skipped = 0                # steps skipped so far

    def state(self):
        """What a checkpoint keeps, so that a resumed run goes on exactly as an uninterrupted one."""
        return {"scale": self.scale, "clean": self.clean, "skipped": self.skipped}

    def restore(self, state):
        self.scale, self.clean, self.skipped = float(state["scale"]), state["clean"], state["skipped"]

    def update(self, finite):
        """After a step's gradients are known: whether to apply the step."""
        if finite:
            self.clean += 1
            if self.dynamic and self.clean == self.window:
                self.scale *= 2.0
                self.clean = 0
            return True
        if not self.dynamic or self.scale <= 1.0:
            raise Diverged(f"the gradients are not finite at loss scale {self.scale:g}")
        self.scale /= 2.0
        self.clean = 0
        self.skipped += 1
        return False


class MixedAdamW(AdamW):
    """AdamW in mixed precision: it updates a float32 master copy of the 16-bit weights (or of this rank's shard
    of them, `master`) from the 16-bit gradient divided by the loss scale into float32 (`unscaled`), and rounds
    the weights from the master after each step. The master, m and v are what ZeRO shards: 12 bytes a parameter."""

    def __init__(self, decay_mask, beta1, beta2, weight_decay, master, scaler=None, eps=1e-8):
        super().__init__(decay_mask, beta1, beta2, weight_decay, eps, dtype=np.float32)
        self.master, self.scaler = master, scaler
        self.grad = np.zeros_like(master)                  # the gradient in float32, unscaled
        self.skipped = False                               # whether the last update was skipped

    @property
    def loss_scale(self):
        return self.scaler.scale if self.scaler else 1.0

    def unscaled(self, grads):
        np.multiply(grads, 1.0 / self.loss_scale, out=self.grad, dtype=np.float32)
        return self.grad

    def update(self, params, g, lr, grad_clip, norm=None):
        """Skip the step if the loss scaler says so (the norm is not finite); else clip g, step the master and
        round `params` (the 16-bit weights it stands for) from it."""
        if norm is None:
            norm = math.sqrt(float(np.dot(g, g)))
        self.skipped = self.scaler is not None and not self.scaler.update(math.isfinite(norm))
        if self.skipped:
            return
        clip_grad_norm(g, grad_clip, norm)
        self.step(self.master, g, lr)
        self.cast(params)

    def cast(self, params):
        params[...] = self.master

    def kept(self):
        return (self.master, self.m, self.v), (self.tmp, self.grad)

    def status(self):
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.scale, **({"skipped": True} if self.skipped else {})}


def make_adamw(train_cfg, decay_mask, master):
    """The optimizer of a run: AdamW on the weights themselves, or in mixed precision MixedAdamW on a float32
    `master` (with fp16, a LossScaler: dynamic from 2^16 unless --loss-scale fixes it)."""
    hyper = (decay_mask, train_cfg.beta1, train_cfg.beta2, train_cfg.weight_decay)
    if train_cfg.precision == "fp32":
        return AdamW(*hyper, dtype=master.dtype)
    scaler = None
    if train_cfg.precision == "fp16":
        scaler = LossScaler(train_cfg.loss_scale or 2.0 ** 16, dynamic=train_cfg.loss_scale == 0)
    return MixedAdamW(*hyper, master=master, scaler=scaler)
