"""Prove that pipeline parallelism, with every schedule and any number of micro-batches, computes what single
core computes.

    mpirun -n 2 python 05_pipeline/verify.py            # -n 1 to 4 (3: uneven stages); float64

For each schedule and number of micro-batches M (afab, 1f1b and zb-h1 with M = 1, 4, 8; interleaved with 2
chunks per stage, M = P and 2P, and with 3 chunks, M = P, where the 8 layers allow it; and four runs with
--recompute: afab selective, 1f1b full, zb-h1 selective, interleaved full), the real train_step of
05_pipeline/train.py and the single-core train_step of chapter 01 (recomputing nothing) take the same AdamW
steps on the same batches from the same weights. Rows: the losses (as every rank logs them); every parameter
tensor, and Adam's m and v of each, after the steps, gathered from the stages (one row for the parameters and
one for m and v, naming the worst tensor); the two copies of wte; the peak number of micro-batch chunks alive
on each stage against the schedule's bound (schedules.alive_bound: afab M, 1f1b min(P - stage, M), ...); the
peak bytes of activations each stage's caches held against the formula (pipeline.activation_formula); each
stage's point-to-point bytes of one step against the formula. Then 1f1b's and afab's first step in bf16 mixed
precision, and zb-h1's, against single-core bf16: the loss and every gradient within the tolerance derived from
bf16's unit roundoff (chapter 01's README), the point-to-point bytes and each stage's activation bytes (zb-h1's
deferred operands among them) by their formulas in 16 bits.
"""
from dataclasses import replace

import numpy as np

from common.checks import Report, named
from common.chapters import import_chapter
from common.comm import checked, world
from common.config import ConfigError, GPTConfig, Parser, ParallelConfig, TrainConfig

ref = import_chapter("01_single_core.verify")
reference = ref.reference
pipe_train = import_chapter("05_pipeline.train")
pipe = import_chapter("05_pipeline.pipeline")
sched = import_chapter("05_pipeline.schedules")
TOL = 1e-10


def cases(P, n_layer):
    """(schedule, virtual stages, M, recompute) of every run on P stages."""
    out = [(kind, 1, M, "none") for kind in ("afab", "1f1b", "zb-h1") for M in (1, 4, 8)]
    out += [("interleaved", 2, M, "none") for M in (P, 2 * P) if 2 * P <= n_layer]
    out += [("interleaved", 3, P, "none")] * (3 * P <= n_layer)
    out += [("afab", 1, 8, "selective"), ("1f1b", 1, 4, "full"), ("zb-h1", 1, 4, "selective")]
    return out + [("interleaved", 2, P, "full")] * (2 * P <= n_layer)


def setup(argv, world_size):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps both models take (default: 3)")
    args = parser.parse_args(argv)
    gpt_cfg = GPTConfig(n_layer=8, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    if world_size > gpt_cfg.n_layer:
        raise ConfigError(f"{world_size} stages > {gpt_cfg.n_layer} layers: every stage needs a block; run mpirun "
                          f"-n 1 to {gpt_cfg.n_layer}")
    return args, gpt_cfg


def every_rank(comm, values):
    """[values of rank 0, values of rank 1, ...] on every rank."""
    values = np.asarray(values, dtype=np.float64)
    return comm.allgather(values, np.empty(values.size * comm.size)).reshape(comm.size, -1)


def main(argv=None):
    pp = world()
    args, gpt_cfg = checked(pp, setup, argv, pp.size)
    train_cfg = TrainConfig(batch_size=24, dtype="float64", learning_rate=1e-2, seed=0)   # M = 1, 3, 4, 6, 8
    batches, start, ref_losses, ref_params, ref_opt, _ = reference(gpt_cfg, train_cfg, args.steps)
    layout = pipe_train.gpt_layout(gpt_cfg)

    stage, P = pp.rank, pp.size
    report, show = Report(TOL, width=52, detail=25), pp.rank == 0
    for kind, V, M, recompute in cases(P, gpt_cfg.n_layer):
        label = f"{kind}{f' V={V}' if V > 1 else ''} M={M}{f' {recompute}' if recompute != 'none' else ''}:"
        par = ParallelConfig(pp=P, microbatches=M, schedule=kind, virtual_stages=V)
        run_cfg = replace(train_cfg, recompute=recompute)
        state = pipe_train.build(gpt_cfg, run_cfg, par, pp, full=start)
        slayout, params, opt, st = state.layout, state.params, state.opt, state.st
        losses, peaks = [], []
        for step, batch in enumerate(batches):
            pp.ledger.reset()
            losses.append(pipe_train.train_step(state, batch, train_cfg.learning_rate))
            peaks.append(st.peak)
            if step == 0 and P > 1:
                got = pp.ledger.as_dict()
                want = pipe.p2p_formula(gpt_cfg, train_cfg.batch_size, stage, P, params.itemsize, virtual=V)
                report.compare(f"{label} p2p bytes, every stage",
                               every_rank(pp, [got[k]["bytes"] for k in ("isend", "recv")]),
                               every_rank(pp, [want[k] for k in ("isend", "recv")]), show)
        report.compare(f"{label} losses on every rank", every_rank(pp, losses), [ref_losses] * P, show)
        whole = pipe.whole_state(gpt_cfg, (params, opt.m, opt.v), pp, virtual=V)
        report.compare_tensors(label, whole["params"], layout.views(ref_params), show, group="all parameters")
        report.compare_tensors(label, named(m=whole["adam_m"], v=whole["adam_v"]),
                               named(m=layout.views(ref_opt.m), v=layout.views(ref_opt.v)), show,
                               group="Adam m and v")
        wte = (slayout.views(params)["wte"] if "wte" in slayout.shapes else whole["params"]["wte"]).ravel()
        report.compare(f"{label} both copies of wte", every_rank(pp, wte), np.tile(whole["params"]["wte"].ravel(),
                                                                                   (P, 1)), show)
        bound = [sched.alive_bound(kind, M, s, P, V) for s in range(P)]
        report.compare(f"{label} peak alive per stage", every_rank(pp, [max(peaks)]).ravel(), bound, show)
        want = [pipe_train.memory_estimate(gpt_cfg, run_cfg, par, s)["activations"] for s in range(P)]
        report.compare(f"{label} activation bytes per stage",
                       every_rank(pp, [state.held.peak["activations"]]).ravel(), want, show)
    one = reference(gpt_cfg, ref.mixed(train_cfg), 1)
    for kind in ("afab", "1f1b", "zb-h1"):
        mixed_step(report, gpt_cfg, ref.mixed(train_cfg), one, kind, pp, show)
    return report.finish(f"P={P}: ", show)


def mixed_step(report, gpt_cfg, train_cfg, one, kind, pp, show, M=4):
    """The first step of `kind` in 16-bit mixed precision against single core's (`one`): the loss and every
    gradient within the derived tolerance (the gradient is rounded once per micro-batch, and wte's once more
    when its two halves are summed; zb-h1's deferred weight gradients read operands stored in 16 bits, one more
    rounding); the p2p bytes and each stage's activation bytes by their formulas, in 16 bits."""
    label = f"{train_cfg.precision} {kind} M={M}:"
    par = ParallelConfig(pp=pp.size, microbatches=M, schedule=kind)
    state = pipe_train.build(gpt_cfg, train_cfg, par, pp, full=one.start)
    pp.ledger.reset()
    loss = pipe_train.train_step(state, one.batches[0], train_cfg.learning_rate)
    tol = ref.mixed_tolerance(train_cfg, gpt_cfg.n_layer, M + 1 + (kind == "zb-h1"))
    if pp.size > 1:
        got, want = pp.ledger.as_dict(), pipe.p2p_formula(gpt_cfg, train_cfg.batch_size, pp.rank, pp.size,
                                                          state.params.itemsize)
        report.compare(f"{label} p2p bytes, every stage", every_rank(pp, [got[k]["bytes"] for k in ("isend", "recv")]),
                       every_rank(pp, [want[k] for k in ("isend", "recv")]), show)
    report.compare(f"{label} loss", loss, one.losses[0], show, tol=tol)
    want = [pipe_train.memory_estimate(gpt_cfg, train_cfg, par, s)["activations"] for s in range(pp.size)]
    report.compare(f"{label} activation bytes per stage", every_rank(pp, [state.held.peak["activations"]]).ravel(),
                   want, show)
    grads = pipe.whole_state(gpt_cfg, (state.grads,), pp)["params"]          # every stage's, gathered
    report.compare_tensors(label, grads, pipe_train.gpt_layout(gpt_cfg).views(one.grads), show,
                           group="first gradient", tol=tol)


if __name__ == "__main__":
    raise SystemExit(main())
