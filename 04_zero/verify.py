"""Prove that ZeRO stages 1, 2 and 3, with gradient accumulation, compute what single core computes.

    mpirun -n 2 python 04_zero/verify.py            # any -n (3: uneven shards): the batch grows with it; float64

For each stage and --grad-accum 1 and 2, the real training step of 04_zero/train.py (chapter 03's
train_step with ZeRO as its gradient sync) and the single-core train_step of chapter 01 take the same AdamW
steps on the same global batches from the same weights. Rows:
the losses; every parameter tensor, and Adam's m and v of each, after the steps (the shards gathered; one row
for the parameters and one for m and v, naming the worst tensor); the collectives of one step against
zero.comm_formula; this rank's model-state bytes, measured from its arrays, against the paper's formula; the
peak of gathered weights against the largest part of the model (a weight that some reference keeps alive after
its release would raise it); and no transient buffer alive after a step. Then each stage's first step in bf16
mixed precision against single-core bf16: loss and every gradient within the tolerance derived from bf16's unit
roundoff, and the model state to the byte against the paper's 2 + 2 + 12 bytes per parameter.
"""
import numpy as np

from common.checks import Report, named
from common.chapters import import_chapter
from common.comm import checked, world
from common.config import Parser, ParallelConfig
from common.precision import widths

ref = import_chapter("01_single_core.verify")
reference = ref.reference
zero_train = import_chapter("04_zero.train")
zero_lib = import_chapter("04_zero.zero")
dp_verify = import_chapter("03_data_parallel.verify")
TOL = 1e-10
ACCUMS = (1, 2)


def setup(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps both models take (default: 3)")
    return parser.parse_args(argv)


def gathered(zero, shard):
    """The whole flat buffer from every rank's `shard`, on every rank."""
    return zero.dp.allgather(shard, np.empty(zero.layout.size, shard.dtype), np.diff(zero.bounds))


def main(argv=None):
    dp = world()
    args = checked(dp, setup, argv)
    gpt_cfg, train_cfg = dp_verify.configs(dp.size, ACCUMS)      # chapter 03's tiny model and batch rule
    batches, start, ref_losses, ref_params, ref_opt, _ = reference(gpt_cfg, train_cfg, args.steps)
    layout = zero_train.gpt_layout(gpt_cfg)
    itemsize = ref_params.itemsize
    largest_part = zero_lib.largest_part(layout, zero_train.modules(gpt_cfg)) * itemsize

    report, show = Report(TOL, detail=25), dp.rank == 0
    for stage in zero_lib.STAGES:
        for accum in ACCUMS:
            label = f"stage {stage} x{accum}:"
            par = ParallelConfig(dp=dp.size, grad_accum=accum, zero_stage=stage, bucket_mb=0.005)
            state = zero_train.build(gpt_cfg, train_cfg, par, dp, params=start.copy())
            layout, zero, opt = state.layout, state.sync, state.opt
            losses, left = [], 0
            for step, (x, y) in enumerate(batches):
                dp.ledger.reset()
                losses.append(zero_train.dp_train.train_step(state, (x, y), train_cfg.learning_rate))
                left += zero.transient.held()
                if step == 0 and dp.size > 1:
                    got = dp.ledger.as_dict()
                    want = {**zero_lib.comm_formula(stage, layout, accum, itemsize), "allreduce": 16}
                    report.compare(f"{label} collectives (bytes)", [got.get(k, {}).get("bytes", 0) for k in want] +
                                   [len(got)], list(want.values()) + [len(want)], show)
            report.compare(f"{label} losses", losses, ref_losses, show)
            report.compare_tensors(label, layout.views(gathered(zero, zero.pshard)), layout.views(ref_params), show,
                                   group="all parameters")
            report.compare_tensors(label, named(m=layout.views(gathered(zero, opt.m)),
                                                v=layout.views(gathered(zero, opt.v))),
                                   named(m=layout.views(ref_opt.m), v=layout.views(ref_opt.v)), show,
                                   group="Adam m and v")
            memory = zero.memory(opt)
            formula = zero_lib.memory_formula(stage, layout.size, zero.hi - zero.lo, widths(train_cfg))
            report.compare(f"{label} state bytes", [memory[k] for k in formula], list(formula.values()),
                           show)
            report.compare(f"{label} peak gathered", memory["gathered parameters (peak)"],
                           largest_part if stage == 3 else 0, show)
            report.compare(f"{label} transient left", left, 0, show)
    mixed_cfg = ref.mixed(train_cfg)
    one = reference(gpt_cfg, mixed_cfg, 1)
    for stage in zero_lib.STAGES:
        for accum in ACCUMS:
            mixed_step(report, gpt_cfg, mixed_cfg, one, stage, accum, dp, show)
    return report.finish(f"N={dp.size}: ", show)


def mixed_step(report, gpt_cfg, train_cfg, one, stage, accum, dp, show):
    """The first step in 16-bit mixed precision against single core's (`one`): loss and gradient shards within
    the derived tolerance (each micro-batch's gradient rounded when it is bucketed, at each of the N - 1 additions
    of its reduce-scatter and when added into the shard), the model state's, the collectives' and the caches'
    bytes equal to their formulas."""
    label = f"{train_cfg.precision} stage {stage} x{accum}:"
    par = ParallelConfig(dp=dp.size, grad_accum=accum, zero_stage=stage, bucket_mb=0.005)
    state = zero_train.build(gpt_cfg, train_cfg, par, dp, params=one.start.copy())
    zero, w = state.sync, widths(train_cfg)
    dp.ledger.reset()
    loss = zero_train.dp_train.train_step(state, one.batches[0], train_cfg.learning_rate)
    if dp.size > 1:
        got = dp.ledger.as_dict()
        want = {**zero_lib.comm_formula(stage, state.layout, accum, w.weights, w.grads), "allreduce": 16}
        report.compare(f"{label} collectives (bytes)", [got.get(k, {}).get("bytes", 0) for k in want],
                       list(want.values()), show)
    tol = ref.mixed_tolerance(train_cfg, gpt_cfg.n_layer, accum * (dp.size + 1))
    report.compare(f"{label} loss", loss, one.losses[0], show, tol=tol)
    report.compare(f"{label} activation bytes", state.held.peak["activations"],
                   zero_train.memory_estimate(gpt_cfg, train_cfg, par)["activations"], show)
    report.compare_tensors(label, state.layout.views(gathered(zero, zero.gshard)), state.layout.views(one.grads),
                           show, group="first gradient", tol=tol)
    memory = zero.memory(state.opt)
    formula = zero_lib.memory_formula(stage, state.layout.size, zero.hi - zero.lo, w)
    report.compare(f"{label} state bytes", [memory[k] for k in formula], list(formula.values()), show)



if __name__ == "__main__":
    raise SystemExit(main())
