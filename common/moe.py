"""A mixture-of-experts feed-forward (GShard arXiv:2006.16668, Switch Transformer arXiv:2101.03961): E expert MLPs
in place of a block's one MLP; a router sends each token to k of them and adds their outputs, each weighted by
the router's probability for it. A block's parameters: the router (C, E) and the experts' MLPs stacked,
c_fc (E, C, 4C) and (E, 4C), c_proj (E, 4C, C) and (E, C). With k = 1 a token meets as many weights as in the
dense model: E times the parameters for the same arithmetic.

Routing, per token: probabilities p = softmax(h Wr) over the experts; its k largest (ties to the lower index) are
its choices and their p its gates (not renormalised, so the router learns from the loss for every k).
Capacity, per sequence (GShard's groups, here the T tokens of one sequence, so a batch split any way routes the
same): expert e computes at most ceil(f T k / E) of the sequence's assignments, taken in the order every token's
first choice (in token order), then every second choice, and so on. An assignment over capacity is dropped: its
share of the output is zero, and the residual carries the token on.

Load balance (Switch's auxiliary loss): per sequence  aux = E sum_e f_e P_e,  f_e the share of the sequence's T k
choices (before drops) that went to e, P_e the mean probability of e over its tokens; 1 when perfectly balanced.
A block's aux is its mean over the sequences, and training minimises  loss + a sum_blocks aux  (f counts choices
and has no gradient; P has). The loss the model reports is the cross-entropy alone.

Dispatch and combine: the kept assignments sorted by expert (each expert's in token order) are gathered into one
array of rows; each expert runs on its consecutive rows, the unit expert parallelism sends through an all-to-all;
their outputs, times the gates, are added back at their tokens.
"""
import math
from typing import Callable, NamedTuple

import numpy as np

from common.layers import gelu_backward, gelu_forward, linear_backward, linear_forward, rowsum, scatter_add_rows

EXPERT = ("c_fc.w", "c_fc.b", "c_proj.w", "c_proj.b")          # each "mlp.experts.<name>", stacked over experts


def moe_shapes(C, E):
    """The parameters of one block's mixture of E experts, in buffer order."""
    return [("mlp.router.w", (C, E)),
            ("mlp.experts.c_fc.w", (E, C, 4 * C)), ("mlp.experts.c_fc.b", (E, 4 * C)),
            ("mlp.experts.c_proj.w", (E, 4 * C, C)), ("mlp.experts.c_proj.b", (E, C))]


class Routing(NamedTuple):
    """What a block's router decided for one batch: assignments per expert before (`chosen`) and after (`kept`)
    the capacity limit, and the block's load-balancing loss."""
    chosen: np.ndarray
    kept: np.ndarray
    aux: float


class Dispatch(NamedTuple):
    """The kept assignments as rows sorted by expert: the token of each row, its expert, and rows per expert."""
    tokens: np.ndarray
    experts: np.ndarray
    counts: np.ndarray


class Routed(NamedTuple):
    """moe_forward's cache: the router's input and probabilities, the dispatch, the choices per sequence and
    expert with d aux / d p per choice, the experts (the pair that ran them, and its cache) and their outputs,
    and the Routing."""
    h: np.ndarray
    probs: np.ndarray
    dispatch: Dispatch
    chosen: np.ndarray
    daux: float
    experts: "Experts"
    c_experts: tuple
    ys: np.ndarray
    routing: Routing


def capacity(T, gpt_cfg):
    """Assignments of one sequence of T tokens an expert computes at most."""
    return math.ceil(gpt_cfg.capacity_factor * T * gpt_cfg.top_k / gpt_cfg.n_experts)


def route(h, wr, gpt_cfg):
    """The router on h (B,T,C): probabilities (B*T, E), the Dispatch of the kept assignments, the choices per
    sequence and expert (B, E), and the Routing."""
    B, T, C = h.shape
    E, k = wr.shape[1], gpt_cfg.top_k
    probs, _ = linear_forward(h.reshape(-1, C), wr, None)                     # (N,E) logits
    probs -= probs.max(axis=-1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= rowsum(probs)
    choice = np.argsort(-probs, axis=-1, kind="stable")[:, :k]               # (N,k): the k largest, ties to lower e
    # per sequence, every first choice in token order, then every second one, ...: a place in each expert's queue
    order = choice.reshape(B, T, k).transpose(0, 2, 1).reshape(B, k * T)
    onehot = order[..., None] == np.arange(E)                                 # (B,kT,E)
    place = np.take_along_axis(np.cumsum(onehot, axis=1), order[..., None], axis=2)[..., 0]
    keep = (place <= capacity(T, gpt_cfg)).reshape(B, k, T).transpose(0, 2, 1).reshape(-1)   # (N k,)
    a = np.flatnonzero(keep)                                                  # kept assignments, in token order
    a = a[np.argsort(choice.ravel()[a], kind="stable")]                       # ... grouped by expert
    dispatch = Dispatch(a // k, choice.ravel()[a], np.bincount(choice.ravel()[a], minlength=E))
    chosen = onehot.sum(axis=1)                                               # (B,E) choices per sequence
    share = probs.reshape(B, T, E).mean(axis=1)                               # (B,E) P_e per sequence
    aux = float(E * np.mean(np.sum(chosen / (T * k) * share, axis=-1)))
    return probs, dispatch, chosen, Routing(chosen.sum(axis=0), dispatch.counts, aux)


def segments(counts):
    """(expert, slice of its rows) of rows sorted by expert, `counts` rows each, for the experts that have rows."""
    ends = np.cumsum(counts)
    return [(e, slice(end - n, end)) for e, (n, end) in enumerate(zip(counts, ends)) if n]


def experts_forward(xs, counts, w):
    """Each expert's MLP on its consecutive rows of xs (n, C); `w`: the experts' stacked weights by EXPERT name
    (those an expert-parallel rank holds, its counts theirs)."""
    a = np.empty((xs.shape[0], w["c_fc.w"].shape[2]), xs.dtype)
    for e, rows in segments(counts):
        a[rows], _ = linear_forward(xs[rows], w["c_fc.w"][e], w["c_fc.b"][e])
    hidden, c_gelu = gelu_forward(a)
    ys = np.empty_like(xs)
    for e, rows in segments(counts):
        ys[rows], _ = linear_forward(hidden[rows], w["c_proj.w"][e], w["c_proj.b"][e])
    return ys, (xs, counts, c_gelu, hidden)


def experts_backward(dys, cache, w, g):
    """The experts' input gradient (n, C); their weight gradients added into `g` (by EXPERT name)."""
    xs, counts, c_gelu, hidden = cache
    dhidden = np.empty_like(hidden)
    for e, rows in segments(counts):
        dhidden[rows] = linear_backward(dys[rows], hidden[rows], w["c_proj.w"][e], g["c_proj.w"][e], g["c_proj.b"][e])
    da = gelu_backward(dhidden, c_gelu)
    dxs = np.empty_like(xs)
    for e, rows in segments(counts):
        dxs[rows] = linear_backward(da[rows], xs[rows], w["c_fc.w"][e], g["c_fc.w"][e], g["c_fc.b"][e])
    return dxs


class Experts(NamedTuple):
    """How the experts run on the dispatched rows: forward(xs, counts, w) -> (ys, cache), counts the rows of each
    of the model's experts and `w` the stacks this rank holds (by EXPERT name); backward(dys, cache, w, g) -> dxs,
    adding into the stacks' gradients `g`. Expert parallelism runs them on other ranks."""
    forward: Callable
    backward: Callable


LOCAL = Experts(experts_forward, experts_backward)         # every expert here


def local(p):
    """The experts' stacked weights (or gradients) of a block's views `p`, by EXPERT name."""
    return {name: p[f"mlp.experts.{name}"] for name in EXPERT}


def moe_forward(h, p, gpt_cfg, experts=LOCAL):
    """The mixture of experts on h (B,T,C): its output and cache (a Routed)."""
    B, T, C = h.shape
    probs, dispatch, chosen, routing = route(h, p["mlp.router.w"], gpt_cfg)
    ys, c_experts = experts.forward(h.reshape(-1, C)[dispatch.tokens], dispatch.counts, local(p))
    gates = probs[dispatch.tokens, dispatch.experts]
    out = np.zeros((B * T, C), h.dtype)
    scatter_add_rows(out, dispatch.tokens, ys * gates[:, None])              # a token's k outputs add up
    # aux = mean over the B sequences of E sum_e f_e mean_t p_te, f_e = chosen_e / (T k): d aux / d p_te = chosen_e
    # times daux
    daux = gpt_cfg.aux_loss_coef * gpt_cfg.n_experts / (B * T * T * gpt_cfg.top_k)
    return out.reshape(B, T, C), Routed(h, probs, dispatch, chosen, daux, experts, c_experts, ys, routing)


def moe_backward(dout, cache, p, g, dloss):
    """The input gradient of moe_forward (its experts' backward where its forward ran them); `dloss` is the seed of
    the loss the block's aux term (weight a) adds to."""
    h, probs, dispatch, chosen, daux, experts, c_experts, ys, _ = cache
    B, T, C = h.shape
    dy = dout.reshape(-1, C)[dispatch.tokens]                                 # (n,C): each row's output gradient
    dprobs = np.zeros_like(probs)
    dprobs[dispatch.tokens, dispatch.experts] = rowsum(dy * ys)[:, 0]         # out = sum gate * y
    dy *= probs[dispatch.tokens, dispatch.experts][:, None]
    dxs = experts.backward(dy, c_experts, local(p), local(g))
    dprobs.reshape(B, T, -1)[...] += (chosen * (dloss * daux)).astype(probs.dtype)[:, None, :]
    dlogits = probs * (dprobs - rowsum(probs * dprobs))                       # softmax's backward
    dh = linear_backward(dlogits, h.reshape(-1, C), p["mlp.router.w"], g["mlp.router.w"], None)
    scatter_add_rows(dh, dispatch.tokens, dxs)
    return dh.reshape(B, T, C)


def summary(routings):
    """A step's routing as the log records it: the blocks' mean balance loss, the share of assignments dropped,
    and the assignments each expert computed, per block."""
    chosen, kept = sum(int(r.chosen.sum()) for r in routings), sum(int(r.kept.sum()) for r in routings)
    return {"aux_loss": float(np.mean([r.aux for r in routings])), "dropped": 1.0 - kept / chosen,
            "expert_load": [r.kept.tolist() for r in routings]}


def parameters(gpt_cfg, n):
    """A model's `n` parameters in words; with experts, also how many a token meets (the active parameters)."""
    if not gpt_cfg.n_experts:
        return f"{n:,} parameters"
    E, k, C = gpt_cfg.n_experts, gpt_cfg.top_k, gpt_cfg.n_embd
    idle = gpt_cfg.n_layer * (E - k) * (8 * C * C + 5 * C)           # the experts a token is not sent to
    return f"{n:,} parameters ({E} experts per block, top {k}: {n - idle:,} per token)"
