"""What every chapter's train.py does before any work: its configs from the flags it implements (and a JSON file),
the data, the output folder, all checked, so a mistake is one clear line on rank 0 and no compute was spent; and
a one-process script's refusal to run as several.
"""
import os
import sys
from pathlib import Path

from common.config import (ConfigError, GPTConfig, ParallelConfig, Parser, TrainConfig, add_config_args,
                           config_from_args, exit_with)
from common.data import load_meta, load_tokens


def setup(argv, chapter, description, defaults=None, shown=None, axis=None, world_size=1, flags=(), choices=None):
    """Configs (with a chapter's own `defaults`, and only the parallel flags `flags` that `chapter` implements,
    with the `choices` it defines) and data, all checked before any compute; a chapter with one parallel `axis`
    ("tp", "dp" or "pp") gives it every rank. Returns gpt_cfg, train_cfg, the train and val tokens, and the
    ParallelConfig."""
    parser = Parser(description=description.splitlines()[0])
    classes = GPTConfig, TrainConfig, ParallelConfig
    shown = {**({axis: "every rank"} if axis else {}), **(shown or {})}
    offer = dict(chapter=chapter, flags=flags, choices=choices)
    add_config_args(parser, *classes, defaults=defaults, shown=shown, **offer)
    gpt_cfg, train_cfg, par = config_from_args(parser.parse_args(argv), *classes, defaults=defaults, **offer)
    if axis:
        par.use_every_rank(axis, world_size)
    meta = load_meta(train_cfg.data_dir)
    if gpt_cfg.vocab_size not in (0, meta["vocab_size"]):
        raise ConfigError(f"--vocab-size {gpt_cfg.vocab_size} differs from the data's {meta['vocab_size']} "
                          f"symbols; leave it at 0 to take it from the data")
    gpt_cfg.vocab_size = meta["vocab_size"]
    tokens, val_tokens = load_tokens(train_cfg.data_dir, "train"), load_tokens(train_cfg.data_dir, "val")
    for split, split_tokens in (("train", tokens), ("val", val_tokens)):
        if len(split_tokens) <= gpt_cfg.block_size:
            raise ConfigError(f"the {split} split of {train_cfg.data_dir} has {len(split_tokens)} tokens, too few for "
                              f"--block-size {gpt_cfg.block_size}; choose a smaller block size")
    check_out_dir(train_cfg.out_dir)
    ckpt = Path(train_cfg.out_dir) / "ckpt.npz"
    if train_cfg.resume and not ckpt.exists():
        raise ConfigError(f"--resume given but {ckpt} does not exist; train without --resume first")
    return gpt_cfg, train_cfg, tokens, val_tokens, par


def check_out_dir(out_dir):
    """Raise unless `out_dir` is a folder this process can write in, or can be made as one."""
    path = Path(out_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ConfigError(f"--out-dir {out_dir}: {existing} is a file, not a folder; name a folder for the "
                          f"checkpoint and metrics")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir {out_dir}: {existing} is not writable; name a folder you can write in")


# where MPI launchers put a process's rank and the job's size: MPICH (and Intel MPI, Slurm's PMI), Open MPI
LAUNCHER_ENV = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))


def refuse_several_processes(script, instead):
    """For a one-process script: if an MPI launcher started it as several processes, rank 0 says so (`instead`:
    what to run) and every one exits with status 2, before any work and without starting MPI."""
    for rank, size in LAUNCHER_ENV:
        ranks = int(os.environ.get(size, 1))
        if ranks > 1:
            if int(os.environ.get(rank, 0)) == 0:
                exit_with(f"{script} runs on one process, but it was started as {ranks} (mpirun -n {ranks}); run "
                          f"it with python alone, or {instead}")
            sys.exit(2)
