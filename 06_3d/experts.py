"""Expert parallelism: the experts of every block split over the `ep` ranks, each token's row sent to the rank
holding its expert and its output sent back, by MPI's all-to-all (GShard arXiv:2006.16668, Switch Transformer
arXiv:2101.03961, DeepSpeed-MoE arXiv:2201.05596).

Shard. Rank r of ep holds experts r E/ep .. (r + 1) E/ep - 1 of every block (those rows of the stacked weights);
the router and everything else stay whole on every rank. The ep ranks are data-parallel ranks, as in DeepSpeed
and Megatron: each routes the tokens of its own rows of the batch (common/moe.py, per sequence, so exactly as
one core routes them), so every expert sees the tokens of ep ranks' rows without any rank holding every expert.

Dispatch and combine, per block and micro-batch. A rank's kept assignments, sorted by expert, are consecutive
rows per owner. (1) An all-to-all of the counts: each rank tells each owner how many rows it sends each of its
experts. (2) Dispatch: an all-to-all of the rows. (3) Each owner runs each of its experts on the rows it
received for it, from every rank in rank order. (4) Combine: an all-to-all of the outputs back, in the order
they left, where the gates weigh them as on one core. The backward is the same in reverse: the outputs'
gradients to the owners, each expert's backward (its weight gradient sums every token sent to it, from all the
ep ranks), the inputs' gradients back.

Gradients. The dense weights are replicated over dp and summed over it as before; the experts of one rank are
held by the dp / ep ranks at the same place in their ep groups (edp), whose sum completes them. Every
micro-batch's loss is seeded with 1/(dp M) as for dense weights: each row's output gradient carries its sender's
seed to the owner.

Bytes per block and micro-batch on a rank that sends n rows and whose experts receive m (C channels, e bytes;
the ledger counts each call's send buffer): forward 8 E (the counts, int64) + n C e (dispatch) + m C e
(combine); backward n C e + m C e; full recomputation repeats the forward's. On average m = n, and (ep - 1)/ep
of it leaves the rank.
"""
import numpy as np

from common.chapters import import_chapter
from common.config import ConfigError
from common.moe import Experts, capacity, experts_backward, experts_forward

dp_lib = import_chapter("03_data_parallel.data_parallel")


def check_layout(gpt_cfg, ep_size, dp_size):
    """--ep's constraints, as one ConfigError naming the flag."""
    if ep_size > 1 and not gpt_cfg.n_experts:
        raise ConfigError(f"--ep {ep_size} splits the experts of a mixture of experts: give --n-experts too")
    if gpt_cfg.n_experts % ep_size:
        raise ConfigError(f"--ep {ep_size} does not divide --n-experts {gpt_cfg.n_experts}; choose a divisor of "
                          f"{gpt_cfg.n_experts}")
    if dp_size % ep_size:
        raise ConfigError(f"--ep {ep_size} takes its ranks from the data-parallel ones, but does not divide --dp "
                          f"{dp_size}; choose a divisor of {dp_size}")


def owned(n_experts, ep_size, rank):
    """The experts ep rank `rank` holds: a slice of the model's."""
    size = n_experts // ep_size
    return slice(rank * size, (rank + 1) * size)


def by_expert(got):
    """The order that turns rows received source by source (got[s, e] rows from source s for expert e, each
    source's in expert order) into rows expert by expert, each expert's in source order."""
    starts = (np.cumsum(got.ravel()) - got.ravel()).reshape(got.shape)
    return np.concatenate([np.arange(starts[s, e], starts[s, e] + got[s, e]) for e in range(got.shape[1])
                           for s in range(got.shape[0])] + [np.zeros(0, np.int64)]).astype(np.int64)


class ExpertParallel:
    """The experts' pair (common.moe.Experts, `pair`) over the `ep` communicator: this rank holds
    `n_experts / ep` of them; the rows of the others are sent to their owners and come back."""

    def __init__(self, ep, n_experts):
        self.ep, self.per_rank = ep, n_experts // ep.size
        self.pair = Experts(self.forward, self.backward)
        self.kept = []                  # the rows of every forward, per expert of the model: for the ledger

    def exchange(self, rows, counts_out, counts_in):
        """Rows to every rank (counts_out[r] to rank r) and back from every rank (counts_in[r]): one all-to-all."""
        C = rows.shape[1]
        out = np.empty((int(counts_in.sum()), C), rows.dtype)
        self.ep.alltoall(rows, out, counts_out * C, counts_in * C)
        return out

    def forward(self, xs, counts, w):
        self.kept.append(counts.copy())
        sent = counts.reshape(self.ep.size, self.per_rank).astype(np.int64)   # rows for each owner's experts
        got = np.empty_like(sent)
        self.ep.alltoall(sent, got)                                  # rows each rank sends each of my experts
        rows_out, rows_in = sent.sum(axis=1), got.sum(axis=1)
        order = by_expert(got)
        ys, cache = experts_forward(self.exchange(xs, rows_out, rows_in)[order], got.sum(axis=0), w)
        back = np.empty_like(ys)
        back[order] = ys                                             # source by source again
        return self.exchange(back, rows_in, rows_out), (cache, order, rows_out, rows_in)

    def backward(self, dys, cache, w, g):
        c_experts, order, rows_out, rows_in = cache
        dxs = experts_backward(self.exchange(dys, rows_out, rows_in)[order], c_experts, w, g)
        back = np.empty_like(dxs)
        back[order] = dxs
        return self.exchange(back, rows_in, rows_out)


def alltoall(blocks):
    """MPI's all-to-all among len(blocks) ranks in one process: blocks[r][s] is what rank r sends rank s, and
    rank r receives [blocks[s][r] for every s], the transpose of the matrix of blocks."""
    return [[blocks[s][r] for s in range(len(blocks))] for r in range(len(blocks))]


def simulate(xs, counts, w):
    """ExpertParallel's forward for every ep rank in one process, each all-to-all a transpose (alltoall): xs[r]
    are rank r's rows sorted by expert, counts[r] its rows per expert of the model, `w` every expert's stacks (by
    EXPERT name). Returns each rank's outputs, row for row."""
    P, E = len(xs), len(counts[0])
    owners = [owned(E, P, o) for o in range(P)]
    sent = alltoall([[c[mine] for mine in owners] for c in counts])             # sent[o][s]: s's rows per expert
    rows = alltoall([np.split(x, np.cumsum([c[mine].sum() for mine in owners])[:-1]) for x, c in zip(xs, counts)])
    back = []
    for o, mine in enumerate(owners):
        got = np.array(sent[o])
        order = by_expert(got)
        ys, _ = experts_forward(np.concatenate(rows[o])[order], got.sum(axis=0), {k: v[mine] for k, v in w.items()})
        out = np.empty_like(ys)
        out[order] = ys
        back.append(np.split(out, np.cumsum(got.sum(axis=1))[:-1]))
    return [np.concatenate(blocks) for blocks in alltoall(back)]


def rows_moved(kept, rank, ep_size):
    """(n, m) of ep rank `rank` for one block and micro-batch, from every ep rank's Routing.kept (rows per expert
    they computed): the rows it sends, and the rows of every rank its experts receive."""
    mine = owned(len(kept[0]), ep_size, rank)
    return int(np.sum(kept[rank])), int(sum(np.sum(k[mine]) for k in kept))


def balanced(gpt_cfg, rows, calls):
    """rows_moved predicted without a routing: every one of `calls` forwards sends and receives as many rows as the
    capacity lets `rows` sequences have (a balanced router drops none)."""
    n = rows * min(gpt_cfg.block_size * gpt_cfg.top_k, gpt_cfg.n_experts * capacity(gpt_cfg.block_size, gpt_cfg))
    return [(n, n)] * calls


def comm_formula(n_experts, calls, itemsize, C, recompute="none"):
    """{kind: bytes} one rank passes to the ep communicator in a step (see the module docstring): `calls` lists
    (n, m) of every forward its experts ran (rows_moved), the rows it sent and the rows its experts received; a
    backward runs once per block and micro-batch, whose forward full recomputation runs twice."""
    rows = sum(n + m for n, m in calls) * C * itemsize
    return {"alltoall": 8 * n_experts * len(calls) + rows + rows // (2 if recompute == "full" else 1)} if calls else {}


class Split:
    """Chapter 03's gradient-sync protocol on a gradient of two parts: the dense tensors' sync (`dense`, over dp
    x cp: buckets started during the backward, as before) and the experts' (`experts`, over edp, after it)."""
    every_microbatch = False

    zero_grad, step = dp_lib.GradSync.zero_grad, dp_lib.GradSync.step      # on the whole gradient

    def __init__(self, dense, experts, grads, params):
        self.dense, self.experts, self.grads, self.params = dense, experts, grads, params

    def forward_hook(self, part):
        return self.dense.forward_hook(part)

    def backward_hook(self, part):
        return self.dense.backward_hook(part)

    def ready(self, name):
        self.dense.ready(name)

    def finish(self):
        self.dense.finish()
        self.experts.finish()


class SplitZero(Split):
    """ZeRO-1 on a gradient of two parts: `dense`'s (a chapter 04 Zero over dp x cp) and `experts`' (over edp), each
    reduce-scattering and all-gathering its own part. AdamW steps this rank's two shards as one array, `pshard`
    (a copy, `cut` elements of the dense shard first), which `push` copies back and `pull` refreshes."""
    stage = 1

    def __init__(self, dense, experts, grads):
        super().__init__(dense, experts, grads, None)
        self.cut = dense.hi - dense.lo
        self.p, self.g = {**dense.p, **experts.p}, {**dense.g, **experts.g}
        self.pshard = np.concatenate([dense.pshard, experts.pshard])
        self.gshard = np.zeros(self.pshard.size, grads.dtype)

    def shard_of(self, flat):
        """This rank's two shards, concatenated, of a flat buffer of its whole layout (dense part first)."""
        n = self.dense.layout.size
        return np.concatenate([flat[:n][self.dense.lo:self.dense.hi], flat[n:][self.experts.lo:self.experts.hi]])

    def step(self, opt, lr, grad_clip, norm_of):
        self.gshard[:self.cut], self.gshard[self.cut:] = self.dense.gshard, self.experts.gshard
        g = opt.unscaled(self.gshard)
        opt.update(self.pshard, g, lr, grad_clip, norm_of(g))
        self.push()
        for zero in (self.dense, self.experts):
            zero.dp.allgather(None, zero.params, np.diff(zero.bounds))      # in place, as chapter 04's step

    def push(self):
        self.dense.pshard[...], self.experts.pshard[...] = self.pshard[:self.cut], self.pshard[self.cut:]

    def pull(self):
        self.pshard[:self.cut], self.pshard[self.cut:] = self.dense.pshard, self.experts.pshard

    def gather_flat(self, shard):
        """A flat buffer of the whole layout from every rank's `shard`: each part gathered on its root (zeros where
        a rank is not one), so that experts can then be gathered over ep on every rank."""
        flat = np.zeros(self.dense.layout.size + self.experts.layout.size, shard.dtype)
        for zero, part, where in ((self.dense, shard[:self.cut], slice(0, self.dense.layout.size)),
                                  (self.experts, shard[self.cut:], slice(self.dense.layout.size, None))):
            got = zero.gather_flat(part)
            if got is not None:
                flat[where] = got
        return flat
