"""Train the GPT on a grid of tensor x pipeline x data parallel ranks (3D parallelism), optionally with ZeRO.

    mpirun -n 8 python 06_3d/train.py --tp 2 --pp 2 --dp 2
    mpirun -n 8 python 06_3d/train.py --tp 2 --pp 2 --sequence-parallel --zero-stage 1   # --dp: the ranks left
    mpirun -n 4 python 06_3d/train.py --tp 2 --zero-stage 3 --sequence-parallel           # FSDP + TP (pp = 1)
    mpirun -n 4 python 06_3d/train.py --pp 4 --schedule afab --microbatches 8
    mpirun -n 4 python 06_3d/train.py --cp 2 --tp 2 --block-size 256                    # ring attention over cp
    mpirun -n 4 python 06_3d/train.py --cp 2 --tp 2 --cp-mode ulysses                    # all-to-alls over cp
    mpirun -n 4 python 06_3d/train.py --n-experts 8 --top-k 1 --ep 4                      # 2 experts per rank
    mpirun --hostfile hosts -n 16 python 06_3d/train.py --tp 2 --pp 2 --dp 4             # across machines

Each data-parallel replica takes its rows of the batch, in --microbatches pieces that flow through the
pipeline stages; each context-parallel rank takes its positions of those rows; inside a stage, the
tensor-parallel ranks split every weight matrix. See grid.py and context_parallel.py.
The default batch is 32 rows (chapter 01: 12), so that it splits over 1, 2, 4 or 8 replicas x 4 micro-batches.
Checkpoints hold whole tensors: they resume under any other layout, or on one core. After the first step,
rank 0 writes <out_dir>/ledger.json: every rank's grid coordinates, host and BLAS threads, model-state bytes,
peak resident memory and bytes per axis (measured and formula).
"""
import json
from pathlib import Path

import numpy as np

import common.startup as startup
from common.chapters import import_chapter
from common.comm import world
from common.config import EXPERTS, NETWORK_FLAGS
from common.loop import prepare, train
from common.memory import estimate, peak_rss
from common.driver import modules
from common.model import gpt_layout, init_params
from common.moe import parameters
from common.precision import describe, master_dtype, widths

dp_lib = import_chapter("03_data_parallel.data_parallel")
pipe = import_chapter("05_pipeline.pipeline")
sched = import_chapter("05_pipeline.schedules")
grid_lib = import_chapter("06_3d.grid")
zero_lib = import_chapter("04_zero.zero")


FLAGS = ("tp", "sequence_parallel", "dp", "dp_mode", "bucket_mb", "check_replicas", "zero_stage", "cp", "cp_split",
         "cp_mode", "ep", "pp", "microbatches", "schedule", "virtual_stages", *NETWORK_FLAGS, *EXPERTS)


def setup(argv, world_size):
    gpt_cfg, train_cfg, tokens, val_tokens, par = startup.setup(
        argv, chapter=Path(__file__).parent.name, description=__doc__,
        defaults={"out_dir": "out/3d", "batch_size": 32}, shown={"dp": "the ranks left by tp x pp"}, flags=FLAGS,
        choices={"schedule": sched.SCHEDULES, "cp_split": grid_lib.cp_lib.SPLITS})
    grid_lib.check(gpt_cfg, train_cfg, par, world_size)
    return gpt_cfg, train_cfg, tokens, val_tokens, par


def memory_estimate(gpt_cfg, train_cfg, par, rank):
    """{kind: bytes} world rank `rank` will hold: its shards of its stage, their gradient and AdamW (ZeRO: what
    its stage keeps, chapter 04), the activations its schedule keeps alive (chapter 05) of its rows, split over
    tp (chapter 02)."""
    stage = grid_lib.coords(rank, par.tp, par.cp, par.pp).pp
    layout = grid_lib.local_layout(gpt_cfg, stage, par.pp, par.tp, par.virtual_stages, par.ep)
    n, M, w = layout.size, par.microbatches, widths(train_cfg)
    experts = sum(b - a for name, (a, b) in layout.offsets.items() if grid_lib.is_expert(name)) if par.ep > 1 else 0
    # ZeRO shards each gradient over the ranks that sum it: the dense one over dp x cp, the experts' over edp
    shard = -(-(n - experts) // (par.dp * par.cp)) + -(-experts // (par.dp // par.ep))
    module = zero_lib.largest_part(layout, modules(gpt_cfg)) if par.zero_stage == 3 else 0
    bucket = int(par.bucket_mb * 2 ** 20) // w.grads
    rows = train_cfg.batch_size // (par.dp * M)
    return estimate(gpt_cfg, w, params=shard + module if par.zero_stage == 3 else n,
                    grads=shard + bucket if par.zero_stage > 1 else n, optimizer=shard if par.zero_stage else n,
                    rows=rows, blocks=None, tp_size=par.tp, sp=par.sequence_parallel, cp_size=par.cp,
                    recompute=train_cfg.recompute, cp_mode=par.cp_mode,
                    activations=pipe.activation_formula(gpt_cfg, rows, w.activations, par, stage,
                                                        train_cfg.recompute, par.tp, par.sequence_parallel, par.cp,
                                                        par.cp_mode),
                    whole=grid_lib.local_layout(gpt_cfg, 0, 1, 1).size)


def my_positions(state, x, y):
    """x and y (rows of tokens), with cp > 1 cut to this rank's positions."""
    return (x, y) if state.pos is None else (x[:, state.pos], y[:, state.pos])


def train_step(state, batch, lr):
    """One optimizer step: this replica's rows (this cp rank's positions of them) through the pipeline (the
    tensor-parallel sums and the ring inside it), the tied-embedding sum, the sum over dp x cp (or ZeRO's
    reduce-scatter), the global norm, AdamW."""
    grid, st, sync, par = state.grid, state.st, state.sync, state.par
    sync.zero_grad()
    x, y = my_positions(state, *(np.split(a, grid.dp.size)[grid.dp.rank] for a in batch))   # my rows
    M = par.microbatches
    grid.pp.barrier()

    def ready(name):
        # the dp reduction starts inside the last backward, except for wte's bucket when it must first receive
        # the other end's half (sync_tied_embedding below); finish() reduces it
        if name != "wte" or grid.pp.size == 1:
            sync.ready(name)

    ops = sched.schedule(par.schedule, M, st.stage, grid.pp.size, par.virtual_stages)
    loss = st.run(ops, np.split(x, M), np.split(y, M),
                  scale=state.opt.loss_scale / grid.dcp.size, grads_ready=ready,    # a mean over dp x cp
                  finish_each=sync.finish if sync.every_microbatch else None)
    pipe.sync_tied_embedding(st.g, grid.ends, st.stage, grid.pp.size)
    if not sync.every_microbatch:
        sync.finish()
    sync.step(state.opt, lr, state.train_cfg.grad_clip, norm_of=state.grad_norm)
    loss = grid.dcp.allreduce(np.array([(loss or 0.0) / grid.dcp.size]))
    return float(grid.pp.bcast(loss, root=grid.pp.size - 1)[0])


def evaluate(state, batches):
    """The mean val loss over `batches`: each data-parallel replica runs its rows of every batch (each cp rank its
    positions of them) through the pipeline, and the last stage's sums are added over dp (and cp)."""
    st, grid, M = state.st, state.grid, state.par.microbatches
    ops = sched.schedule("forward", M, st.stage, grid.pp.size, state.par.virtual_stages)

    def loss_of(x, y):                                        # of this replica's rows
        x, y = my_positions(state, x, y)
        return st.run(ops, np.split(x, M), np.split(y, M))

    loss = dp_lib.mean_over_replicas(batches, grid.dp, loss_of)
    loss = grid.cp.allreduce(np.array([loss / grid.cp.size]))
    return float(grid.pp.bcast(loss, root=grid.pp.size - 1)[0])


def ledger(state, batch_size):
    """Every rank's coordinates, host (as MPI groups ranks) and BLAS threads, model-state bytes, the peak bytes
    of activations its caches held beside their formula (common.memory), peak resident memory and the bytes its
    first step passed to each axis's communicator beside grid.ledger_formula: on rank 0 (None elsewhere)."""
    grid, opt = state.grid, state.opt
    comms = state.ledgers()
    host = grid.world.host
    mine = {"rank": grid.world.rank, "tp": grid.tp.rank, "cp": grid.cp.rank, "pp": grid.pp.rank, "dp": grid.dp.rank,
            "attention_work": state.ring.work if state.ring else None,
            "host": host.index, "host_ranks": host.comm.size, "blas_threads": host.threads.blas,
            "parameters": zero_lib.owned_bytes(state.params), "gradients": zero_lib.owned_bytes(state.grads),
            "optimizer": sum(map(zero_lib.owned_bytes, opt.kept()[0])),     # mixed precision: the master too
            "activations": state.held.peak["activations"],
            "activations_formula": memory_estimate(state.gpt_cfg, state.train_cfg, state.par,
                                                   grid.world.rank)["activations"],
            "peak_rss": peak_rss(),
            "comm": {axis: {k: v["bytes"] for k, v in c.ledger.as_dict().items()} for axis, c in comms.items()},
            "comm_seconds": {axis: dict(c.ledger.seconds) for axis, c in comms.items()},   # with --network
            "comm_formula": grid_lib.ledger_formula(state.gpt_cfg, state.par, state.stage, batch_size,
                                                    widths(state.train_cfg), state.train_cfg.recompute,
                                                    state.moved())}
    return grid.world.gather_object(mine)


def rank_map(par):
    """Each world rank's coordinates, one line each (with ep > 1, its place in its ep group: dp mod ep)."""
    def line(r):
        at = grid_lib.coords(r, par.tp, par.cp, par.pp)
        return ", ".join(f"{axis} {i}" for axis, i in at._asdict().items()) + (f" (ep {at.dp % par.ep})"
                                                                              if par.ep > 1 else "")
    return "\n".join(f"  world rank {r}: {line(r)}" for r in range(par.tp * par.cp * par.pp * par.dp))


def after_step(state, step, first):
    """The first step's ledgers, once (written by rank 0); then chapter 03's check of each shard's replicas
    (ZeRO-3 has none)."""
    if first:
        ranks = ledger(state, state.train_cfg.batch_size)
        if state.grid.world.rank == 0:
            par = state.par
            (Path(state.train_cfg.out_dir) / "ledger.json").write_text(
                json.dumps({"layout": {"tp": par.tp, "cp": par.cp, "pp": par.pp, "dp": par.dp}, "ranks": ranks},
                           indent=1))
    every = state.par.check_replicas
    if state.par.zero_stage < 3 and every and (step + 1) % every == 0:
        for part, ranks in state.replicas():
            dp_lib.check_replicas(part, ranks, step)


def main(argv=None):
    comm = world()
    comm, (gpt_cfg, train_cfg, tokens, val_tokens, par), budget = prepare(
        comm, setup, argv, lambda *configs: memory_estimate(*configs, rank=comm.rank),
        "raise --tp, --pp or --zero-stage")
    grid = grid_lib.Grid.build(comm, par.tp, par.cp, par.pp, par.dp, par.ep)
    state = grid_lib.State(gpt_cfg, train_cfg, par, grid, init_params(gpt_cfg, train_cfg.seed,
                                                                    master_dtype(train_cfg)))
    zero = f", ZeRO-{par.zero_stage}" if par.zero_stage else ""

    def before_step(step):
        for c in state.ledgers().values():
            c.ledger.reset()
        if state.ring:
            state.ring.work = 0                   # the ledger's attention work: one step's
        if state.experts:
            state.experts.kept.clear()            # the ep ledger's formula: one step's routing

    train(state, tokens, val_tokens, train_step, evaluate, budget, threads=comm.host.threads, comm=comm,
          before_step=before_step, after_step=lambda step, first: after_step(state, step, first),
          banner=f"{parameters(gpt_cfg, gpt_layout(gpt_cfg).size)} on a grid of tp {par.tp} x cp {par.cp}"
                 f"{f' ({par.cp_mode}, {par.cp_split})' if par.cp > 1 else ''} x pp {par.pp} x dp {par.dp}"
                 f"{' (sequence parallel)' if par.sequence_parallel else ''}{zero}"
                 f"{f', experts over ep {par.ep}' if par.ep > 1 else ''}, {describe(train_cfg)}, batch "
                 f"{train_cfg.batch_size} x {gpt_cfg.block_size} tokens, {par.microbatches} micro-batches per "
                 f"replica, {par.schedule}\n" + rank_map(par))


if __name__ == "__main__":
    main()
