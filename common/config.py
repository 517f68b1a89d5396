"""Configuration: dataclasses with defaults, optionally overridden by a JSON file and then by dashed flags.

Precedence: dataclass default < `--config file.json` < command-line flag. Every field `foo_bar` of every
dataclass a script uses becomes a flag `--foo-bar`; the JSON file is one flat object of the same names.
"""
import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A user mistake in configuration or input, reported as one sentence naming the flag and the fix."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes raise ConfigError, so MPI scripts report them once, like any other."""

    def error(self, message):
        raise ConfigError(message)


def exit_with(error):
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 0  # 0: take it from the dataset's meta.json

    def validate(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ConfigError(f"--vocab-size must be positive (or 0 to read it from the data), got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}; "
                              f"choose n_embd as a multiple of n_head")

    @property
    def head_size(self):
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    data_dir: str = "data/shakespeare_char"
    out_dir: str = "out/single_core"
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    dtype: str = "float32"
    seed: int = 1337
    resume: bool = False  # continue from out_dir/ckpt.npz

    def validate(self):
        for name in ("batch_size", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be a positive integer, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag(name)} must be zero or positive, got {getattr(self, name)}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"--min-lr {self.min_lr} must lie between 0 and --learning-rate {self.learning_rate}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("--weight-decay and --grad-clip must be zero or positive")
        if self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(f"--warmup-iters {self.warmup_iters} exceeds --lr-decay-iters {self.lr_decay_iters}")


@dataclass
class ParallelConfig:
    """How the model is split across MPI ranks; each chapter reads the fields it implements."""
    tp: int = 1  # tensor-parallel ranks (02_tensor_parallel)
    sequence_parallel: bool = False  # with tp: split LayerNorm and residual activations along the sequence
    dp: int = 1  # data-parallel ranks (03_data_parallel)
    grad_accum: int = 1  # micro-batches per rank and step, communicating after the last
    dp_mode: str = "overlapped"  # naive | bucketed | overlapped gradient all-reduce
    bucket_mb: float = 1.0  # bucket size of the bucketed and overlapped modes
    check_replicas: int = 1  # assert identical parameters on all data-parallel ranks every N steps (0: never)
    zero_stage: int = 0  # ZeRO (04_zero): 1 shards optimizer state, 2 also gradients, 3 also parameters
    pp: int = 1  # pipeline stages (05_pipeline)
    microbatches: int = 4  # micro-batches that flow through the pipeline each step
    schedule: str = "1f1b"  # afab (GPipe: all forwards, then all backwards) | 1f1b

    def use_every_rank(self, axis, world_size):
        """A chapter with one parallel axis: that axis defaults to every rank mpirun started, and must equal it."""
        if getattr(self, axis) == 1 and world_size > 1:
            setattr(self, axis, world_size)
        if getattr(self, axis) != world_size:
            raise ConfigError(f"--{axis} {getattr(self, axis)} but mpirun started {world_size} ranks; run mpirun "
                              f"-n {getattr(self, axis)} (or leave --{axis} out to use every rank)")

    def validate(self):
        for name in ("tp", "dp", "grad_accum", "pp", "microbatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.dp_mode not in ("naive", "bucketed", "overlapped"):
            raise ConfigError(f"--dp-mode must be naive, bucketed or overlapped, got {self.dp_mode!r}")
        if self.bucket_mb <= 0:
            raise ConfigError(f"--bucket-mb must be positive, got {self.bucket_mb}")
        if self.check_replicas < 0:
            raise ConfigError(f"--check-replicas must be zero (never) or positive, got {self.check_replicas}")
        if self.schedule not in ("afab", "1f1b"):
            raise ConfigError(f"--schedule must be afab or 1f1b, got {self.schedule!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")


def flag(name):
    return name.replace("_", "-")


def add_config_args(parser, *classes, defaults=None):
    """Add `--config` and one dashed flag per dataclass field; defaults stay None so set flags are known
    (`defaults` only changes the help: config_from_args applies them)."""
    parser.add_argument("--config", help="JSON file of field values (flags given here override it)")
    defaults = defaults or {}
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            shown = f"default: {defaults.get(f.name, f.default)}"
            if f.type in (bool, "bool"):
                group.add_argument(f"--{flag(f.name)}", dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=shown)
            else:
                kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                group.add_argument(f"--{flag(f.name)}", dest=f.name, type=kind, default=None,
                                   metavar=f.name.upper(), help=shown)


def config_from_args(args, *classes, defaults=None):
    """Build one instance per dataclass from its defaults, a script's own `defaults` ({field: value}), the JSON
    file and the flags, in that order of precedence; validate each."""
    values = dict(defaults or {})
    if args.config:
        path = Path(args.config)
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path} is not valid JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path} must hold one JSON object of field names and values")
        fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise ConfigError(f"--config {path} has unknown keys {unknown}; known keys are {sorted(fields)}")
        values.update({name: _typed(path, fields[name], value) for name, value in loaded.items()})
    values.update({k: v for k, v in vars(args).items() if v is not None})
    configs = []
    for cls in classes:
        cfg = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
        cfg.validate()
        configs.append(cfg)
    return tuple(configs)


def _typed(path, field, value):
    """A JSON value checked against the field's type (an int is accepted where a float is expected)."""
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(field.type, field.type)
    if isinstance(value, bool) and kind is not bool:
        ok = False
    elif kind is float and isinstance(value, int):
        value, ok = float(value), True
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"--config {path}: {field.name} (--{flag(field.name)}) must be "
                          f"{kind.__name__}, got {value!r}")
    return value
