"""How tensor parallelism splits each single-core tensor over tp ranks, and how the pieces go back together.

wte by vocabulary rows (padded to a multiple of tp), c_attn by heads (each head's q, k and v columns), c_fc by
columns, the c_proj weights by rows; everything else (LayerNorms, row-parallel biases, wpe) is replicated.
Every rank draws the whole single-core initialisation from the seed and keeps its pieces (`shard`), so the
parallel model starts equal to the serial one with no communication; `unshard` rebuilds whole tensors for
checkpoints, which stay layout-independent.
"""
import numpy as np

from common.config import ConfigError
from common.model import param_shapes
from common.params import Layout


def check_layout(gpt_cfg, tp_size, sp=False):
    """Raise ConfigError unless the model (and, with sequence parallelism, the sequence) splits evenly."""
    if gpt_cfg.n_head % tp_size:
        divisors = [d for d in range(1, gpt_cfg.n_head + 1) if gpt_cfg.n_head % d == 0]
        raise ConfigError(f"--tp {tp_size} does not divide n_head={gpt_cfg.n_head}; choose one of {divisors}")
    if sp and gpt_cfg.block_size % tp_size:
        raise ConfigError(f"--sequence-parallel needs --tp {tp_size} to divide --block-size {gpt_cfg.block_size}; "
                          f"choose a block size that is a multiple of {tp_size}")


def padded_vocab(V, tp_size):
    return -(-V // tp_size) * tp_size


def kind(name):
    """How a single-core tensor is split: by vocabulary rows, by heads (packed q|k|v), by columns, by rows, or not
    (a mixture of experts' router and experts too: tp splits the dense parts)."""
    if name == "wte":
        return "vocab"
    if name.endswith("c_attn.w") or name.endswith("c_attn.b"):
        return "heads"
    if ".experts." in name:
        return "replicated"
    if name.endswith("c_fc.w") or name.endswith("c_fc.b"):
        return "columns"
    if name.endswith("c_proj.w"):
        return "rows"
    return "replicated"


def shard_tensor(name, full, gpt_cfg, tp_size, rank):
    """This rank's piece of the single-core tensor `full`."""
    k = kind(name)
    if k == "vocab":
        Vl = padded_vocab(gpt_cfg.vocab_size, tp_size) // tp_size
        padded = np.zeros((Vl * tp_size, full.shape[1]), dtype=full.dtype)
        padded[:gpt_cfg.vocab_size] = full
        return padded[rank * Vl:(rank + 1) * Vl]
    if k == "heads":                                    # (..., 3C) -> (..., 3, nh, hs) -> this rank's heads
        nhl = gpt_cfg.n_head // tp_size
        heads = full.reshape(*full.shape[:-1], 3, gpt_cfg.n_head, gpt_cfg.head_size)
        return heads[..., rank * nhl:(rank + 1) * nhl, :].reshape(*full.shape[:-1], -1)
    if k == "columns":
        return np.split(full, tp_size, axis=-1)[rank]
    if k == "rows":
        return np.split(full, tp_size, axis=0)[rank]
    return full


def unshard_tensor(name, pieces, gpt_cfg):
    """The single-core tensor from every rank's piece, in rank order (the inverse of shard_tensor)."""
    k = kind(name)
    if k == "vocab":
        return np.concatenate(pieces, axis=0)[:gpt_cfg.vocab_size]
    if k == "heads":
        lead = pieces[0].shape[:-1]
        heads = [p.reshape(*lead, 3, -1, gpt_cfg.head_size) for p in pieces]
        return np.concatenate(heads, axis=-2).reshape(*lead, -1)
    if k == "columns":
        return np.concatenate(pieces, axis=-1)
    if k == "rows":
        return np.concatenate(pieces, axis=0)
    return pieces[0]


def shard_shape(name, shape, gpt_cfg, tp_size):
    """The shape of a rank's piece of the single-core tensor `name` of `shape` (shard_tensor's, from sizes alone)."""
    k = kind(name)
    if k == "vocab":
        return (padded_vocab(gpt_cfg.vocab_size, tp_size) // tp_size, *shape[1:])
    if k in ("heads", "columns"):
        return (*shape[:-1], shape[-1] // tp_size)
    if k == "rows":
        return (shape[0] // tp_size, *shape[1:])
    return tuple(shape)


def tp_layout(gpt_cfg, tp_size):
    """The layout of one rank's flat buffer: the single-core names with their per-rank shapes."""
    return Layout([(name, shard_shape(name, shape, gpt_cfg, tp_size)) for name, shape in param_shapes(gpt_cfg)])


def shard(full_views, layout, gpt_cfg, tp_size, rank, dtype):
    """A flat per-rank buffer holding this rank's pieces of the single-core tensors `full_views`."""
    flat = np.zeros(layout.size, dtype=dtype)
    for name, view in layout.views(flat).items():
        view[...] = shard_tensor(name, full_views[name], gpt_cfg, tp_size, rank)
    return flat


def unshard(flat, layout, gpt_cfg, comm):
    """Every single-core tensor, whole, on every rank: one all-gather of the flat per-rank buffers."""
    gathered = comm.allgather(flat, np.empty((comm.size, flat.size), dtype=flat.dtype))
    views = [layout.views(row) for row in gathered]
    return {name: unshard_tensor(name, [v[name] for v in views], gpt_cfg) for name in layout.shapes}
