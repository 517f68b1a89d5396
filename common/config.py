"""Configuration: dataclasses with defaults, optionally overridden by a JSON file and then by dashed flags.

Precedence: dataclass default < `--config file.json` < command-line flag. Every field `foo_bar` of every
dataclass a script uses becomes a flag `--foo-bar`; the JSON file is one flat object of the same names.
"""
import argparse
import dataclasses
import functools
import json
import sys
from dataclasses import dataclass, field
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


def option(default, help, choices=None, group=None):
    """A config field with its --help text (units) and choices (`group`: a --help group of its own)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


RECOMPUTE = ("none", "selective", "full")                                # common/model.py's gpt_forward
CP_MODES = ("ring", "ulysses")                                           # context parallelism's attention
PRECISIONS = ("fp32", "bf16", "fp16")                                    # common/precision.py


@dataclass
class GPTConfig:
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads per block")
    n_embd: int = option(128, "width of the residual stream, a multiple of --n-head")
    block_size: int = option(64, "context length in tokens")
    vocab_size: int = option(0, "symbols in the vocabulary; 0 takes it from the dataset's meta.json")
    n_experts: int = option(0, "experts in each block's mixture-of-experts feed-forward (0: the dense MLP)")
    top_k: int = option(2, "experts each token is sent to, those of highest router probability")
    capacity_factor: float = option(1.25, "an expert computes at most ceil(f T k / E) of a sequence's T tokens' "
                                    "assignments; the rest are dropped and the residual carries them")
    aux_loss_coef: float = option(0.01, "weight of the experts' load-balancing loss (Switch's), per block")

    def validate(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ConfigError(f"--vocab-size must be positive (or 0 to read it from the data), got {self.vocab_size}")
        if self.n_experts < 0:
            raise ConfigError(f"--n-experts must be zero (the dense MLP) or positive, got {self.n_experts}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"--top-k {self.top_k} must be between 1 and --n-experts {self.n_experts}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"--capacity-factor must be positive, got {self.capacity_factor}")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"--aux-loss-coef must be zero or positive, got {self.aux_loss_coef}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}; "
                              f"choose n_embd as a multiple of n_head")

    @property
    def head_size(self):
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    data_dir: str = option("data/shakespeare_char", "folder made by data/prepare.py (train.bin, val.bin, meta.json)")
    out_dir: str = option("out/single_core", "folder for ckpt.npz and metrics.jsonl")
    batch_size: int = option(12, "sequences per optimizer step, the whole (global) batch")
    max_iters: int = option(2000, "optimizer steps to train for")
    learning_rate: float = option(1e-3, "peak learning rate, reached after the warm-up")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warm-up")
    lr_decay_iters: int = option(2000, "step at which the cosine decay reaches --min-lr")
    beta1: float = option(0.9, "AdamW's decay of the gradient's running mean, in [0, 1)")
    beta2: float = option(0.99, "AdamW's decay of the squared gradient's running mean, in [0, 1)")
    weight_decay: float = option(0.1, "AdamW's decoupled weight decay of matrices and embeddings")
    grad_clip: float = option(1.0, "largest global gradient L2 norm, larger ones are scaled down (0: never)")
    eval_interval: int = option(250, "steps between val evaluations; each one also saves the checkpoint")
    eval_iters: int = option(20, "val batches per evaluation")
    log_interval: int = option(10, "steps between progress lines")
    dtype: str = option("float32", "float32 to train, float64 to check exactness", choices=("float32", "float64"))
    precision: str = option("fp32", "fp32: everything in --dtype; bf16 or fp16: weights, activations and gradients "
                            "in 16 bits, float32 arithmetic and master weights (common/precision.py)",
                            choices=PRECISIONS)
    loss_scale: float = option(0.0, "with --precision fp16: the loss scale, fixed (1: none), or 0: dynamic, "
                               "from 2^16")
    fp32_grads: bool = option(False, "with --precision bf16 or fp16: keep, accumulate and reduce the gradients "
                              "in float32")
    seed: int = option(1337, "seed of the initial weights and of the batch sampler")
    recompute: str = option("none", "activations kept for the backward: none recomputes nothing; selective "
                            "recomputes attention's (heads x T x T) probabilities in the backward; full keeps only "
                            "each block's input and reruns the block's forward in its backward", choices=RECOMPUTE)
    resume: bool = option(False, "continue from <out-dir>/ckpt.npz where it stopped")

    def validate(self):
        for name in ("batch_size", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be a positive integer, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag(name)} must be zero or positive, got {getattr(self, name)}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32" and self.dtype != "float32":
            raise ConfigError(f"--precision {self.precision} keeps float32 master weights: leave --dtype at float32")
        if self.loss_scale < 0 or (self.loss_scale and self.precision != "fp16"):
            raise ConfigError(f"--loss-scale {self.loss_scale:g} is for --precision fp16: 0 (dynamic) or a positive "
                              f"fixed scale")
        if self.fp32_grads and self.precision == "fp32":
            raise ConfigError("--fp32-grads is for --precision bf16 or fp16 (with fp32 every gradient is already)")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"--min-lr {self.min_lr} must lie between 0 and --learning-rate {self.learning_rate}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("--weight-decay and --grad-clip must be zero or positive")
        if self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(f"--warmup-iters {self.warmup_iters} exceeds --lr-decay-iters {self.lr_decay_iters}")


NET = "simulated network"
NETWORKS = ("nvlink", "infiniband", "ethernet-10g", "ethernet-1g")      # common/network.py's presets
NETWORK_FLAGS = ("network", "net_latency_us", "net_gbps", "ranks_per_host")  # every parallel chapter's


@dataclass
class ParallelConfig:
    """How the model is split across MPI ranks. A chapter's train.py names the fields it implements in FLAGS
    (and the choices of those whose values it defines, e.g. --schedule's); its scripts offer only those."""
    tp: int = option(1, "tensor-parallel ranks, each holding 1/tp of every weight matrix; must divide --n-head")
    sequence_parallel: bool = option(False, "with --tp: also split LayerNorm and residual activations along the "
                                     "sequence")
    dp: int = option(1, "data-parallel replicas, each taking its rows of the batch")
    grad_accum: int = option(1, "micro-batches per replica and step, run one after another; gradients are "
                             "reduced after the last (with a pipeline the same split is --microbatches)")
    dp_mode: str = option("overlapped", "the gradient all-reduce: per tensor, in buckets, or in buckets started "
                          "during the backward", ("naive", "bucketed", "overlapped"))
    bucket_mb: float = option(1.0, "gradient bucket size in MiB (bucketed and overlapped modes, ZeRO)")
    check_replicas: int = option(1, "steps between checks that every replica holds identical parameters "
                                 "(0: never)")
    zero_stage: int = option(0, "ZeRO shards the optimizer state (1), also the gradients (2), also the "
                             "parameters (3)", (0, 1, 2, 3))
    cp: int = option(1, "context-parallel ranks, each holding 1/cp of the sequence's positions, attention included "
                     "(--cp-mode)")
    cp_split: str = option("zigzag", "with --cp: each rank holds chunks r and 2 cp - 1 - r of 2 cp (equal causal "
                           "work), or chunk r of cp")
    cp_mode: str = option("ring", "with --cp: attention by ring attention (keys and values passed round the cp "
                          "ranks), or by DeepSpeed-Ulysses (all-to-alls trade the sequence split for a split of the "
                          "heads around attention; --cp must divide n_head/tp)", CP_MODES)
    ep: int = option(1, "expert-parallel ranks, taken from the data-parallel ones: each holds 1/ep of every "
                     "block's experts (--n-experts), tokens reaching them by all-to-all")
    pp: int = option(1, "pipeline stages, each holding consecutive blocks")
    microbatches: int = option(4, "micro-batches per replica and step, flowing through the pipeline stages "
                               "(chapter 03's --grad-accum, pipelined)")
    schedule: str = option("1f1b", "all forwards then all backwards (GPipe); one forward one backward; 1f1b "
                           "over --virtual-stages chunks per rank (Megatron); 1f1b with the weight gradients "
                           "deferred into the bubble (zero bubble H1)")
    virtual_stages: int = option(1, "with --schedule interleaved: chunks of layers per rank (rank r holds chunks "
                                 "r, r + pp, ...)")
    network: str = option("off", "model every message's time on this link (latency + bytes / bandwidth), so one "
                          "machine shows what communication costs", ("off", *NETWORKS), NET)
    net_latency_us: float = option(0.0, "the modelled link's latency in microseconds (0: the preset's)",
                                   group=NET)
    net_gbps: float = option(0.0, "the modelled link's bandwidth in Gbit/s (0: the preset's)", group=NET)
    ranks_per_host: int = option(0, "consecutive ranks per simulated host, talking over NVLink-like links "
                                 "inside it (0: every rank its own host)", group=NET)

    def use_every_rank(self, axis, world_size):
        """A chapter with one parallel axis: that axis defaults to every rank mpirun started, and must equal it."""
        if getattr(self, axis) == 1 and world_size > 1:
            setattr(self, axis, world_size)
        if getattr(self, axis) != world_size:
            raise ConfigError(f"--{axis} {getattr(self, axis)} but mpirun started {world_size} ranks; run mpirun "
                              f"-n {getattr(self, axis)} (or leave --{axis} out to use every rank)")

    def validate(self):
        for name in ("tp", "cp", "dp", "ep", "grad_accum", "pp", "microbatches", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.dp_mode not in ("naive", "bucketed", "overlapped"):
            raise ConfigError(f"--dp-mode must be naive, bucketed or overlapped, got {self.dp_mode!r}")
        if self.bucket_mb <= 0:
            raise ConfigError(f"--bucket-mb must be positive, got {self.bucket_mb}")
        if self.check_replicas < 0:
            raise ConfigError(f"--check-replicas must be zero (never) or positive, got {self.check_replicas}")
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ConfigError("--schedule interleaved runs several chunks of layers per rank: give --virtual-stages "
                              "2 or more")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ConfigError(f"--virtual-stages {self.virtual_stages} needs --schedule interleaved (the "
                              f"{self.schedule} schedule runs one chunk per rank)")
        if self.cp_mode not in CP_MODES:
            raise ConfigError(f"--cp-mode must be one of {', '.join(CP_MODES)}, got {self.cp_mode!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.network not in ("off", *NETWORKS):
            raise ConfigError(f"--network must be off or one of {', '.join(NETWORKS)}, got {self.network!r}")
        for name in ("net_latency_us", "net_gbps", "ranks_per_host"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag(name)} must be zero or positive, got {getattr(self, name)}")
            if getattr(self, name) and self.network == "off":
                raise ConfigError(f"--{flag(name)} sets the simulated network: give --network too, e.g. "
                                  f"--network ethernet-10g")


def flag(name):
    return name.replace("_", "-")


GROUPS = {"GPTConfig": "model", "TrainConfig": "training", "ParallelConfig": "parallelism of this chapter"}


EXPERTS = ("n_experts", "top_k", "capacity_factor", "aux_loss_coef")      # common/moe.py's, where a chapter has it


def offered(cls, flags):
    """The fields of `cls` a script takes: every model and training field but the experts', and the parallel ones
    and the experts' in `flags`."""
    return [f for f in dataclasses.fields(cls) if f.name in flags or (cls is not ParallelConfig and
                                                                        f.name not in EXPERTS)]


def elsewhere(f, chapter):
    """The one-line refusal of a parallel flag that `chapter` does not implement, naming the chapters that do."""
    from common.chapters import offering          # here: it imports the chapters, only when one is needed
    owners = offering(f.name)
    *some, last = owners or ["no chapter"]
    where = f"{', '.join(some)} and {last}" if some else last
    return ConfigError(f"--{flag(f.name)} is not a setting of {chapter or 'this script'}: it belongs to {where}"
                       + (f"; run {owners[0]}/train.py for it" if owners else ""))


def add_config_args(parser, *classes, defaults=None, chapter=None, flags=(), choices=None, shown=None):
    """Add `--config` and one dashed flag per field a script of `chapter` implements (the parallel ones in
    `flags`; `choices` of those whose values the chapter defines), grouped and explained; a parallel flag of
    another chapter is refused by name. Defaults stay None so set flags are known (`defaults`, and `shown` for
    what only the help says, e.g. "every rank", change the help alone)."""
    parser.add_argument("--config", help="JSON file of field values (flags given here override it)")
    shown = {**(defaults or {}), **(shown or {})}
    for cls in classes:
        fields = offered(cls, flags)
        groups = {None: parser.add_argument_group(GROUPS.get(cls.__name__, cls.__name__))}
        for f in fields:
            name = f.metadata.get("group")
            if name not in groups:
                groups[name] = parser.add_argument_group(name)
            group = groups[name]
            text = f"{f.metadata.get('help', '')} (default: {shown.get(f.name, f.default)})"
            if f.type in (bool, "bool"):
                group.add_argument(f"--{flag(f.name)}", dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=text)
            else:
                kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
                shape = "{" + ",".join(map(str, allowed)) + "}" if allowed else {int: "N", float: "X"}.get(kind, "S")
                group.add_argument(f"--{flag(f.name)}", dest=f.name, type=kind, default=None, metavar=shape,
                                   choices=allowed if f.name in (choices or {}) else None, help=text)
        for f in dataclasses.fields(cls):
            if f not in fields:
                names = [f"--{flag(f.name)}"] + ([f"--no-{flag(f.name)}"] if f.type in (bool, "bool") else [])
                parser.add_argument(*names, action=_Refuse, nargs="?", help=argparse.SUPPRESS,
                                    refusal=functools.partial(elsewhere, f, chapter))


class _Refuse(argparse.Action):
    def __init__(self, *args, refusal, **kwargs):
        super().__init__(*args, **kwargs)
        self.refusal = refusal

    def __call__(self, parser, namespace, values, option_string=None):
        raise self.refusal()


def config_from_args(args, *classes, defaults=None, chapter=None, flags=(), choices=None):
    """Build one instance per dataclass from its defaults, a script's own `defaults` ({field: value}), the JSON
    file and the flags, in that order of precedence; validate each. A JSON key the chapter does not implement
    (`flags`, as add_config_args) is refused like its flag, and a value outside its `choices` by name."""
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
        every = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
        fields = {f.name: f for cls in classes for f in offered(cls, flags)}
        for name in loaded:
            if name in every and name not in fields:
                raise ConfigError(f"--config {path}: {elsewhere(every[name], chapter)}")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise ConfigError(f"--config {path} has unknown keys {unknown}; known keys are {sorted(fields)}")
        values.update({name: _typed(path, fields[name], value) for name, value in loaded.items()})
        for name, allowed in (choices or {}).items():
            if name in loaded and loaded[name] not in allowed:
                raise ConfigError(f"--config {path}: {name} (--{flag(name)}) must be one of "
                                  f"{', '.join(map(str, allowed))}, got {loaded[name]!r}")
    values.update({k: v for k, v in vars(args).items() if v is not None})
    configs = []
    for cls in classes:
        config = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
        config.validate()
        configs.append(config)
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
