"""The token files written by data/prepare.py and a batch sampler that is a pure function of (seed, step).

Because batch `step` never depends on earlier draws, a resumed run sees exactly the batches an
uninterrupted run would, and a parallel run can give each rank its rows of the very batch single core sees.
"""
import json
from pathlib import Path

import numpy as np

from common.config import ConfigError

TRAIN, VAL = 0, 1  # random streams, so validation batches never coincide with training ones


def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise ConfigError(f"{path} not found; prepare the data first: python data/prepare.py "
                          f"(or point --data-dir at a prepared dataset)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not the JSON data/prepare.py writes; prepare the data again") from None


def load_tokens(data_dir, split):
    """The uint16 tokens of 'train' or 'val', memory-mapped."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise ConfigError(f"{path} not found; prepare the data first: python data/prepare.py")
    size = path.stat().st_size
    if size % np.dtype(np.uint16).itemsize:
        raise ConfigError(f"{path} holds {size:,} bytes, not a whole number of 2-byte tokens: it was cut short; "
                          f"prepare the data again: python data/prepare.py")
    return np.memmap(path, dtype=np.uint16, mode="r")


def batch_offsets(n_tokens, block_size, batch_size, seed, step, stream=TRAIN):
    """Start positions of the `batch_size` sequences of batch `step`."""
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def get_batch(tokens, offsets, block_size):
    """Inputs x and next-token targets y, both (len(offsets), block_size) int64."""
    pos = offsets[:, None] + np.arange(block_size + 1)              # (B,T+1)
    seq = np.asarray(tokens[pos], dtype=np.int64)
    return seq[:, :-1], seq[:, 1:]


def eval_batches(tokens, train_cfg, block_size):
    """The same `eval_iters` validation batches at every evaluation, so val curves are comparable."""
    return [get_batch(tokens, batch_offsets(len(tokens), block_size, train_cfg.batch_size, train_cfg.seed, k, VAL),
                      block_size)
            for k in range(train_cfg.eval_iters)]
