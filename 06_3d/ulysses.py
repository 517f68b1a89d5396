"""DeepSpeed-Ulysses (Jacobs et al., arXiv:2309.14509): context parallelism's attention by two all-to-alls that
trade the sequence split for a split of the heads, where ring attention passes keys and values round.

Shard. As for the ring (context_parallel.py), cp rank r holds T/cp positions pos_r of every activation (zig-zag
or contiguous), and everything but attention runs on them unchanged. Around attention the heads are split
instead: the n_head/tp heads of a tp rank are cut into cp groups of n_head/(tp cp), and cp rank j takes group j,
at every position.

Forward. Attention mixes positions, never heads. One all-to-all on the cp communicator sends to cp rank j the
rank's q|k|v of head group j at its positions, (b, T/cp, 3 C/(tp cp)); rank j puts what it receives in sequence
order (rank r's rows are the positions pos_r), so that it holds q, k, v of its group at every position,
(b, T, 3 C/(tp cp)), and runs chapter 01's causal attention on them unchanged (the scores kept, or recomputed in
the backward under --recompute selective):
    y[:, :, group j] = attention(q, k, v of group j at all T positions)       on cp rank j
A second all-to-all returns each rank its positions of every group's output, (b, T/cp, C/tp), for c_proj.
Backward. An all-to-all only moves blocks, so its gradient is the all-to-all back: the output's gradient goes to
the head groups, attention's backward runs there, and q|k|v's gradient returns to the positions.

Communication per block and micro-batch, per rank (b rows, T/cp positions, C/tp channels; e bytes), each
all-to-all's send buffer counted whole, as the ledger counts it:
    forward:   an all-to-all of q|k|v, and one of the output          3 b (T/cp) (C/tp) e, and b (T/cp) (C/tp) e
    backward:  the same of the output's gradient, and of q|k|v's
(full recomputation runs the forward's again). One block of each stays on the rank, so (cp - 1)/cp of the
8 b (T/cp) (C/tp) e go to other ranks: per rank it falls as 1/cp, where the ring's 2 (3 cp - 2) b (T/cp) (C/tp) e
does not. But the heads bound the split: cp must divide n_head/tp. The cache is attention's, at every position of
the group's heads: q, k, v (as many bytes as the ring keeps) and, unless recomputed, the probabilities,
n_head T^2 / (tp cp) per row, where the ring keeps a log-sum-exp per query instead.
"""
import numpy as np

from common.chapters import import_chapter
from common.layers import attention_backward, attention_forward

cp_lib = import_chapter("06_3d.context_parallel")


# ----------------------------------------------------------------------------- the two all-to-alls' blocks

def every_rank_positions(T, cp_size, split="zigzag"):
    """Every cp rank's positions (context_parallel.positions), one row per rank: (cp, T/cp)."""
    return np.stack([cp_lib.positions(T, cp_size, r, split) for r in range(cp_size)])


def by_head_group(x, parts, cp_size):
    """A rank's positions of its heads, (B,Tl,parts nh hs) (parts: 3 for q|k|v, 1 for an output), as the blocks
    the all-to-all sends, block j head group j: (cp, B, Tl, parts nh/cp hs)."""
    B, Tl, F = x.shape
    blocks = x.reshape(B, Tl, parts, cp_size, F // (parts * cp_size)).transpose(3, 0, 1, 2, 4)
    return np.ascontiguousarray(blocks).reshape(cp_size, B, Tl, F // cp_size)


def in_sequence(blocks, held):
    """Every rank's block of the same columns, (cp,B,Tl,G), as one (B,T,G) in sequence order: rank r's rows are
    the positions held[r]."""
    P, B, Tl, G = blocks.shape
    out = np.empty((B, P * Tl, G), dtype=blocks.dtype)
    out[:, held] = blocks.transpose(1, 0, 2, 3)
    return out


def by_rank(x, held):
    """Every position of a head group, (B,T,G), as the blocks the all-to-all sends, block r the positions
    held[r]: (cp, B, Tl, G)."""
    return np.ascontiguousarray(x[:, held].transpose(1, 0, 2, 3))


def every_head(blocks, parts):
    """Each head group's block of a rank's positions, (cp,B,Tl,G), as that rank's columns of every head,
    (B,Tl,parts nh hs): within each part, head group j's heads at the j-th place."""
    P, B, Tl, G = blocks.shape
    return blocks.reshape(P, B, Tl, parts, G // parts).transpose(1, 2, 3, 0, 4).reshape(B, Tl, P * G)


# ----------------------------------------------------------------------------- forward and backward

class Ulysses:
    """DeepSpeed-Ulysses over the `cp` communicator: the attention pair tensor parallelism's blocks call
    (tp_parts(..., attention=ulysses)), as Ring's, on this rank's T/cp positions."""

    def __init__(self, cp, T, split="zigzag"):
        self.cp = cp
        self.held = every_rank_positions(T, cp.size, split)

    def to_heads(self, x, parts):
        """The all-to-all from this rank's positions of every head to every position of its head group."""
        send = by_head_group(x, parts, self.cp.size)
        return in_sequence(self.cp.alltoall(send, np.empty_like(send)), self.held)

    def to_positions(self, x, parts):
        """The all-to-all back, from every position of this rank's head group to its positions of every head."""
        send = by_rank(x, self.held)
        return every_head(self.cp.alltoall(send, np.empty_like(send)), parts)

    def forward(self, qkv, n_head, keep_scores=True):
        y, cache = attention_forward(self.to_heads(qkv, 3), n_head // self.cp.size, keep_scores)   # (B,T,C/tp cp)
        return self.to_positions(y, 1), cache

    def backward(self, dout, cache):
        return self.to_positions(attention_backward(self.to_heads(dout, 1), cache), 3)


# ----------------------------------------------------------------------------- in one process

def simulate(qkv, n_head, cp_size, split="zigzag"):
    """Ulysses for every rank in one process: each rank's positions of qkv (B,T,3C), the all-to-alls done by
    handing block j of every rank's send to rank j, chapter 01's attention on each rank's head group. Returns
    (y, a function from dy to dqkv), as the ring's simulate."""
    held = every_rank_positions(qkv.shape[1], cp_size, split)

    def alltoall(sends):
        return [np.stack([send[j] for send in sends]) for j in range(cp_size)]

    def to_heads(xs, parts):
        return [in_sequence(blocks, held) for blocks in alltoall([by_head_group(x, parts, cp_size) for x in xs])]

    def to_positions(xs, parts):
        return [every_head(blocks, parts) for blocks in alltoall([by_rank(x, held) for x in xs])]

    ys, caches = zip(*(attention_forward(h, n_head // cp_size) for h in to_heads([qkv[:, p] for p in held], 3)))

    def backward(dy):
        dqkv = [attention_backward(d, c) for d, c in zip(to_heads([dy[:, p] for p in held], 1), caches)]
        return in_sequence(np.stack(to_positions(dqkv, 3)), held)

    return in_sequence(np.stack(to_positions(ys, 1)), held), backward
