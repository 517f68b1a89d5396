"""Train the GPT on a grid of tensor x pipeline x data parallel ranks (3D parallelism), optionally with ZeRO.

    mpirun -n 8 python 06_3d/train.py --tp 2 --pp 2 --dp 2
    mpirun -n 8 python 06_3d/train.py --tp 2 --pp 2 --sequence-parallel --zero-stage 1   # --dp: the ranks left
    mpirun -n 4 python 06_3d/train.py --tp 2 --zero-stage 3 --sequence-parallel           # FSDP + TP (pp = 1)
    mpirun -n 4 python 06_3d/train.py --pp 4 --schedule afab --microbatches 8
    mpirun --hostfile hosts -n 16 python 06_3d/train.py --tp 2 --pp 2 --dp 4             # across machines

Each data-parallel replica takes its rows of the batch, in --microbatches pieces that flow through the
pipeline stages; inside a stage, the tensor-parallel ranks split every weight matrix. See grid.py.
The default batch is 32 rows (chapter 01: 12), so that it splits over 1, 2, 4 or 8 replicas x 4 micro-batches.
Checkpoints hold whole tensors: they resume under any other layout, or on one core. After the first step,
rank 0 writes <out_dir>/ledger.json: every rank's grid coordinates, host and BLAS threads, model-state bytes,
peak resident memory and bytes per axis (measured and formula).
"""
import json
from pathlib import Path

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import read_training_state, save_training_state
from common.comm import checked, world
from common.data import batch_offsets, eval_batches, get_batch
from common.loop import run_training
from common.memory import check_fits, estimate, peak_rss, reuse_freed_memory
from common.model import gpt_layout, init_params, modules

single = import_chapter("01_single_core.train")
dp_lib = import_chapter("03_data_parallel.data_parallel")
pipe = import_chapter("05_pipeline.pipeline")
grid_lib = import_chapter("06_3d.grid")
zero_lib = import_chapter("04_zero.zero")


def setup(argv, world_size):
    gpt_cfg, cfg, train, val, par = single.setup(argv, chapter=Path(__file__).parent.name, description=__doc__,
                                                 defaults={"out_dir": "out/3d", "batch_size": 32},
                                                 shown={"dp": "the ranks left by tp x pp"})
    grid_lib.check(gpt_cfg, cfg, par, world_size)
    return gpt_cfg, cfg, train, val, par


def memory_estimate(gpt_cfg, cfg, par, rank):
    """{kind: bytes} world rank `rank` will hold: its shards of its stage, their gradient and AdamW (ZeRO: what
    its stage keeps, chapter 04), the activations its schedule keeps alive (chapter 05) of its rows, split over
    tp (chapter 02)."""
    _, stage, _ = grid_lib.coords(rank, par.tp, par.pp)
    layout = grid_lib.local_layout(gpt_cfg, stage, par.pp, par.tp)
    n, shard, M, e = layout.size, -(-layout.size // par.dp), par.microbatches, np.dtype(cfg.dtype).itemsize
    part = max(sum(int(np.prod(layout.shapes[name])) for name in names) for names in modules(gpt_cfg).values()
               if all(name in layout.shapes for name in names))
    bucket = int(par.bucket_mb * 2 ** 20) // e
    return estimate(gpt_cfg, e, params=shard + part if par.zero_stage == 3 else n,
                    grads=shard + bucket if par.zero_stage > 1 else n, optimizer=shard if par.zero_stage else n,
                    rows=cfg.batch_size // (par.dp * M), blocks=len(pipe.split_layers(gpt_cfg.n_layer, par.pp)[stage]),
                    first=stage == 0, last=stage == par.pp - 1,
                    alive=M if par.schedule == "afab" else min(par.pp - stage, M), tp_size=par.tp,
                    sp=par.sequence_parallel)


def train_step(part, x, y, cfg, par, lr):
    """One optimizer step: this replica's rows through the pipeline (the tensor-parallel sums inside it), the
    tied-embedding sum, the data-parallel sum (or ZeRO's reduce-scatter), the global norm, AdamW."""
    grid, st, sync = part.grid, part.st, part.sync
    sync.zero_grad()
    rows = np.split(x, grid.dp.size)[grid.dp.rank], np.split(y, grid.dp.size)[grid.dp.rank]
    M = par.microbatches
    grid.pp.barrier()

    def ready(name):
        # the dp reduction starts inside the last backward, except for wte's bucket when it must first receive
        # the other end's half (sync_tied_embedding below); finish() reduces it
        if name != "wte" or grid.pp.size == 1:
            sync.ready(name)

    loss = st.run(pipe.schedule(par.schedule, M, st.stage, grid.pp.size), np.split(rows[0], M),
                  np.split(rows[1], M), scale=1.0 / grid.dp.size, grads_ready=ready,
                  finish_each=sync.finish if sync.every_microbatch else None)
    pipe.sync_tied_embedding(st.g, grid.ends, st.stage, grid.pp.size)
    if not sync.every_microbatch:
        sync.finish()
    sync.step(part.opt, lr, cfg.grad_clip, norm=part.grad_norm(sync.gshard))
    loss = grid.dp.allreduce(np.array([(loss or 0.0) / grid.dp.size]))
    return float(grid.pp.bcast(loss, root=grid.pp.size - 1)[0])


def evaluate(part, batches, par):
    """The mean val loss over `batches`: each data-parallel replica runs its rows of every batch through the
    pipeline, and the last stage's sums are added over dp."""
    st, grid = part.st, part.grid
    loss = dp_lib.mean_over_replicas(batches, grid.dp, lambda x, y: st.run(
        pipe.schedule("forward", par.microbatches, st.stage, grid.pp.size),
        np.split(x, par.microbatches), np.split(y, par.microbatches)))
    return float(grid.pp.bcast(np.array([loss]), root=grid.pp.size - 1)[0])


def ledger(part, batch_size):
    """Every rank's coordinates, host (as MPI groups ranks) and BLAS threads, model-state bytes, peak resident
    memory and the bytes its first step passed to each axis's communicator beside grid.ledger_formula: on rank 0
    (None elsewhere)."""
    grid, opt = part.grid, part.opt
    comms = {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp, "ends": grid.ends}
    host = grid.world.host
    mine = {"rank": grid.world.rank, "tp": grid.tp.rank, "pp": grid.pp.rank, "dp": grid.dp.rank,
            "host": host.index, "host_ranks": host.comm.size, "blas_threads": host.threads.blas,
            "parameters": zero_lib.owned_bytes(part.params), "gradients": zero_lib.owned_bytes(part.grads),
            "optimizer": zero_lib.owned_bytes(opt.m) + zero_lib.owned_bytes(opt.v),
            "peak_rss": peak_rss(),
            "comm": {axis: {k: v["bytes"] for k, v in c.ledger.as_dict().items()} for axis, c in comms.items()},
            "comm_formula": grid_lib.ledger_formula(part, batch_size)}
    return grid.world.gather_object(mine)


def rank_map(par):
    return "\n".join(f"  world rank {r}: tp {t}, pp {p}, dp {d}"
                     for r in range(par.tp * par.pp * par.dp) for t, p, d in [grid_lib.coords(r, par.tp, par.pp)])


def main(argv=None):
    comm = world()
    gpt_cfg, cfg, train, val, par = checked(comm, setup, argv, comm.size)
    budget = checked(comm, check_fits, memory_estimate(gpt_cfg, cfg, par, comm.rank), comm.host.comm,
                     "--n-layer or --n-embd, or raise --tp, --pp or --zero-stage")
    reuse_freed_memory()
    grid = grid_lib.Grid.build(comm, par.tp, par.pp, par.dp)
    part = grid_lib.Part(gpt_cfg, cfg, par, grid, init_params(gpt_cfg, cfg.seed, np.dtype(cfg.dtype)))
    ckpt = Path(cfg.out_dir) / "ckpt.npz"
    start = 0
    if cfg.resume:
        state, part.opt.t, start = checked(comm, read_training_state, ckpt, gpt_layout(gpt_cfg).shapes, cfg.max_iters)
        part.load_state(state)
        del state
    if comm.rank == 0:
        zero = f", ZeRO-{par.zero_stage}" if par.zero_stage else ""
        print(f"{gpt_layout(gpt_cfg).size:,} parameters on a grid of tp {par.tp} x pp {par.pp} x dp {par.dp}"
              f"{' (sequence parallel)' if par.sequence_parallel else ''}{zero}, "
              f"{cfg.dtype}, batch {cfg.batch_size} x {gpt_cfg.block_size} tokens, {par.microbatches} micro-batches "
              f"per replica, {par.schedule}" + (f", resuming at step {start}" if start else "") +
              f"\nruntime: {comm.host.threads}\n{budget.banner('on world rank 0')}\n" + rank_map(par))
    val_batches = eval_batches(val, cfg, gpt_cfg.block_size)

    def step_fn(step, lr):
        offsets = batch_offsets(len(train), gpt_cfg.block_size, cfg.batch_size, cfg.seed, step)
        x, y = get_batch(train, offsets, gpt_cfg.block_size)
        for c in (part.grid.tp, part.grid.pp, part.grid.dp, part.grid.ends):
            c.ledger.reset()
        loss = train_step(part, x, y, cfg, par, lr)
        if step == start:                                           # the first step's figures, once
            ranks = ledger(part, cfg.batch_size)
            if comm.rank == 0:
                (Path(cfg.out_dir) / "ledger.json").write_text(json.dumps({"layout": [par.tp, par.pp, par.dp],
                                                                           "ranks": ranks}, indent=1))
        if par.zero_stage < 3 and par.check_replicas and (step + 1) % par.check_replicas == 0:
            dp_lib.check_replicas(part.params, part.grid.dp, step)   # each (tp, pp) shard, over its replicas
        return loss

    def save(step):
        state = part.whole_state()                                  # a collective on every rank
        if comm.rank == 0:
            save_training_state(ckpt, state, part.opt.t, step, gpt_cfg, cfg)

    run_training(cfg, start, cfg.batch_size * gpt_cfg.block_size, step_fn,
                 evaluate=lambda: evaluate(part, val_batches, par), save=save,
                 metrics_path=Path(cfg.out_dir) / "metrics.jsonl" if comm.rank == 0 else None,
                 verbose=comm.rank == 0)
    if comm.rank == 0:
        print(budget.summary())


if __name__ == "__main__":
    main()
