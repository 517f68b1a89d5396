"""Prove that the tensor-parallel model computes exactly what the single-core model computes.

    mpirun -n 2 python 02_tensor_parallel/verify.py          # -n 1, 2 or 4 (divisors of n_head); float64, a tiny model
    mpirun -n 2 python 02_tensor_parallel/verify.py --sequence-parallel

Both models start from the same weights and take the same AdamW steps on the same batches, in this one job.
Rows compare logits, loss and every gradient of the first step, every parameter after the last, the
replicated gradients across ranks, and the communication ledger of one step against the formula. Then the
first step of train.py's train_step in bf16 mixed precision against single-core bf16: the loss and every gradient
within the tolerance derived from bf16's unit roundoff (chapter 01's README).
"""
import numpy as np

from common.checks import Report
from common.chapters import import_chapter
from common.comm import checked, world
from common.config import ConfigError, GPTConfig, ParallelConfig, Parser, TrainConfig
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params
from common.optim import AdamW, clip_grad_norm, decays

tp_lib = import_chapter("02_tensor_parallel.tensor_parallel")
tp_train = import_chapter("02_tensor_parallel.train")
ref = import_chapter("01_single_core.verify")
TOL = 1e-10
LR, BETA1, BETA2, WD, CLIP = 1e-2, 0.9, 0.99, 0.1, 1.0


def setup(argv, tp_size):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps both models take (default: 3)")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--vocab-size", type=int, default=11, help="odd by default, so the padding is exercised")
    parser.add_argument("--sequence-parallel", action="store_true", help="check sequence parallelism too")
    args = parser.parse_args(argv)
    gpt_cfg = GPTConfig(n_layer=2, n_head=args.n_head, n_embd=4 * args.n_head, block_size=8, vocab_size=args.vocab_size)
    gpt_cfg.validate()
    # this script's ranks are all tensor-parallel: name the -n that fit, not train.py's --tp
    sp = args.sequence_parallel
    sizes = [n for n in range(1, gpt_cfg.n_head + 1)
             if gpt_cfg.n_head % n == 0 and (not sp or gpt_cfg.block_size % n == 0)]
    if tp_size not in sizes:
        split = (f"n_head={gpt_cfg.n_head}" if gpt_cfg.n_head % tp_size else
                 f"block_size={gpt_cfg.block_size}, which --sequence-parallel splits")
        other = f", or give --n-head a multiple of {tp_size}" if not sp or gpt_cfg.block_size % tp_size == 0 else ""
        raise ConfigError(f"{tp_size} ranks do not divide {split}; run mpirun -n with one of {sizes}{other}")
    return args, gpt_cfg


def ledger_formula(gpt_cfg, B, itemsize, replicated, sp):
    """{kind: (calls, bytes)} of one training step: tensor_parallel.comm_formula's, and the gradient norm's
    all-reduce of one float64."""
    want = tp_lib.comm_formula(gpt_cfg, B, itemsize, sp, replicated=replicated)
    calls, nbytes = want.get("allreduce", (0, 0))
    return {**want, "allreduce": (calls + 1, nbytes + 8)}


def main(argv=None):
    tp = world()
    args, gpt_cfg = checked(tp, setup, argv, tp.size)
    B, sp = 3, args.sequence_parallel
    layout = gpt_layout(gpt_cfg)
    rng = np.random.default_rng(0)
    full = init_params(gpt_cfg, 0, np.float64)
    full += rng.normal(0.0, 0.1, full.shape)       # biases off 0 and gains off 1, where mistakes could hide
    batches = []
    for _ in range(args.steps):
        idx = rng.integers(0, gpt_cfg.vocab_size, (B, gpt_cfg.block_size))
        idx[1, :3] = idx[0, 0]                      # repeated tokens: embedding gradients must add up
        batches.append((idx, rng.integers(0, gpt_cfg.vocab_size, idx.shape)))

    # single core, the reference (every rank computes it: it is tiny)
    ref_p, ref_g = full.copy(), np.zeros_like(full)
    ref_opt = AdamW(layout.mask(decays), BETA1, BETA2, WD, dtype=np.float64)
    # tensor parallel: this rank's shards of the same weights
    local = tp_lib.tp_layout(gpt_cfg, tp.size)
    params = tp_lib.shard(layout.views(full), local, gpt_cfg, tp.size, tp.rank, np.float64)
    grads = np.zeros_like(params)
    opt = AdamW(local.mask(decays), BETA1, BETA2, WD, dtype=np.float64)

    report = Report(TOL, width=40)
    show = tp.rank == 0
    for step, (x, y) in enumerate(batches):
        ref_g.fill(0)
        ref_logits, ref_loss, cache = gpt_forward(layout.views(ref_p), x, y, gpt_cfg)
        gpt_backward(cache, layout.views(ref_p), layout.views(ref_g))

        grads.fill(0)
        tp.ledger.reset()
        logits, loss, cache = tp_lib.tp_forward(local.views(params), x, y, gpt_cfg, tp, sp)
        tp_lib.tp_backward(cache, local.views(params), local.views(grads), tp, sp)
        norm = tp_lib.grad_norm(grads, local, tp)
        ledger = tp.ledger.as_dict()

        if step == 0:
            gathered = tp.allgather(logits.reshape(-1), np.empty((tp.size, logits.size)))
            full_logits = np.concatenate([g.reshape(logits.shape) for g in gathered], axis=-1)
            report.compare("logits", full_logits[..., :gpt_cfg.vocab_size], ref_logits, show)
            report.compare("loss", loss, ref_loss, show)
            report.compare_tensors("grad", tp_lib.unshard(grads, local, gpt_cfg, tp), layout.views(ref_g), show)
            pieces = tp.allgather(grads, np.empty((tp.size, grads.size)))
            spread = max((np.abs(pieces[:, a:b] - pieces[0, a:b]).max() for name, (a, b) in local.offsets.items()
                          if tp_lib.kind(name) == "replicated"), default=0.0)
            report.compare("replicated grads, rank vs rank 0", spread, 0.0, show)
            if tp.size > 1:
                replicated = sum(a.size for n, a in local.views(grads).items() if tp_lib.kind(n) == "replicated")
                for kind, (calls, nbytes) in ledger_formula(gpt_cfg, B, 8, replicated, sp).items():
                    got = ledger.get(kind, {"calls": 0, "bytes": 0})
                    report.compare(f"ledger: {kind} calls", got["calls"], calls, show)
                    report.compare(f"ledger: {kind} bytes", got["bytes"], nbytes, show)
                report.compare("ledger: nothing else", len(ledger), len(ledger_formula(gpt_cfg, B, 8, 0, sp)), show)

        ref_norm = clip_grad_norm(ref_g, CLIP)
        clip_grad_norm(grads, CLIP, norm)
        report.compare(f"grad norm, step {step}", norm, ref_norm, show)
        ref_opt.step(ref_p, ref_g, LR)
        opt.step(params, grads, LR)

    report.compare_tensors(f"after {args.steps} steps: param", tp_lib.unshard(params, local, gpt_cfg, tp),
                           layout.views(ref_p), show)
    mixed_step(report, gpt_cfg, tp, sp, show)
    return report.finish(f"tp={tp.size}{' with sequence parallelism' if sp else ''}: ", show)


def mixed_step(report, gpt_cfg, tp, sp, show):
    """train.py's first step in bf16 against single core's: the bytes its caches held against the formula (in 16 bits),
    the loss and every gradient within the derived tolerance (the gradient rounded once, and under sp the replicated
    ones at each of the tp - 1 additions of their all-reduce). The blocks compute in float32, so tensor
    parallelism's own sums add no rounding."""
    train_cfg = ref.mixed(TrainConfig(batch_size=3, learning_rate=LR, beta1=BETA1, beta2=BETA2, weight_decay=WD,
                                      grad_clip=CLIP, seed=0))
    one = ref.reference(gpt_cfg, train_cfg, 1)
    state = tp_train.build(gpt_cfg, train_cfg, ParallelConfig(tp=tp.size, sequence_parallel=sp), tp,
                           full=one.start.copy())
    loss = tp_train.train_step(state, one.batches[0], LR)
    tol = ref.mixed_tolerance(train_cfg, gpt_cfg.n_layer, tp.size)
    report.compare(f"{train_cfg.precision}: loss", loss, one.losses[0], show, tol=tol)
    report.compare(f"{train_cfg.precision}: activation bytes", state.held.peak["activations"],
                   tp_train.memory_estimate(gpt_cfg, train_cfg, state.par)["activations"], show)
    report.compare_tensors(f"{train_cfg.precision}:", tp_lib.unshard(state.grads, state.layout, gpt_cfg, tp),
                           gpt_layout(gpt_cfg).views(one.grads), show, group="first gradient", tol=tol)


if __name__ == "__main__":
    raise SystemExit(main())
