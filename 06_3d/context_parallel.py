"""Context parallelism: the sequence cut across the `cp` ranks for the whole model, attention included (ring
attention here, or DeepSpeed-Ulysses: ulysses.py), so each rank holds 1/cp of every activation.

Shard. Rank r holds T/cp positions of every activation. Zig-zag (the default): the sequence is cut into 2 cp
chunks and rank r holds chunks r and 2 cp - 1 - r, so under the causal mask every rank has the same attention
work; contiguous: cp chunks, rank r the r-th, and rank r attends to r + 1 chunks (the last rank does cp times
the first's work). Everything but attention acts on each position alone and runs unchanged on the rank's
positions; the position embedding reads the rank's rows of wpe. The weights are replicated over cp, as over
dp, and each rank's gradient is the sum over its own positions only: gradients are summed over dp x cp at once
(the dcp communicator) and every micro-batch's loss is seeded with 1/(dp cp M).

Forward (ring attention). A query needs the keys and values of every earlier position, and other ranks hold
most of them, so they travel: at step k rank r holds the K, V block of rank r - k, posts its sends to r + 1 (and
the receive of the next block from r - 1) and computes its queries' scores against the block, chunk pair by
chunk pair (a pair wholly in the future is skipped; the diagonal one is causally masked), merging each into a
running softmax per query row (the online softmax; s the new scores, v their values):
    m' = max(m, rowmax s),   l' = l e^(m - m') + rowsum e^(s - m'),   o' = o e^(m - m') + e^(s - m') v
and finally y = o / l. The cache keeps q, k, v, y and the log-sum-exp L = m + log l: no (T, T) scores.
Backward. The probabilities are recomputed from q, k and L, p = e^(s - L), and with D = rowsum(dy * y), which
equals rowsum(da * a), the sum softmax's backward needs:
    dv += p^T dy,   ds = p * (dy v^T - D) / sqrt(hs),   dq += ds k,   dk += ds^T q
The K, V blocks go round the ring again, each with its dK, dV accumulator, which ends back at its owner.

Communication per block and micro-batch, per rank (b rows, T/cp positions, C/tp channels of k and of v; e bytes):
    forward:   cp - 1 isends and irecvs of K, V          2 b (T/cp) (C/tp) e each
    backward:  cp - 1 of K, V, and cp of dK, dV          2 b (T/cp) (C/tp) e each
(full recomputation runs the forward's again), and the gradient sum over dp x cp (chapter 03's formula). A rank
sends 2 (3 cp - 2) b (T/cp) (C/tp) e per block (and receives as much), which does not fall as cp grows: it tends
to 6 b T (C/tp) e. Ulysses (ulysses.py) sends 8 b (T/cp) (C/tp) e through all-to-alls instead, (cp - 1)/cp of it
to other ranks, falling as 1/cp; comm_formula gives both.
"""
import math

import numpy as np

from common.comm import wait_all
from common.config import ConfigError
from common.layers import causal_mask, rowsum


# ----------------------------------------------------------------------------- shard

SPLITS = ("zigzag", "contiguous")                # --cp-split


def n_chunks(cp_size, split="zigzag"):
    """How many equal chunks the sequence is cut into: 2 cp for zig-zag, cp for contiguous."""
    return 2 * cp_size if split == "zigzag" else cp_size


def chunks_of(rank, cp_size, split="zigzag"):
    """The sequence chunks cp rank `rank` holds, in order: zig-zag r and 2 cp - 1 - r of 2 cp; else r of cp."""
    return [rank, 2 * cp_size - 1 - rank] if split == "zigzag" else [rank]


def positions(T, cp_size, rank, split="zigzag"):
    """The global positions (ascending) of rank `rank`'s T / cp activations."""
    size = T // n_chunks(cp_size, split)
    return np.concatenate([np.arange(c * size, (c + 1) * size) for c in chunks_of(rank, cp_size, split)])


def check_layout(gpt_cfg, cp_size, split, tp_size=1, sp=False, mode="ring"):
    """--cp's constraints, as one ConfigError naming the flag."""
    heads = gpt_cfg.n_head // tp_size
    if mode == "ulysses" and heads % cp_size:
        raise ConfigError(f"--cp-mode ulysses splits the n_head/tp = {heads} heads of each tp rank over --cp "
                          f"{cp_size}; choose --cp dividing {heads}")
    pieces = n_chunks(cp_size, split)
    if gpt_cfg.block_size % pieces:
        raise ConfigError(f"--block-size {gpt_cfg.block_size} does not split into the {pieces} equal chunks --cp "
                          f"{cp_size} with --cp-split {split} needs; choose a multiple of {pieces}")
    if sp and (gpt_cfg.block_size // cp_size) % tp_size:
        raise ConfigError(f"--sequence-parallel splits each cp rank's {gpt_cfg.block_size // cp_size} positions over "
                          f"--tp {tp_size}; choose --block-size a multiple of {cp_size * tp_size}")


def attention_work(T, cp_size, split):
    """Score entries (per row and head) each cp rank computes: its (query chunk, key chunk) pairs not wholly in
    the future, each chunk^2."""
    size = T // n_chunks(cp_size, split)
    every = [c for r in range(cp_size) for c in chunks_of(r, cp_size, split)]
    return [sum(size * size for qc in chunks_of(r, cp_size, split) for kc in every if kc <= qc)
            for r in range(cp_size)]


# ----------------------------------------------------------------------------- forward and backward

def scores(q, k, diagonal):
    """q k^T / sqrt(hs) of one chunk pair, causally masked when the two chunks are one: (B,nh,n,n)."""
    s = q @ k.transpose(0, 1, 3, 2)
    s *= 1.0 / math.sqrt(q.shape[-1])
    if diagonal:
        s += causal_mask(s.shape[-1], s.dtype)
    return s


def merge(m, l, o, s, v):
    """Fold one block of scores s (B,nh,n,n') and its values v (B,nh,n',hs) into the running softmax of its
    query rows, in place: row max m, sum l (B,nh,n,1) and unnormalised output o (B,nh,n,hs)."""
    new = np.maximum(m, s.max(axis=-1, keepdims=True))
    rescale = np.exp(m - new)                                   # e^(m - m'): 0 while m is -inf (nothing seen)
    np.exp(s - new, out=s)                                      # the block's probabilities, unnormalised
    l *= rescale
    l += rowsum(s)
    o *= rescale
    o += s @ v
    m[...] = new


def block_backward(s, q, k, v, dy, lse, D, dq, dk, dv):
    """The gradients one block of scores s = q k^T / sqrt(hs) (masked) passes to q, k and v, added into dq, dk,
    dv: the probabilities recomputed from the log-sum-exp, p = e^(s - L), and softmax's backward with
    D = rowsum(dy * y) for its sum."""
    p = s
    p -= lse
    np.exp(p, out=p)
    dv += p.transpose(0, 1, 3, 2) @ dy                          # y = p v
    ds = dy @ v.transpose(0, 1, 3, 2)                           # dp
    ds -= D
    ds *= p                                                     # ds = p (dp - D)
    ds *= 1.0 / math.sqrt(q.shape[-1])
    dq += ds @ k
    dk += ds.transpose(0, 1, 3, 2) @ q


class Ring:
    """Ring attention over the `cp` communicator: the attention pair (forward, backward) tensor parallelism's
    blocks call (tp_parts(..., attention=ring)), on this rank's T/cp positions. `work` counts the score entries
    (per row and head) it computed, forward and backward."""

    def __init__(self, cp, T, split="zigzag"):
        self.cp, self.split = cp, split
        self.size = T // n_chunks(cp.size, split)                                # positions per chunk
        self.chunks = [chunks_of(r, cp.size, split) for r in range(cp.size)]
        self.work = 0

    def pairs(self, src):
        """(query slice, key slice, diagonal) of the chunk pairs of this rank's queries and src's keys that are
        not wholly in the future."""
        n = self.size
        return [(slice(i * n, (i + 1) * n), slice(j * n, (j + 1) * n), qc == kc)
                for i, qc in enumerate(self.chunks[self.cp.rank]) for j, kc in enumerate(self.chunks[src])
                if kc <= qc]

    def scores(self, q, k, diagonal):
        self.work += q.shape[-2] * k.shape[-2]
        return scores(q, k, diagonal)

    def rotate(self, buf, step, tag):
        """Start passing `buf` to the next rank and receiving the previous rank's: (its receive buffer, the
        requests)."""
        r, P = self.cp.rank, self.cp.size
        incoming = np.empty(buf.shape, buf.dtype)
        return incoming, [self.cp.isend(buf, (r + 1) % P, tag=2 * step + tag),
                          self.cp.irecv(incoming, (r - 1) % P, tag=2 * step + tag)]

    def forward(self, qkv, n_head, keep_scores=True):
        """Causal self-attention of this rank's queries over every rank's keys (keep_scores: no scores are kept
        whatever it says; the backward recomputes them)."""
        B, Tl, C3 = qkv.shape
        hs = C3 // (3 * n_head)
        q, k, v = qkv.reshape(B, Tl, 3, n_head, hs).transpose(2, 0, 3, 1, 4)     # each (B,nh,Tl,hs)
        kv = np.empty((2, *k.shape), dtype=qkv.dtype)                            # the block that travels
        kv[0], kv[1] = k, v
        m = np.full((B, n_head, Tl, 1), -np.inf, dtype=qkv.dtype)               # running row max
        l, o = np.zeros_like(m), np.zeros((B, n_head, Tl, hs), dtype=qkv.dtype)  # running sum and output
        P = self.cp.size
        for step in range(P):
            src = (self.cp.rank - step) % P
            incoming, requests = self.rotate(kv, step, 0) if step < P - 1 else (None, [])
            for qs, ks, diagonal in self.pairs(src):
                merge(m[:, :, qs], l[:, :, qs], o[:, :, qs], self.scores(q[:, :, qs], kv[0][:, :, ks], diagonal),
                      kv[1][:, :, ks])
            wait_all(requests)
            kv = incoming if incoming is not None else kv
        y = np.empty((B, Tl, n_head, hs), dtype=qkv.dtype)
        heads = y.transpose(0, 2, 1, 3)                                         # (B,nh,Tl,hs), a view of y
        np.divide(o, l, out=heads)
        np.log(l, out=l)
        l += m                                                                  # L = m + log l
        return y.reshape(B, Tl, n_head * hs), (q, k, v, heads, l)

    def backward(self, dout, cache):
        q, k, v, y, lse = cache
        B, nh, Tl, hs = q.shape
        dy = dout.reshape(B, Tl, nh, hs).transpose(0, 2, 1, 3)                 # (B,nh,Tl,hs)
        D = rowsum(dy * y)                                                      # = rowsum(da * a)
        dq = np.zeros_like(q)
        kv, dkv = np.empty((2, B, nh, Tl, hs), dtype=q.dtype), np.zeros((2, B, nh, Tl, hs), dtype=q.dtype)
        kv[0], kv[1] = k, v
        P = self.cp.size
        for step in range(P):
            src = (self.cp.rank - step) % P
            incoming, requests = self.rotate(kv, step, 0) if step < P - 1 else (None, [])
            for qs, ks, diagonal in self.pairs(src):
                block_backward(self.scores(q[:, :, qs], kv[0][:, :, ks], diagonal), q[:, :, qs], kv[0][:, :, ks],
                               kv[1][:, :, ks], dy[:, :, qs], lse[:, :, qs], D[:, :, qs], dq[:, :, qs],
                               dkv[0][:, :, ks], dkv[1][:, :, ks])
            wait_all(requests)
            # the block's gradient goes where the block goes; after the last step, to the block's owner
            dkv, more = self.rotate(dkv, step, 1) if P > 1 else (dkv, [])
            wait_all(more)
            kv = incoming if incoming is not None else kv
        dqkv = np.empty((B, Tl, 3, nh, hs), dtype=dout.dtype)
        dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
        dqkv[:, :, 1] = dkv[0].transpose(0, 2, 1, 3)
        dqkv[:, :, 2] = dkv[1].transpose(0, 2, 1, 3)
        return dqkv.reshape(B, Tl, 3 * nh * hs)


def simulate(qkv, n_head, cp_size, split="zigzag"):
    """The ring's arithmetic for every rank in one process, each rank's chunk pairs merged (merge) and their
    gradients taken (block_backward) as Ring does, the other ranks' K and V read directly instead of received:
    causal attention of the whole qkv (B,T,3C) without MPI. Returns (y, a function from dy to dqkv)."""
    B, T, _ = qkv.shape
    hs = qkv.shape[-1] // (3 * n_head)
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)         # each (B,nh,T,hs)
    n = T // n_chunks(cp_size, split)
    pairs = [(slice(qc * n, (qc + 1) * n), slice(kc * n, (kc + 1) * n), qc == kc)
             for r in range(cp_size) for qc in chunks_of(r, cp_size, split)
             for step in range(cp_size) for kc in chunks_of((r - step) % cp_size, cp_size, split) if kc <= qc]
    m = np.full((B, n_head, T, 1), -np.inf)
    l, o = np.zeros_like(m), np.zeros((B, n_head, T, hs))
    for qs, ks, diagonal in pairs:
        merge(m[:, :, qs], l[:, :, qs], o[:, :, qs], scores(q[:, :, qs], k[:, :, ks], diagonal), v[:, :, ks])
    y, lse = o / l, m + np.log(l)

    def backward(dy):
        g = dy.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
        D = rowsum(g * y)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        for qs, ks, diagonal in pairs:
            block_backward(scores(q[:, :, qs], k[:, :, ks], diagonal), q[:, :, qs], k[:, :, ks], v[:, :, ks],
                           g[:, :, qs], lse[:, :, qs], D[:, :, qs], dq[:, :, qs], dk[:, :, ks], dv[:, :, ks])
        return np.stack([dq, dk, dv], 2).transpose(0, 3, 2, 1, 4).reshape(B, T, -1)

    return y.transpose(0, 2, 1, 3).reshape(B, T, -1), backward


# ----------------------------------------------------------------------------- the ledger

def comm_formula(gpt_cfg, rows, itemsize, cp_size, tp_size=1, blocks=None, microbatches=1, recompute="none",
                 mode="ring"):
    """{kind: bytes} one rank passes to the cp communicator in a step (see the module docstring): ring attention's
    messages, or (mode "ulysses") the whole send buffers of its all-to-alls."""
    if cp_size == 1:
        return {}
    blocks = gpt_cfg.n_layer if blocks is None else blocks
    piece = rows * (gpt_cfg.block_size // cp_size) * (gpt_cfg.n_embd // tp_size) * itemsize   # b (T/cp) (C/tp) e
    forwards = 2 if recompute == "full" else 1
    if mode == "ulysses":                     # q|k|v and the output each way: 3 + 1 pieces, forward and backward
        return {"alltoall": microbatches * blocks * (forwards + 1) * 4 * piece}
    n = microbatches * blocks * (forwards * (cp_size - 1) + (cp_size - 1) + cp_size)
    return {"isend": n * 2 * piece, "irecv": n * 2 * piece}                                 # K and V
