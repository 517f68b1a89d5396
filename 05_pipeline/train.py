"""Train the GPT with its layers split into pipeline stages, one per MPI rank, and the batch into micro-batches.

    mpirun -n 2 python 05_pipeline/train.py --schedule 1f1b            # --pp defaults to the number of ranks
    mpirun -n 2 python 05_pipeline/train.py --schedule afab --microbatches 6
    mpirun -n 4 python 05_pipeline/train.py --microbatches 12

Every rank draws the same batch and splits it into --microbatches pieces; the first stage reads the tokens,
the last the targets. What a stage holds and the order it runs things in: see pipeline.py. After the last
step, rank 0 writes <out_dir>/timeline.json: every rank's instructions with start and end times, the bubble,
the peak number of micro-batches alive and the point-to-point bytes.
"""
import json
from pathlib import Path

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import read_training_state, save_training_state
from common.comm import checked, world
from common.config import ConfigError
from common.data import batch_offsets, eval_batches, get_batch
from common.loop import run_training
from common.memory import check_fits, estimate, reuse_freed_memory
from common.model import gpt_layout, init_params
from common.optim import AdamW, clip_grad_norm, decays

single = import_chapter("01_single_core.train")
pipe = import_chapter("05_pipeline.pipeline")


def setup(argv, world_size):
    gpt_cfg, cfg, train, val, par = single.setup(argv, chapter=Path(__file__).parent.name, description=__doc__,
                                                 defaults={"out_dir": "out/pipeline"}, shown={"pp": "every rank"})
    par.use_every_rank("pp", world_size)
    if gpt_cfg.n_layer < par.pp:
        raise ConfigError(f"--n-layer {gpt_cfg.n_layer} is fewer than --pp {par.pp} stages, and every stage needs "
                          f"a block; choose --pp of at most {gpt_cfg.n_layer}")
    if cfg.batch_size % par.microbatches:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --microbatches {par.microbatches}; "
                          f"choose a multiple of {par.microbatches}")
    return gpt_cfg, cfg, train, val, par


def memory_estimate(gpt_cfg, cfg, par, stage):
    """{kind: bytes} stage `stage` will hold: its tensors, their gradient and AdamW, and the activations of
    the micro-batches its schedule keeps alive at once (afab: all M; 1f1b: at most P - stage)."""
    n = pipe.stage_layout(gpt_cfg, stage, par.pp).size
    M = par.microbatches
    alive = M if par.schedule == "afab" else min(par.pp - stage, M)
    return estimate(gpt_cfg, np.dtype(cfg.dtype).itemsize, params=n, grads=n, optimizer=n, rows=cfg.batch_size // M,
                    blocks=len(pipe.split_layers(gpt_cfg.n_layer, par.pp)[stage]), first=stage == 0,
                    last=stage == par.pp - 1, alive=alive)


def build(gpt_cfg, cfg, stage, pp, full=None):
    """This stage's tensors, cut from the whole init every rank draws from the seed (or from `full`)."""
    layout = pipe.stage_layout(gpt_cfg, stage, pp)
    full = init_params(gpt_cfg, cfg.seed, np.dtype(cfg.dtype)) if full is None else full
    whole = gpt_layout(gpt_cfg).views(full)
    params = np.empty(layout.size, full.dtype)
    for name, view in layout.views(params).items():
        view[...] = whole[name]
    opt = AdamW(layout.mask(decays), cfg.beta1, cfg.beta2, cfg.weight_decay, dtype=full.dtype)
    return layout, params, np.zeros_like(params), opt


def train_step(st, layout, params, grads, opt, x, y, cfg, par, pp, ends, lr):
    """One optimizer step on the batch (x, y): the schedule over M micro-batches, wte's two halves summed,
    the global norm, AdamW on this stage; the loss broadcast from the last stage so every rank can log it."""
    grads.fill(0)
    pp.barrier()                                          # a common start, so the ranks' timelines line up
    loss = st.run(pipe.schedule(par.schedule, par.microbatches, st.stage, pp.size),
                  np.split(x, par.microbatches), np.split(y, par.microbatches))
    pipe.sync_tied_embedding(st.g, ends, st.stage, pp.size)
    clip_grad_norm(grads, cfg.grad_clip, norm=pipe.grad_norm(grads, layout, st.stage, pp))
    opt.step(params, grads, lr)
    return float(pp.bcast(np.array([loss or 0.0]), root=pp.size - 1)[0])


def evaluate(st, batches, par, pp):
    losses = [st.run(pipe.schedule("forward", par.microbatches, st.stage, pp.size),
                     np.split(x, par.microbatches), np.split(y, par.microbatches)) for x, y in batches]
    return float(pp.bcast(np.array([np.mean(losses) if st.last else 0.0]), root=pp.size - 1)[0])


def timeline(st, pp, cfg, gpt_cfg, par, itemsize):
    """Every rank's record of one step, on rank 0 (None elsewhere)."""
    mine = {"stage": st.stage, "trace": st.trace, "peak": st.peak,
            "p2p": {k: v["bytes"] for k, v in pp.ledger.as_dict().items() if k in ("isend", "recv")},
            "p2p_formula": pipe.p2p_formula(gpt_cfg, cfg.batch_size, st.stage, pp.size, itemsize)}
    ranks = pp.gather_object(mine)
    if ranks is None:
        return None
    end = max(r["trace"][-1][3] for r in ranks)                # the step ends when its last stage does
    for r in ranks:
        r["bubble"] = pipe.bubble(r["trace"], end)
    return {"schedule": par.schedule, "pp": pp.size, "microbatches": par.microbatches,
            "bubble_formula": pipe.bubble_formula(par.microbatches, pp.size), "ranks": ranks}


def main(argv=None):
    pp = world()
    gpt_cfg, cfg, train, val, par = checked(pp, setup, argv, pp.size)
    budget = checked(pp, check_fits, memory_estimate(gpt_cfg, cfg, par, pp.rank), pp.host.comm,
                     "--n-layer or --n-embd, or raise --pp")
    reuse_freed_memory()
    stage = pp.rank
    layout, params, grads, opt = build(gpt_cfg, cfg, stage, pp.size)
    st = pipe.Stage(gpt_cfg, stage, pp, layout.views(params), layout.views(grads))
    ends = pipe.end_stages(pp, stage, pp.size)
    ckpt = Path(cfg.out_dir) / "ckpt.npz"
    start = 0
    if cfg.resume:
        state, opt.t, start = checked(pp, read_training_state, ckpt, gpt_layout(gpt_cfg).shapes, cfg.max_iters)
        for part, flat in (("params", params), ("adam_m", opt.m), ("adam_v", opt.v)):
            for name, view in layout.views(flat).items():
                view[...] = state[part][name]
        del state
    if pp.rank == 0:
        stages = ", ".join(f"{len(r)} block(s)" for r in pipe.split_layers(gpt_cfg.n_layer, pp.size))
        print(f"{gpt_layout(gpt_cfg).size:,} parameters in {pp.size} stage(s) of {stages}, {cfg.dtype}, batch "
              f"{cfg.batch_size} x {gpt_cfg.block_size} tokens in {par.microbatches} micro-batches, {par.schedule} "
              f"schedule" + (f", resuming at step {start}" if start else "") +
              f"\nruntime: {pp.host.threads}\n{budget.banner('on stage 0')}")
    val_batches = eval_batches(val, cfg, gpt_cfg.block_size)

    def step_fn(step, lr):
        offsets = batch_offsets(len(train), gpt_cfg.block_size, cfg.batch_size, cfg.seed, step)
        x, y = get_batch(train, offsets, gpt_cfg.block_size)
        pp.ledger.reset()
        loss = train_step(st, layout, params, grads, opt, x, y, cfg, par, pp, ends, lr)
        if step == cfg.max_iters - 1:
            record = timeline(st, pp, cfg, gpt_cfg, par, params.itemsize)
            if pp.rank == 0:
                (Path(cfg.out_dir) / "timeline.json").write_text(json.dumps(record))
                print("bubble per stage: " + ", ".join(f"{r['bubble']:.2f}" for r in record["ranks"]) +
                      f" (formula {record['bubble_formula']:.2f}); micro-batches alive at the peak: " +
                      ", ".join(str(r["peak"]) for r in record["ranks"]))
        return loss

    def save(step):
        state = pipe.whole_state(gpt_cfg, (params, opt.m, opt.v), pp, root=0)   # a collective
        if pp.rank == 0:
            save_training_state(ckpt, state, opt.t, step, gpt_cfg, cfg)

    run_training(cfg, start, cfg.batch_size * gpt_cfg.block_size, step_fn,
                 evaluate=lambda: evaluate(st, val_batches, par, pp), save=save,
                 metrics_path=Path(cfg.out_dir) / "metrics.jsonl" if pp.rank == 0 else None, verbose=pp.rank == 0)
    if pp.rank == 0:
        print(budget.summary())


if __name__ == "__main__":
    main()
