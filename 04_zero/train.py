"""Train the GPT with ZeRO: data parallelism whose ranks shard the optimizer state (stage 1), the gradients too
(stage 2) and the parameters too (stage 3).

    mpirun -n 4 python 04_zero/train.py --zero-stage 3
    mpirun -n 2 python 04_zero/train.py --zero-stage 2 --grad-accum 2
    mpirun -n 2 python 04_zero/train.py --zero-stage 1 --bucket-mb 0.25

Batches, micro-batches and the loss scale are chapter 03's; where the model state lives is not: see zero.py.
Checkpoints hold whole tensors, so a run can resume on any number of ranks, at any stage, or on one core.
After its first step, rank 0 prints its model-state memory beside the paper's formula and writes that and the
step's communication (measured and formula) to <out_dir>/ledger.json.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from common.chapters import import_chapter
from common.comm import world
from common.config import NETWORK_FLAGS, ConfigError
from common.driver import modules
from common.loop import prepare, train
from common.memory import estimate
from common.model import gpt_layout, init_params
from common.optim import decays, make_adamw
from common.precision import describe, grad_dtype, master_dtype, storage, widths

dp_train = import_chapter("03_data_parallel.train")
zero_lib = import_chapter("04_zero.zero")


FLAGS = ("dp", "grad_accum", "bucket_mb", "check_replicas", "zero_stage", *NETWORK_FLAGS)


def setup(argv, world_size):
    gpt_cfg, train_cfg, tokens, val_tokens, par = dp_train.setup(
        argv, world_size, chapter=Path(__file__).parent.name, description=__doc__,
        defaults={"out_dir": "out/zero", "zero_stage": 1, "bucket_mb": 0.25}, flags=FLAGS)
    if par.zero_stage not in zero_lib.STAGES:
        raise ConfigError(f"--zero-stage {par.zero_stage} is plain data parallelism: run 03_data_parallel/train.py, "
                          f"or choose stage 1, 2 or 3")
    return gpt_cfg, train_cfg, tokens, val_tokens, par


def memory_estimate(gpt_cfg, train_cfg, par):
    """{kind: bytes} one rank will hold: what its stage keeps of the model state (stage 3: its shard and the
    part of the model being gathered; stages 2-3: a gradient bucket besides the shard), one micro-batch's
    activations."""
    layout = gpt_layout(gpt_cfg)
    psi, stage = layout.size, par.zero_stage
    shard = -(-psi // par.dp)
    part = zero_lib.largest_part(layout, modules(gpt_cfg))
    bucket = int(par.bucket_mb * 2 ** 20) // widths(train_cfg).grads
    return estimate(gpt_cfg, widths(train_cfg), params=shard + part if stage == 3 else psi,
                    grads=psi if stage == 1 else shard + bucket, optimizer=shard,
                    rows=train_cfg.batch_size // (par.dp * par.grad_accum), blocks=gpt_cfg.n_layer,
                    recompute=train_cfg.recompute, whole=psi)


@dataclass
class State(dp_train.State):
    """Chapter 03's state with ZeRO as its gradient sync: `params` and `grads` are what this rank's stage keeps
    (the whole model or its shard), `p` and `g` the views the model reads and writes, which stages 2-3 fill
    part by part."""

    def views(self):
        return self.sync.p, self.sync.g

    def whole(self):
        return self.sync.full_state(self.opt)                       # a collective: every rank takes part

    def load(self, whole):
        self.sync.load_state(whole, self.opt)


def build(gpt_cfg, train_cfg, par, dp, params=None):
    """Every rank draws the whole init from the seed (or takes `params`) and keeps what its stage keeps; AdamW
    holds m and v for this rank's shard only (in mixed precision also the float32 master of the shard)."""
    layout = gpt_layout(gpt_cfg)
    master = init_params(gpt_cfg, train_cfg.seed, master_dtype(train_cfg)) if params is None else params
    zero = zero_lib.Zero(par.zero_stage, layout, modules(gpt_cfg), master.astype(storage(train_cfg), copy=False),
                         dp, par.bucket_mb, grad_dtype(train_cfg))
    opt = make_adamw(train_cfg, layout.mask(decays)[zero.lo:zero.hi], master[zero.lo:zero.hi].copy())
    held = zero.params if zero.stage < 3 else zero.pshard
    return State(gpt_cfg, train_cfg, layout, held, zero.grads if zero.stage == 1 else zero.gshard, opt, par=par,
                 dp=dp, sync=zero)


def ledgers(state):
    """This rank's model-state bytes measured from its arrays and the bytes of one step's collectives, each
    beside its formula (zero.py)."""
    zero, opt, dp = state.sync, state.opt, state.dp
    w = widths(state.train_cfg)
    return {"stage": zero.stage, "ranks": dp.size, "parameters": zero.layout.size,
            "precision": state.train_cfg.precision, "memory": zero.memory(opt),
            "memory_formula": zero_lib.memory_formula(zero.stage, zero.layout.size, zero.hi - zero.lo, w),
            "comm": {kind: row["bytes"] for kind, row in dp.ledger.as_dict().items()},
            "comm_seconds": dict(dp.ledger.seconds),                   # modelled, with --network
            "comm_formula": zero_lib.comm_formula(zero.stage, zero.layout, state.par.grad_accum, w.weights,
                                                  w.grads)}


def memory_table(ledger):
    lines = [f"memory per rank (rank 0, stage {ledger['stage']}, N={ledger['ranks']}):      measured      formula"]
    for kind, nbytes in ledger["memory"].items():
        want = ledger["memory_formula"].get(kind)
        lines.append(f"  {kind:<28} {nbytes / 2 ** 20:9.3f} MiB" + (f" {want / 2 ** 20:9.3f} MiB" if want else ""))
    return "\n".join(lines)


def after_step(state, step, first):
    """The first step's figures, once (rank 0); then chapter 03's check of the replicas (stage 3 has none)."""
    if first and state.dp.rank == 0:
        ledger = ledgers(state)
        print(memory_table(ledger))
        (Path(state.train_cfg.out_dir) / "ledger.json").write_text(json.dumps(ledger, indent=1))
    if state.sync.stage < 3:
        dp_train.check_replicas(state, step)


def main(argv=None):
    dp = world()
    dp, (gpt_cfg, train_cfg, tokens, val_tokens, par), budget = prepare(
        dp, setup, argv, memory_estimate, "raise --zero-stage or the number of ranks")
    state = build(gpt_cfg, train_cfg, par, dp)
    zero = state.sync
    train(state, tokens, val_tokens, dp_train.train_step, dp_train.evaluate, budget, threads=dp.host.threads,
          comm=dp, before_step=lambda step: dp.ledger.reset(),
          after_step=lambda step, first: after_step(state, step, first),
          banner=f"{state.layout.size:,} parameters, ZeRO stage {zero.stage} on {dp.size} ranks "
                 f"({zero.hi - zero.lo:,} per shard), {describe(train_cfg)}, global batch {train_cfg.batch_size} x "
                 f"{gpt_cfg.block_size} tokens in {par.grad_accum} micro-batch(es) per rank, "
                 f"{len(zero.buckets)} gradient buckets")


if __name__ == "__main__":
    main()
