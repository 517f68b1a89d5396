"""Prove that every 3D layout of the job's ranks, with and without sequence parallelism, ZeRO and context
parallelism, computes what single core computes.

    mpirun -n 8 python 06_3d/verify.py            # every (tp, cp, pp, dp) of 8 ranks; any -n has (1, 1, 1, n)
    mpirun -n 8 python 06_3d/verify.py --tp 2 --pp 2 --dp 2
    mpirun -n 4 python 06_3d/verify.py --cp 4     # context parallelism alone
    mpirun -n 4 python 06_3d/verify.py --cp-mode ulysses     # the layouts with cp > 1, by Ulysses only

For each layout (tp x pp x dp = the number of ranks, tp dividing the 4 heads, pp at most the 4 layers), and
each of plain, --sequence-parallel (tp > 1), --zero-stage 1 (dp > 1; with pp = 1 also 2 and 3) and SP with each
stage; and for each layout with cp = 2 or 4 as well (tp x cp x pp x dp ranks), once by ring attention, and once
by Ulysses where cp divides the 4/tp heads of a tp rank, with SP, ZeRO and the zig-zag or contiguous split taken
in turn (a cycle for each); with the pipeline schedules taken in turn (interleaved over 2
chunks where the layers allow, zb-h1, 1f1b, afab; zb-h1 not with ZeRO-2/3) and --recompute none, full and
selective taken in turn likewise, the
real train_step of 06_3d/train.py and the single-core train_step of chapter 01 (recomputing nothing) take the
same AdamW steps on the same batches from the same weights, in float64. Rows: the losses on every rank; every
parameter tensor, and Adam's m and v of each, after the steps, consolidated from the grid (one row naming the
worst tensor); every rank's bytes per axis (tp, cp, pp, ends, dp) in one step against grid.ledger_formula; and
whether every rank's caches held at their peak the bytes of activations the formula gives (train.py's
memory_estimate). Then the first step of the two layouts that split the model most, and of the Ulysses run that
does, in bf16 mixed precision, against single-core bf16: the loss, and Adam's m (the first gradient) within the
tolerance derived from bf16's unit roundoff (chapter 01's README).
"""
import itertools
from dataclasses import replace

import numpy as np

from common.checks import Report, named
from common.chapters import import_chapter
from common.checkpoint import STATE
from common.comm import checked, world
from common.config import CP_MODES, ConfigError, GPTConfig, Parser, ParallelConfig, TrainConfig
from common.precision import widths

ref_lib = import_chapter("01_single_core.verify")
reference = ref_lib.reference
train3d = import_chapter("06_3d.train")
grid_lib = import_chapter("06_3d.grid")
tp_lib = import_chapter("02_tensor_parallel.tensor_parallel")
TOL = 1e-10
GPT = GPTConfig(n_layer=4, n_head=4, n_embd=16, block_size=8, vocab_size=11)
CP_SIZES = (1, 2, 4)                                  # 8 positions split into 2 cp chunks of 2 or 1


def grids(tp=None, pp=None):
    """(tp, pp) pairs the model can take, tp dividing its heads and every stage holding a block, that agree with
    the sizes asked for (None: any)."""
    return [(t, p) for t, p in itertools.product(range(1, GPT.n_head + 1), range(1, GPT.n_layer + 1))
            if GPT.n_head % t == 0 and tp in (None, t) and pp in (None, p)]


def takes(tp, cp, mode):
    """Whether a layout of tp and cp ranks runs cp's attention `mode`: any cp > 1 the ring, Ulysses where cp
    divides the tp rank's heads."""
    return cp > 1 and (mode == "ring" or (GPT.n_head // tp) % cp == 0)


def setup(argv, world_size):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps both models take (default: 3)")
    for axis in ("tp", "cp", "pp", "dp", "ep"):
        parser.add_argument(f"--{axis}", type=int, help="only layouts with this size (default: all; --ep: only the "
                            "mixture of experts' runs)" if axis == "ep" else "only layouts with this size (default: "
                            "all)")
    parser.add_argument("--cp-mode", choices=CP_MODES, help="only the runs with cp > 1 of this attention (default: "
                        "every run)")
    args = parser.parse_args(argv)
    args.experts = expert_runs(world_size, args)
    if args.ep is not None:
        if not args.experts:
            raise ConfigError(f"--ep {args.ep} fits no expert layout of {world_size} ranks: ep 2 or 4 splits the dp "
                              f"ranks left by tp x pp; run mpirun -n 2, 4 or 8")
        args.layouts = []
        return args
    given = {axis: getattr(args, axis) for axis in ("tp", "cp", "pp", "dp") if getattr(args, axis) is not None}
    for axis, size in given.items():
        if size < 1:
            raise ConfigError(f"--{axis} must be a positive integer, got {size}")
    if args.tp is not None:
        tp_lib.check_layout(GPT, args.tp)
    if args.pp is not None and args.pp > GPT.n_layer:
        raise ConfigError(f"--pp {args.pp} stages > {GPT.n_layer} layers: every stage needs a block; choose --pp of "
                          f"at most {GPT.n_layer}")
    if args.cp is not None and args.cp not in CP_SIZES:
        raise ConfigError(f"--cp {args.cp}: the 8 positions split into 2 cp equal chunks for cp in {CP_SIZES}")
    pairs = [(t, p, c) for t, p in grids(args.tp, args.pp) for c in CP_SIZES if args.cp in (None, c)
             and (args.cp_mode is None or takes(t, c, args.cp_mode))]
    if not pairs:                               # --cp-mode with a --tp or --cp it cannot take
        able = sorted({(t, c) for t, _ in grids() for c in CP_SIZES if takes(t, c, args.cp_mode)})
        raise ConfigError(f"--cp-mode {args.cp_mode} needs cp > 1"
                          + (f" dividing the {GPT.n_head}/tp heads of a tp rank" if args.cp_mode == "ulysses" else "")
                          + f", which {' '.join(f'--{axis} {size}' for axis, size in given.items())} excludes; "
                          f"choose (--tp, --cp) among {able}")
    args.layouts = [(t, c, p, world_size // (t * p * c)) for t, p, c in pairs
                    if world_size % (t * p * c) == 0 and args.dp in (None, world_size // (t * p * c))]
    if not args.layouts:                        # name the -n that would fit, without cp unless --cp or --cp-mode says
        pairs = [(t, p, c) for t, p, c in pairs if c == (args.cp or min(c for _, _, c in pairs))]
        sizes = sorted({t * p * c * args.dp for t, p, c in pairs}) if args.dp else []
        fits = (f"with a multiple of {min(t * p * c for t, p, c in pairs)}" if not sizes else
                f"{sizes[0]}" if len(sizes) == 1 else f"with one of {sizes}")
        asked = [f"--{axis} {size}" for axis, size in given.items()]
        asked += [f"--cp-mode {args.cp_mode}"] if args.cp_mode else []
        raise ConfigError(f"{' '.join(asked)} fits no tp x cp x pp x dp of {world_size} ranks (pp at most "
                          f"{GPT.n_layer}); run mpirun -n {fits}")
    return args


EXPERTS = replace(GPT, n_experts=4, top_k=2, capacity_factor=1.0)      # 4 of a sequence's 16 choices per expert
# (tp, pp, ep, schedule, --recompute, --zero-stage) of the mixture of experts' runs, dp the ranks left, which ep
# must divide
EXPERT_RUNS = [(1, 1, 2, "1f1b", "none", 0), (1, 1, 2, "1f1b", "none", 1), (1, 1, 4, "1f1b", "selective", 0),
               (2, 1, 2, "1f1b", "full", 0), (1, 2, 2, "zb-h1", "none", 0), (1, 2, 2, "interleaved", "selective", 1),
               (2, 2, 2, "afab", "none", 0)]


def expert_runs(world_size, args):
    """The (tp, pp, dp, ep, schedule, recompute, zero stage) runs of EXPERT_RUNS that fit `world_size` ranks and
    the sizes asked for."""
    runs = [(t, p, world_size // (t * p), e, kind, mode, zero) for t, p, e, kind, mode, zero in EXPERT_RUNS
            if world_size % (t * p) == 0 and (world_size // (t * p)) % e == 0]
    asked = dict(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep)
    return [run for run in runs if all(size in (None, got) for size, got in zip(asked.values(), run))
            and args.cp in (None, 1) and args.cp_mode is None]


def variants(tp, cp, pp, dp):
    """(sequence_parallel, zero_stage) pairs that differ on this layout: ZeRO needs dp > 1, and stages 2-3
    come without pipeline stages (pp = 1), where they meet tp as FSDP + TP."""
    stages = (0,) if dp == 1 else (0, 1) if pp > 1 else (0, 1, 2, 3)
    return [(sp, z) for sp in ((False, True) if tp > 1 else (False,)) for z in stages]


def runs_of(layouts, modes=CP_MODES):
    """Every (layout, (sequence_parallel, zero_stage, cp split, cp mode)) run: each variant of a layout without
    cp; one of a layout with cp > 1 for each of `modes` it takes, the variants and the two splits taken in turn,
    in a cycle of each mode's own. The ring's runs (and those without cp) first, in layout order, then Ulysses's,
    whose cycle starts with every variant, SP and the last ZeRO stages first, so that its fewer layouts meet them."""
    runs = []
    for mode in modes:
        cycle, splits = [] if mode == "ring" else variants(2, 1, 1, 2)[::-1], ["zigzag", "contiguous"]
        for layout in layouts:
            tp, cp = layout[:2]
            if cp == 1 and mode == modes[0]:
                runs += [(layout, (sp, z, "zigzag", mode)) for sp, z in variants(*layout)]
            if not takes(tp, cp, mode):
                continue
            options = variants(*layout)
            cycle += [v for v in options if v not in cycle]
            sp, z = next_fitting(cycle, lambda v: v in options)
            runs.append((layout, (sp, z, next_fitting(splits, lambda s: True), mode)))
    return runs


def next_fitting(cycle, fits):
    """The first item of `cycle` that `fits`, moved to the back of the queue."""
    item = next(item for item in cycle if fits(item))
    cycle.append(cycle.pop(cycle.index(item)))
    return item


def schedules(runs):
    """A pipeline schedule, its virtual stages and a --recompute mode for each (layout, variant) run, each taken
    in turn from a cycle, each run getting the next one that fits it (interleaved: pp > 1 and 2 chunks of the 4
    layers per stage, dividing the 2 micro-batches; zb-h1: not with ZeRO-2/3, nor with full recomputation), so
    every schedule and every mode meets several axes."""
    cycles = {True: ["interleaved", "zb-h1", "1f1b", "afab"], False: ["1f1b", "afab", "zb-h1"]}
    modes = ["none", "full", "selective"]
    out = []
    for (_, _, pp, _), (_, zero, _, _) in runs:
        kind = next_fitting(cycles[pp > 1], lambda k: (k != "interleaved" or (2 * pp <= GPT.n_layer and 2 % pp == 0))
                            and (k != "zb-h1" or zero < 2))
        recompute = next_fitting(modes, lambda mode: kind != "zb-h1" or mode != "full")
        out.append((kind, 2 if kind == "interleaved" else 1, recompute))
    return out


def state_tensors(layout, flat):
    """{name: tensor} of the parameters, then of Adam's m and v ("m name", "v name"), from their concatenation."""
    params, m, v = flat.reshape(3, layout.size)
    return {**layout.views(params), **named(m=layout.views(m), v=layout.views(v))}


def main(argv=None):
    comm = world()
    args = checked(comm, setup, argv, comm.size)
    # dp x 2 micro-batches
    train_cfg = TrainConfig(batch_size=2 * comm.size, dtype="float64", learning_rate=1e-2, seed=0)
    report, show = Report(TOL, width=72, detail=25), comm.rank == 0
    runs = runs_of(args.layouts, (args.cp_mode,) if args.cp_mode else CP_MODES)
    if runs:
        batches, start, ref_losses, ref_params, ref_opt, _ = reference(GPT, train_cfg, args.steps)
        ref = np.concatenate([ref_params, ref_opt.m, ref_opt.v])
    for ((tp, cp, pp, dp), (sp, zero, split, mode)), (schedule, virtual, recompute) in zip(runs, schedules(runs)):
        label = (f"({tp},{cp},{pp},{dp}){' ulysses' if mode == 'ulysses' else ''}"
                 f"{' contiguous' if split != 'zigzag' else ''}{' sp' if sp else ''}{f' z{zero}' if zero else ''} "
                 f"{schedule}{f' {recompute}' if recompute != 'none' else ''}:")
        par = ParallelConfig(tp=tp, pp=pp, dp=dp, cp=cp, cp_split=split, cp_mode=mode, sequence_parallel=sp,
                             zero_stage=zero, microbatches=2, schedule=schedule, virtual_stages=virtual,
                             bucket_mb=0.005)
        run_cfg = replace(train_cfg, recompute=recompute)
        compare_run(report, label, GPT, run_cfg, par, comm, (batches, start, ref_losses, ref), show)
    mixed_cfg = replace(ref_lib.mixed(train_cfg), grad_clip=0.0)     # so that m is (1 - beta1) x the gradient
    if runs:
        one = reference(GPT, mixed_cfg, 1)
        most = sorted(runs, key=lambda run: -sum(n > 1 for n in run[0][:3]))    # the layouts splitting the model most
        picked = ([run for run in most if run[1][3] != "ulysses"][:2]     # (without cp, or by the ring)
                  + [run for run in most if run[1][3] == "ulysses"][:1])
        for i, ((tp, cp, pp, dp), (sp, zero, split, mode)) in enumerate(picked):
            par = ParallelConfig(tp=tp, pp=pp, dp=dp, cp=cp, cp_split=split, cp_mode=mode, sequence_parallel=sp,
                                 zero_stage=zero, microbatches=2, schedule="zb-h1" if i and zero < 2 else "1f1b",
                                 bucket_mb=0.005)
            mixed_step(report, GPT, mixed_cfg, one, par, comm, show)
    if args.experts:                    # a mixture of experts, its experts split over ep of the dp ranks
        batches, start, ref_losses, ref_params, ref_opt, _ = reference(EXPERTS, train_cfg, args.steps)
        ref = np.concatenate([ref_params, ref_opt.m, ref_opt.v])
        for tp, pp, dp, ep, schedule, recompute, zero in args.experts:
            par = ParallelConfig(tp=tp, pp=pp, dp=dp, ep=ep, microbatches=2, schedule=schedule, bucket_mb=0.005,
                                 virtual_stages=2 if schedule == "interleaved" else 1, zero_stage=zero)
            label = (f"experts ({tp},1,{pp},{dp}) ep {ep}{f' z{zero}' if zero else ''} {schedule}"
                     f"{f' {recompute}' if recompute != 'none' else ''}:")
            compare_run(report, label, EXPERTS, replace(train_cfg, recompute=recompute), par, comm,
                        (batches, start, ref_losses, ref), show)
        tp, pp, dp, ep, *_ = args.experts[0]
        mixed_step(report, EXPERTS, mixed_cfg, reference(EXPERTS, mixed_cfg, 1),
                   ParallelConfig(tp=tp, pp=pp, dp=dp, ep=ep, microbatches=2, bucket_mb=0.005), comm, show)
    return report.finish(f"{comm.size} ranks: ", show)


def compare_run(report, label, gpt_cfg, run_cfg, par, comm, reference_run, show):
    """Train `par`'s layout on the reference run's batches from its start, and add its rows: the losses, every
    tensor after the steps, the ledger of the first step and (dense models) the activations' bytes, every rank."""
    batches, start, ref_losses, ref = reference_run
    grid = grid_lib.Grid.build(comm, par.tp, par.cp, par.pp, par.dp, par.ep)
    state = grid_lib.State(gpt_cfg, run_cfg, par, grid, start)
    losses, ledger_ok = [], True
    for step, (x, y) in enumerate(batches):
        reset(state)
        losses.append(train3d.train_step(state, (x, y), run_cfg.learning_rate))
        if step == 0:
            ledger_ok = measured(state) == grid_lib.ledger_formula(gpt_cfg, par, state.stage, run_cfg.batch_size, 8,
                                                                   run_cfg.recompute, state.moved())
    whole = state.whole()
    layout = train3d.gpt_layout(gpt_cfg)
    flat = np.concatenate([whole[k][name].ravel() for k in STATE
                           for name in layout.shapes]) if comm.rank == 0 else np.empty(ref.size)
    comm.bcast(flat)
    held_ok = state.held.peak["activations"] == train3d.memory_estimate(gpt_cfg, run_cfg, par, comm.rank)["activations"]
    every = comm.allgather(np.array([losses[-1], float(ledger_ok), float(held_ok)]),
                           np.empty(3 * comm.size)).reshape(-1, 3)
    report.compare(f"{label} losses", losses, ref_losses, show)
    report.compare(f"{label} last loss, every rank", every[:, 0], np.full(comm.size, ref_losses[-1]), show)
    report.compare_tensors(label, state_tensors(layout, flat), state_tensors(layout, ref), show, group="params, m, v")
    report.compare(f"{label} ledger, every rank", every[:, 1], np.ones(comm.size), show)
    if not gpt_cfg.n_experts:           # how many rows experts keep depends on the routing: no formula to the byte
        report.compare(f"{label} activations, every rank", every[:, 2], np.ones(comm.size), show)


def reset(state):
    """Empty every ledger of the state's grid, and the routing its expert-parallel ledger formula reads."""
    for c in state.ledgers().values():
        c.ledger.reset()
    if state.experts:
        state.experts.kept.clear()


def measured(state):
    """{axis: {kind: bytes}} of every ledger of the state's grid."""
    return {axis: {k: v["bytes"] for k, v in c.ledger.as_dict().items()} for axis, c in state.ledgers().items()}


def mixed_step(report, gpt_cfg, train_cfg, one, par, comm, show):
    """The first step of a layout in 16-bit mixed precision against single core's (`one`): every rank's bytes per
    axis against ledger_formula in the run's widths (float32 inside a part, 16-bit between stages and for the
    gradients' sums) and its activations' bytes against the formula, the loss, and Adam's m (after one unclipped
    step, the gradient times 1 - beta1) within the derived tolerance: each of the M micro-batches' gradients is
    rounded when it is stored, at each of the dp x cp - 1 additions of its reduction and when it is accumulated,
    wte's once more when its halves are summed over the pipeline's ends, and under zb-h1 the deferred weight
    gradients' operands once more, stored in 16 bits."""
    label = (f"{train_cfg.precision}{' experts' if gpt_cfg.n_experts else ''} ({par.tp},{par.cp},{par.pp},{par.dp})"
             f"{' ulysses' if par.cp_mode == 'ulysses' else ''}{f' ep {par.ep}' if par.ep > 1 else ''}"
             f"{' sp' if par.sequence_parallel else ''}"
             f"{f' z{par.zero_stage}' if par.zero_stage else ''} {par.schedule}:")
    grid = grid_lib.Grid.build(comm, par.tp, par.cp, par.pp, par.dp, par.ep)
    state = grid_lib.State(gpt_cfg, train_cfg, par, grid, one.start)
    reset(state)
    loss = train3d.train_step(state, one.batches[0], train_cfg.learning_rate)
    ledger_ok = measured(state) == grid_lib.ledger_formula(gpt_cfg, par, state.stage, train_cfg.batch_size,
                                                           widths(train_cfg), moved=state.moved())
    held_ok = (state.held.peak["activations"] ==
               train3d.memory_estimate(gpt_cfg, train_cfg, par, comm.rank)["activations"])
    every = comm.allgather(np.array([float(ledger_ok), float(held_ok)]), np.empty(2 * comm.size)).reshape(-1, 2)
    report.compare(f"{label} ledger, every rank", every[:, 0], np.ones(comm.size), show)
    if not gpt_cfg.n_experts:
        report.compare(f"{label} activations, every rank", every[:, 1], np.ones(comm.size), show)
    whole = state.whole()
    tol = ref_lib.mixed_tolerance(train_cfg, gpt_cfg.n_layer, par.microbatches * (par.dp * par.cp + 1) + 1
                                  + (par.schedule == "zb-h1"))
    report.compare(f"{label} loss", loss, one.losses[0], show, tol=tol)
    if comm.rank == 0:
        report.compare_tensors(label, whole["adam_m"], train3d.gpt_layout(gpt_cfg).views(one.opt.m), show,
                               group="Adam m (the first gradient)", tol=tol)


if __name__ == "__main__":
    raise SystemExit(main())
