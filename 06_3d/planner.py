"""Plan a layout before running it: for N ranks, a model and a batch, each layout's memory per rank, bytes per
axis and pipeline bubble, predicted from the formulas the grid's ledgers are checked against, and a choice.

    python 06_3d/planner.py -n 8                                  # the default model, batch 32, 4 micro-batches
    python 06_3d/planner.py -n 16 --n-layer 8 --n-embd 256 --batch-size 64 --ranks-per-host 8
    python 06_3d/planner.py -n 8 --block-size 4096 --batch-size 8 --microbatches 1     # long context: cp
    python 06_3d/planner.py -n 8 --block-size 4096 --batch-size 8 --microbatches 1 --cp-mode ulysses
    python 06_3d/planner.py -n 8 --n-embd 1024 --n-experts 64 --top-k 1 --memory-per-rank 8 --at-scale   # ep
    python 06_3d/planner.py -n 1024 --n-layer 96 --n-head 96 --n-embd 12288 --block-size 2048 --vocab-size 50257 \
        --batch-size 1536 --micro-batch-size 1 --memory-per-rank 80 --ranks-per-host 8 --at-scale   # GPT-3 175B

The choice follows the usual procedure: keep the layouts whose ranks fit in memory, then split the model as
little as possible (tp x pp), since data parallelism's one gradient sum per step hides behind the backward while
tp's all-reduces and the pipeline's bubble do not; shard the optimizer (ZeRO) before splitting the model; split
the sequence (cp) only when nothing else fits, as for long contexts; and within a split, prefer tensor
parallelism inside a host (--ranks-per-host a multiple of tp) and pipeline stages across hosts. The global batch
is micro-batch x micro-batches x dp. Everything comes from the sizes alone (no array of the model is made), so a
model of any size is planned in seconds.
"""
import argparse
import itertools

from common.chapters import import_chapter
from common.config import (CP_MODES, PRECISIONS, RECOMPUTE, ConfigError, GPTConfig, ParallelConfig, TrainConfig,
                           exit_with)
from common.memory import available_bytes, size
from common.precision import describe, widths

grid_lib = import_chapter("06_3d.grid")
sched = import_chapter("05_pipeline.schedules")
train3d = import_chapter("06_3d.train")
AXES = ("tp", "cp", "pp", "ends", "dp", "ep", "edp")


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(gpt_cfg, train_cfg, world_size, microbatches=None, rows=None, sp=False, cp_mode="ring"):
    """The ParallelConfig of every layout of `world_size` ranks that train.py accepts (grid.check), ZeRO-2/3 only
    where the grid allows them, with `microbatches` per replica or as many as make micro-batches of `rows` rows;
    `sp`: sequence parallelism where tp > 1; `cp_mode`: cp's attention (Ulysses only where cp divides n_head/tp)."""
    for tp, cp, pp in itertools.product(divisors(world_size), repeat=3):
        dp = world_size // (tp * cp * pp)
        if tp * cp * pp * dp != world_size:
            continue
        M = microbatches or train_cfg.batch_size // (dp * rows)
        if M < 1:
            continue
        for zero, ep in itertools.product((0,) if dp * cp == 1 else (0, 1, 2, 3),
                                          divisors(dp) if gpt_cfg.n_experts else (1,)):
            par = ParallelConfig(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, zero_stage=zero, microbatches=M,
                                 sequence_parallel=sp and tp > 1, cp_mode=cp_mode)
            try:
                grid_lib.check(gpt_cfg, train_cfg, par, world_size)
            except ConfigError:
                continue
            yield par


AT_SCALE = ("initialisation", "checkpoint")   # what train.py holds of the whole model, and a large system does not


def predict(gpt_cfg, train_cfg, par, at_scale=False):
    """{memory: the largest rank's estimated bytes, axes: {axis: the largest stage's bytes per step}, bubble},
    from the sizes alone: the ranks of one pipeline stage hold the same, so one rank of each stage is asked.
    `at_scale`: leave out the whole model train.py draws on every rank and gathers where it saves (AT_SCALE), as
    a system that initialises and checkpoints each shard where it lives does."""
    stage_ranks = [stage * par.tp * par.cp for stage in range(par.pp)]          # (tp 0, cp 0, stage, dp 0)
    memory = max(sum(b for kind, b in train3d.memory_estimate(gpt_cfg, train_cfg, par, rank).items()
                     if not (at_scale and kind in AT_SCALE)) for rank in stage_ranks)
    per_stage = [grid_lib.ledger_formula(gpt_cfg, par, s, train_cfg.batch_size, widths(train_cfg),
                                         train_cfg.recompute)
                 for s in range(par.pp)]
    axes = {axis: max(sum(f.get(axis, {}).values()) for f in per_stage) for axis in AXES}
    return {"memory": memory, "axes": axes, "bubble": sched.bubble_formula(par.schedule, par.microbatches, par.pp,
                                                                          par.virtual_stages)}


def tp_inside_host(tp, ranks_per_host):
    return ranks_per_host == 0 or ranks_per_host % tp == 0


def plan(gpt_cfg, train_cfg, world_size, microbatches=None, ranks_per_host=0, budget=None, rows=None, sp=False,
         at_scale=False, cp_mode="ring"):
    """The table (one dict per layout, in preference order) and the recommended row (None if none fits);
    `microbatches` per replica, or as many as make micro-batches of `rows` rows; `sp`: sequence parallelism
    where tp > 1; `at_scale`: see predict; `cp_mode`: cp's attention."""
    table = []
    for par in layouts(gpt_cfg, train_cfg, world_size, microbatches, rows, sp, cp_mode):
        row = {"tp": par.tp, "cp": par.cp, "pp": par.pp, "dp": par.dp, "ep": par.ep, "zero": par.zero_stage,
               "M": par.microbatches,
               **predict(gpt_cfg, train_cfg, par, at_scale)}
        row["fits"] = budget is None or row["memory"] <= budget
        row["tp_inside"] = tp_inside_host(par.tp, ranks_per_host)
        table.append(row)
    table.sort(key=lambda r: (not r["fits"], not r["tp_inside"], r["cp"], r["tp"] * r["pp"], r["zero"], r["ep"],
                              r["pp"]))
    return table, next((r for r in table if r["fits"]), None)


def mib(nbytes):
    return f"{nbytes / 2 ** 20:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, required=True, help="ranks (mpirun -n)")
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks (default: 4)")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads per block (default: 4)")
    parser.add_argument("--n-embd", type=int, default=128, help="width of the residual stream (default: 128)")
    parser.add_argument("--block-size", type=int, default=64, help="context length in tokens (default: 64)")
    parser.add_argument("--vocab-size", type=int, default=65, help="symbols in the vocabulary (default: 65)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch in sequences (default: 32)")
    parser.add_argument("--n-experts", type=int, default=0, help="experts per block, a mixture of experts, which "
                        "expert parallelism (ep) splits (default: 0, the dense MLP)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--microbatches", type=int, help="micro-batches per replica (default: 4)")
    split.add_argument("--micro-batch-size", type=int,
                       help="rows per micro-batch instead: each layout then runs batch / (dp x this) micro-batches")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="as train.py's: bf16 or fp16 plan 16-bit weights, activations and gradients with "
                             "float32 master weights (default: fp32)")
    parser.add_argument("--recompute", default="none", choices=RECOMPUTE,
                        help="activations kept for the backward, as train.py's --recompute (default: none)")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="plan the layouts with tp > 1 with sequence parallelism, as train.py's flag")
    parser.add_argument("--cp-mode", default="ring", choices=CP_MODES,
                        help="the layouts with cp > 1 by this attention, as train.py's --cp-mode (default: ring)")
    parser.add_argument("--at-scale", action="store_true",
                        help="leave out the whole model that train.py draws on every rank and gathers to save, as "
                             "a large system that initialises and checkpoints shard by shard does")
    parser.add_argument("--ranks-per-host", type=int, default=0,
                        help="ranks on each host, for placing tp inside one (default: 0, all on one host)")
    parser.add_argument("--memory-per-rank", type=float, default=0,
                        help="GiB each rank may hold, e.g. 80 for an 80 GB accelerator (default: 0, this host's "
                             "available memory shared by its ranks)")
    args = parser.parse_args(argv)
    M, rows_each = (args.microbatches or (None if args.micro_batch_size else 4)), args.micro_batch_size
    try:
        gpt_cfg = GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab_size,
                            args.n_experts, args.top_k)
        gpt_cfg.validate()
        train_cfg = TrainConfig(batch_size=args.batch_size, dtype=args.dtype, recompute=args.recompute,
                                precision=args.precision)
        train_cfg.validate()
        for name, value in (("-n", args.n), ("--microbatches", M or 1), ("--micro-batch-size", rows_each or 1)):
            if value < 1:
                raise ConfigError(f"{name} must be a positive number, got {value}")
        if args.memory_per_rank < 0:
            raise ConfigError(f"--memory-per-rank must be positive (GiB), got {args.memory_per_rank}")
        available = available_bytes()
        per_host = args.ranks_per_host or args.n
        budget = args.memory_per_rank * 2 ** 30 or (available / per_host if available else None)
        rows, best = plan(gpt_cfg, train_cfg, args.n, M, args.ranks_per_host, budget, rows_each,
                          args.sequence_parallel, args.at_scale, args.cp_mode)
        if not rows:
            each = f"--microbatches {M} per replica" if M else f"micro-batches of --micro-batch-size {rows_each}"
            raise ConfigError(f"no tp x pp x dp of {args.n} ranks splits --batch-size {args.batch_size} into "
                              f"{each}; choose a batch that is a multiple of {args.n * (M or rows_each)}")
    except ConfigError as e:
        exit_with(e)
    each = f"{M} micro-batches per replica" if M else f"micro-batches of {rows_each} rows"
    print(f"{args.n} ranks, batch {args.batch_size} x {args.block_size} in {each}, {describe(train_cfg)}"
          + (", sequence parallel" if args.sequence_parallel else "")
          + (", cp by Ulysses" if args.cp_mode == "ulysses" else "")
          + (", initialised and saved shard by shard" if args.at_scale else "")
          + (f"; {size(budget)} of memory per rank" if budget else ""))
    axes = AXES if args.n_experts else AXES[:-2]                 # ep and edp where there are experts
    ep = (lambda r: f" {r['ep']:>3}") if args.n_experts else (lambda r: "")
    print(f"{'tp':>3} {'cp':>3} {'pp':>3} {'dp':>3}{ep({'ep': 'ep'})} {'ZeRO':>4} {'M':>4} {'memory/rank':>12} "
          + " ".join(f"{a + ' MiB':>8}" for a in axes) + f" {'bubble':>7}  note")
    for r in rows:
        note = "does not fit" if not r["fits"] else "" if r["tp_inside"] else "tp crosses hosts"
        note += "  <- recommended" if r is best else ""
        print(f"{r['tp']:>3} {r['cp']:>3} {r['pp']:>3} {r['dp']:>3}{ep(r)} {r['zero']:>4} {r['M']:>4} "
              f"{size(r['memory']):>12} " + " ".join(f"{mib(r['axes'][a]):>8}" for a in axes)
              + f" {r['bubble']:>7.2f}  {note}")
    if best:
        zero = f" --zero-stage {best['zero']}" if best["zero"] else ""
        cp = f" --cp {best['cp']}" if best["cp"] > 1 else ""
        cp += " --cp-mode ulysses" if cp and args.cp_mode == "ulysses" else ""
        cp += f" --ep {best['ep']}" if best["ep"] > 1 else ""
        cp += f" --n-experts {args.n_experts} --top-k {args.top_k}" if args.n_experts else ""
        print(f"recommended: mpirun -n {args.n} python 06_3d/train.py --tp {best['tp']}{cp} --pp {best['pp']} "
              f"--dp {best['dp']}{zero} --batch-size {args.batch_size} --microbatches {best['M']}"
              + (" --sequence-parallel" if args.sequence_parallel and best["tp"] > 1 else "")
              + (f" --block-size {args.block_size}" if args.block_size != 64 else "")
              + (f" --recompute {args.recompute}" if args.recompute != "none" else "")
              + (f" --precision {args.precision}" if args.precision != "fp32" else ""))
    else:
        print("no layout fits in memory: shrink the model or the batch, or add ranks")


if __name__ == "__main__":
    main()
