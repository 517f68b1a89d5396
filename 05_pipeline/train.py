"""Train the GPT with its layers split into pipeline stages, one per MPI rank, and the batch into micro-batches.

    mpirun -n 2 python 05_pipeline/train.py --schedule 1f1b            # --pp defaults to the number of ranks
    mpirun -n 2 python 05_pipeline/train.py --schedule afab --microbatches 6
    mpirun -n 4 python 05_pipeline/train.py --microbatches 12
    mpirun -n 2 python 05_pipeline/train.py --schedule interleaved --virtual-stages 2   # 4 chunks of 1 block
    mpirun -n 2 python 05_pipeline/train.py --schedule zb-h1           # weight gradients deferred into the bubble

Every rank draws the same batch and splits it into --microbatches pieces; the first stage reads the tokens,
the last the targets. What a stage holds and the order it runs things in: see pipeline.py. After the last
step, rank 0 writes <out_dir>/timeline.json: every rank's instructions with start and end times, the bubble,
the peak number of micro-batches alive and the point-to-point bytes.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import common.startup as startup
from common.chapters import import_chapter
from common.checkpoint import model_state
from common.comm import Comm, world
from common.config import NETWORK_FLAGS, ConfigError, ParallelConfig
from common.driver import SINGLE, for_training
from common.loop import prepare, train
from common.memory import estimate
from common.model import gpt_layout, init_params
from common.optim import decays, make_adamw
from common.precision import describe, grad_dtype, master_dtype, storage, widths

single = import_chapter("01_single_core.train")
pipe = import_chapter("05_pipeline.pipeline")
sched = import_chapter("05_pipeline.schedules")


FLAGS = ("pp", "microbatches", "schedule", "virtual_stages", *NETWORK_FLAGS)


def setup(argv, world_size):
    gpt_cfg, train_cfg, tokens, val_tokens, par = startup.setup(
        argv, Path(__file__).parent.name, __doc__, {"out_dir": "out/pipeline"}, axis="pp", world_size=world_size,
        flags=FLAGS, choices={"schedule": sched.SCHEDULES})
    pipe.check_layout(gpt_cfg, par, train_cfg)
    if train_cfg.batch_size % par.microbatches:
        raise ConfigError(f"--batch-size {train_cfg.batch_size} is not divisible by --microbatches "
                          f"{par.microbatches}; choose a multiple of {par.microbatches}")
    return gpt_cfg, train_cfg, tokens, val_tokens, par


def memory_estimate(gpt_cfg, train_cfg, par, stage):
    """{kind: bytes} stage `stage` will hold: its tensors, their gradient and AdamW, and the activations of
    the micro-batch chunks its schedule keeps alive at once (pipeline.activation_formula: afab all M, 1f1b at
    most P - stage, ...)."""
    n = pipe.stage_layout(gpt_cfg, stage, par.pp, par.virtual_stages).size
    rows, w = train_cfg.batch_size // par.microbatches, widths(train_cfg)
    return estimate(gpt_cfg, w, params=n, grads=n, optimizer=n, rows=rows, blocks=None,
                    activations=pipe.activation_formula(gpt_cfg, rows, w.activations, par, stage, train_cfg.recompute),
                    recompute=train_cfg.recompute, whole=gpt_layout(gpt_cfg).size)


@dataclass
class State(single.State):
    """Chapter 01's state holding this stage's tensors (`layout`: the stage's), the engine that runs a schedule
    on them, and the communicator of the two stages that hold wte."""
    par: ParallelConfig = field(kw_only=True)
    pp: Comm = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        stage = self.pp.rank
        parts, _ = for_training(pipe.zb.deferring(SINGLE), self.train_cfg, self.held)
        self.st = pipe.Stage(self.gpt_cfg, stage, self.pp, self.p, self.g, parts=parts,
                             virtual=self.par.virtual_stages)
        self.ends = pipe.end_stages(self.pp, stage, self.pp.size)

    def whole(self):
        """Every stage's tensors, gathered on stage 0 (None elsewhere)."""
        return pipe.whole_state(self.gpt_cfg, list(model_state(self.params, self.opt).values()), self.pp, root=0,
                                virtual=self.par.virtual_stages)

    def load(self, whole):
        for kind, flat in model_state(self.params, self.opt).items():
            for name, view in self.layout.views(flat).items():
                view[...] = whole[kind][name]
        self.opt.cast(self.params)                      # mixed precision: the 16-bit weights from the master


def build(gpt_cfg, train_cfg, par, pp, full=None):
    """This stage's tensors, cut from the whole init every rank draws from the seed (or from `full`)."""
    layout = pipe.stage_layout(gpt_cfg, pp.rank, pp.size, par.virtual_stages)
    full = init_params(gpt_cfg, train_cfg.seed, master_dtype(train_cfg)) if full is None else full
    whole = gpt_layout(gpt_cfg).views(full)
    master = np.empty(layout.size, full.dtype)
    for name, view in layout.views(master).items():
        view[...] = whole[name]
    opt = make_adamw(train_cfg, layout.mask(decays), master)
    params = master.astype(storage(train_cfg), copy=False)
    return State(gpt_cfg, train_cfg, layout, params, np.zeros(layout.size, grad_dtype(train_cfg)), opt, par=par,
                 pp=pp)


def train_step(state, batch, lr):
    """One optimizer step on the batch (x, y): the schedule over M micro-batches, wte's two halves summed,
    the global norm, AdamW on this stage; the loss broadcast from the last stage so every rank can log it."""
    s, (x, y), st, pp, M = state, batch, state.st, state.pp, state.par.microbatches
    s.grads.fill(0)
    pp.barrier()                                          # a common start, so the ranks' timelines line up
    loss = st.run(sched.schedule(s.par.schedule, M, st.stage, pp.size, s.par.virtual_stages), np.split(x, M),
                  np.split(y, M), scale=s.opt.loss_scale)
    pipe.sync_tied_embedding(st.g, s.ends, st.stage, pp.size)
    g = s.opt.unscaled(s.grads)
    s.opt.update(s.params, g, lr, s.train_cfg.grad_clip, pipe.grad_norm(g, s.layout, st.stage, pp))
    return float(pp.bcast(np.array([loss or 0.0]), root=pp.size - 1)[0])


def evaluate(state, batches):
    st, pp, M = state.st, state.pp, state.par.microbatches
    ops = sched.schedule("forward", M, st.stage, pp.size, state.par.virtual_stages)
    losses = [st.run(ops, np.split(x, M), np.split(y, M)) for x, y in batches]
    return float(pp.bcast(np.array([np.mean(losses) if st.last else 0.0]), root=pp.size - 1)[0])


def timeline(state):
    """Every rank's record of one step, on rank 0 (None elsewhere)."""
    st, pp, par, train_cfg = state.st, state.pp, state.par, state.train_cfg
    mine = {"stage": st.stage, "trace": st.trace, "peak": st.peak, "activations": state.held.peak["activations"],
            "activations_formula": memory_estimate(state.gpt_cfg, train_cfg, par, st.stage)["activations"],
            "p2p": {k: v["bytes"] for k, v in pp.ledger.as_dict().items() if k in ("isend", "recv")},
            "p2p_formula": pipe.p2p_formula(state.gpt_cfg, train_cfg.batch_size, st.stage, pp.size,
                                            state.params.itemsize, virtual=par.virtual_stages)}
    ranks = pp.gather_object(mine)
    if ranks is None:
        return None
    end = max(r["trace"][-1][4] for r in ranks)                # the step ends when its last stage does
    for r in ranks:
        r["bubble"] = sched.bubble(r["trace"], end)
    costs = (1.0, 1.0, 1.0)                      # zb-h1's bubble depends on its F, B and W: the medians here
    if par.schedule == "zb-h1":
        costs = [float(np.median([end - start for r in ranks for o, _, _, start, end in r["trace"] if o == op]))
                 for op in ("forward", "backward", "weights")]
    return {"schedule": par.schedule, "pp": pp.size, "microbatches": par.microbatches,
            "virtual_stages": par.virtual_stages, "ranks": ranks,
            "bubble_formula": sched.bubble_formula(par.schedule, par.microbatches, pp.size, par.virtual_stages,
                                                  costs)}


def after_step(state, step):
    """After the last step: every rank's timeline, written by rank 0 to <out_dir>/timeline.json."""
    if step != state.train_cfg.max_iters - 1:
        return
    record = timeline(state)
    if state.pp.rank == 0:
        (Path(state.train_cfg.out_dir) / "timeline.json").write_text(json.dumps(record))
        print("bubble per stage: " + ", ".join(f"{r['bubble']:.2f}" for r in record["ranks"]) +
              f" (formula {record['bubble_formula']:.2f}); micro-batches alive at the peak: " +
              ", ".join(str(r["peak"]) for r in record["ranks"]))


def main(argv=None):
    pp = world()
    pp, (gpt_cfg, train_cfg, tokens, val_tokens, par), budget = prepare(
        pp, setup, argv, lambda *configs: memory_estimate(*configs, stage=pp.rank),
        "raise --pp")
    state = build(gpt_cfg, train_cfg, par, pp)
    V = par.virtual_stages
    stages = ", ".join("+".join(str(len(c)) for c in sched.chunk_layers(gpt_cfg.n_layer, s, pp.size, V)) +
                       " block(s)" for s in range(pp.size))
    train(state, tokens, val_tokens, train_step, evaluate, budget, threads=pp.host.threads, comm=pp,
          before_step=lambda step: pp.ledger.reset(), after_step=lambda step, first: after_step(state, step),
          banner=f"{gpt_layout(gpt_cfg).size:,} parameters in {pp.size} stage(s) of {stages}, {describe(train_cfg)}, "
                 f"batch {train_cfg.batch_size} x {gpt_cfg.block_size} tokens in {par.microbatches} "
                 f"micro-batches, {par.schedule} schedule" + (f" over {V} chunks per stage" if V > 1 else ""))


if __name__ == "__main__":
    main()
