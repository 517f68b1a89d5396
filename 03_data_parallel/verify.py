"""Prove that data parallelism, in every mode and with gradient accumulation, computes what single core computes.

    mpirun -n 2 python 03_data_parallel/verify.py            # any -n: the batch grows with it; float64, a tiny model

For each --dp-mode (naive, bucketed, overlapped) and --grad-accum (1, 2, 4), the real train_step of
03_data_parallel/train.py and the single-core train_step of chapter 01 take the same AdamW steps on the same
global batches from the same weights. Rows: the losses; every parameter tensor after the steps (one row per
run, naming the worst tensor); the replicas' agreement; and the all-reduce ledger of one step against the
formula. Then the same first step in bf16 mixed precision against single-core bf16: the loss and every gradient
within the tolerance derived from bf16's unit roundoff (ref.mixed_tolerance), the replicas still bit for bit
identical, and the ledger's bytes halved.
"""
import math

from common.checks import Report
from common.chapters import import_chapter
from common.comm import checked, world
from common.config import GPTConfig, Parser, ParallelConfig, TrainConfig

ref = import_chapter("01_single_core.verify")
reference = ref.reference
dp_train = import_chapter("03_data_parallel.train")
dp_lib = import_chapter("03_data_parallel.data_parallel")
TOL = 1e-10
MODES, ACCUMS = ("naive", "bucketed", "overlapped"), (1, 2, 4)
ROWS = 2   # per rank and micro-batch at the deepest accumulation


def setup(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps both models take (default: 3)")
    return parser.parse_args(argv)


def configs(dp_size, accums):
    """The tiny float64 model and its training config, the batch splitting evenly over the ranks for every
    accumulation (else the check itself would be wrong): chapter 04's verify uses them too."""
    gpt_cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    return gpt_cfg, TrainConfig(batch_size=dp_size * math.lcm(*accums) * ROWS, dtype="float64", learning_rate=1e-2,
                                seed=0)


def main(argv=None):
    dp = world()
    args = checked(dp, setup, argv)
    gpt_cfg, train_cfg = configs(dp.size, ACCUMS)
    batches, start, ref_losses, ref_params, _, _ = reference(gpt_cfg, train_cfg, args.steps)

    report, show = Report(TOL, width=34, detail=24), dp.rank == 0
    for mode in MODES:
        for accum in ACCUMS:
            par = ParallelConfig(dp=dp.size, grad_accum=accum, dp_mode=mode, bucket_mb=0.01)
            state = dp_train.build(gpt_cfg, train_cfg, par, dp)
            state.params[...] = start
            layout, params, sync = state.layout, state.params, state.sync
            losses = []
            for step, (x, y) in enumerate(batches):
                dp.ledger.reset()
                losses.append(dp_train.train_step(state, (x, y), train_cfg.learning_rate))
                if step == 0 and dp.size > 1:
                    got = dp.ledger.as_dict()
                    want = dp_lib.comm_formula(mode, layout, len(sync.buckets), params.itemsize)
                    report.compare(f"{mode:>10} x{accum}: ledger calls, bytes",
                                   [got.get(k, {}).get("calls", 0) for k in want] +
                                   [got.get(k, {}).get("bytes", 0) for k in want] + [len(got)],
                                   [c for c, _ in want.values()] + [b for _, b in want.values()] + [len(want)], show)
            report.compare(f"{mode:>10} x{accum}: losses", losses, ref_losses, show)
            report.compare_tensors(f"{mode:>10} x{accum}:", layout.views(params), layout.views(ref_params), show,
                                   group="all parameters")
            report.compare(f"{mode:>10} x{accum}: replicas identical", float(not dp.identical(params)), 0.0, show)
    for mode in MODES:
        for accum in ACCUMS[:2]:
            mixed_step(report, gpt_cfg, ref.mixed(train_cfg), mode, accum, dp, show)
    return report.finish(f"dp={dp.size}: ", show)


def mixed_step(report, gpt_cfg, train_cfg, mode, accum, dp, show):
    """The first step in 16-bit mixed precision against single core's: the bytes the caches held against the formula
    (in 16 bits), loss and gradients within the derived tolerance (the gradient is rounded once per micro-batch and
    once per rank the all-reduce adds), the replicas bit for bit identical, the ledger in 16-bit bytes."""
    one = reference(gpt_cfg, train_cfg, 1)
    state = dp_train.build(gpt_cfg, train_cfg, ParallelConfig(dp=dp.size, grad_accum=accum, dp_mode=mode,
                                                               bucket_mb=0.01), dp)
    ref.start_weights(state, one.start)
    dp.ledger.reset()
    loss = dp_train.train_step(state, one.batches[0], train_cfg.learning_rate)
    label, tol = f"{train_cfg.precision} {mode} x{accum}:", ref.mixed_tolerance(train_cfg, gpt_cfg.n_layer,
                                                                               accum + dp.size - 1)
    report.compare(f"{label} loss", loss, one.losses[0], show, tol=tol)
    report.compare(f"{label} activation bytes", state.held.peak["activations"],
                   dp_train.memory_estimate(gpt_cfg, train_cfg, state.par)["activations"], show)
    report.compare_tensors(label, state.layout.views(state.grads), state.layout.views(one.grads), show,
                           group="first gradient", tol=tol)
    report.compare(f"{label} replicas identical", float(not dp.identical(state.params)), 0.0, show)
    if dp.size > 1:
        want = dp_lib.comm_formula(mode, state.layout, len(state.sync.buckets), state.grads.itemsize)
        got = dp.ledger.as_dict()
        report.compare(f"{label} ledger bytes", [got.get(k, {}).get("bytes", 0) for k in want],
                       [b for _, b in want.values()], show)


if __name__ == "__main__":
    raise SystemExit(main())
