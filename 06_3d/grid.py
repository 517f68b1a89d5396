"""3D parallelism: tensor, pipeline and data parallelism (optionally ZeRO, and context parallelism as a fourth
axis) on one grid of tp x cp x pp x dp ranks.

The grid. World rank r sits at tp = r % tp, cp = (r // tp) % cp, pp = (r // (tp cp)) % pp, dp = r // (tp cp pp):
the tp ranks of one pipeline stage are neighbours, so on real machines they share a node and its fast links,
which tensor parallelism needs (two all-reduces of activations per block and micro-batch); the cp ranks come
next (every block passes keys and values round their ring); the pipeline sends one activation per micro-batch
and stage boundary; data parallelism reduces gradients once per step. Each axis gets its own communicator (MPI
Split): ranks that differ only along that axis; and dcp, the ranks that differ in dp or cp, which hold the same
weights and sum their gradients.

Composed, without copies, from the chapters before:
    02  inside each stage, every weight matrix split over the tp ranks (tp_parts: the model driver's parts
        with f and g written in), with optional sequence parallelism (activations between stages are then
        (b, T/tp, C) per rank; a part's replicated gradients are summed over tp before they are announced)
    06  with --cp, each rank holds T/cp positions of every activation, and tp_parts' attention is the ring of
        context_parallel.py, or with --cp-mode ulysses the all-to-alls of ulysses.py around chapter 01's attention
    05  stages run a 1F1B or AFAB schedule over M micro-batches; wte's gradient is summed between the
        first and last stage (each holding the same vocabulary shard)
    03  each (tp, pp) position's gradient summed over the dp (x cp) replicas, in buckets started during the last
        micro-batch's backward
    04  or, with --zero-stage 1, reduce-scattered, each rank updating its shard, then all-gathered; with
        --pp 1 also ZeRO-2 (gradient buckets reduce-scattered every micro-batch) and ZeRO-3 (each part's
        weights gathered just in time): the "FSDP + TP" layout

The loss is the mean over dp x cp x M micro-batches of b = B/(dp M) rows and T/cp positions, so the last stage
seeds each backward with 1/(dp cp M). The grad norm is one world all-reduce of squares, each element counted
once: a replicated tensor on tp rank 0 only, wte on the first stage only, and without ZeRO on dcp rank 0 only.

Communication per step, as chapters 02, 05, 03/04 and context_parallel.py derive it, on each axis's communicator
(T here the positions a rank holds, T/cp):
    tp  per micro-batch: (4 L_s + first + last) all-reduces of b T C e (with sp: as many all-gathers and
        reduce-scatters), plus 3 of b T e on the last stage; with sp the replicated gradients once (ZeRO-2/3:
        once per micro-batch)
    cp  per micro-batch and block: K and V round the ring, 3 cp - 2 times (dK and dV included), 2 b T (C/tp) e;
        or Ulysses's all-to-alls, of 3 b T (C/tp) e and b T (C/tp) e each way
    pp  per micro-batch and boundary b (T/tp with sp) C e each way; the loss broadcast; wte's all-reduce
    dp  the stage's local gradient once, over dcp: an all-reduce (or ZeRO's collectives, chapter 04's formula)
"""
import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import model_state
from common.comm import Comm
from common.config import ConfigError, GPTConfig
from common.memory import Transient
from common.driver import modules, training_parts
from common.model import gpt_layout
from common.moe import LOCAL
from common.optim import decays, global_norm, make_adamw
from common.params import Layout
from common.precision import grad_dtype, mixed, plain, storage

tp_lib = import_chapter("02_tensor_parallel.tensor_parallel")
dp_lib = import_chapter("03_data_parallel.data_parallel")
zero_lib = import_chapter("04_zero.zero")
pipe = import_chapter("05_pipeline.pipeline")
sched = import_chapter("05_pipeline.schedules")
cp_lib = import_chapter("06_3d.context_parallel")
ep_lib = import_chapter("06_3d.experts")
ulysses_lib = import_chapter("06_3d.ulysses")


# ----------------------------------------------------------------------------- the grid

class Coords(NamedTuple):
    """Where a world rank sits on the grid, one coordinate per axis."""
    tp: int
    cp: int
    pp: int
    dp: int


def coords(rank, tp=1, cp=1, pp=1):
    """The coordinates of world rank `rank` on a grid of tp x cp x pp (x dp, the rest) ranks: tp innermost, then
    cp, then pp, then dp."""
    return Coords(rank % tp, (rank // tp) % cp, (rank // (tp * cp)) % pp, rank // (tp * cp * pp))


@dataclass(frozen=True)
class Grid:
    """One communicator per axis, of the ranks that differ only along it; dcp, the dp x cp ranks that hold the
    same weights and sum their gradients (dp itself when cp = 1); ends, the first and last stage of one
    pipeline, which hold wte's two copies; and this rank's coordinates. Expert parallelism adds no ranks: it
    groups ep consecutive dp ranks, which exchange tokens (ep), and the dp / ep ranks at the same place in their
    groups hold the same experts and sum their gradients (edp; dp itself when ep = 1)."""
    world: Comm
    tp: Comm
    cp: Comm
    pp: Comm
    dp: Comm
    dcp: Comm
    ends: Comm
    ep: Comm
    edp: Comm
    at: Coords

    @classmethod
    def build(cls, world, tp_size, cp_size, pp_size, dp_size, ep_size=1):
        assert tp_size * cp_size * pp_size * dp_size == world.size and dp_size % ep_size == 0
        at = coords(world.rank, tp_size, cp_size, pp_size)
        t, c, p, d = at
        tp = world.split(color=(d * pp_size + p) * cp_size + c, key=t, name="tp")
        cp = world.split(color=(d * pp_size + p) * tp_size + t, key=c, name="cp")
        pipeline = world.split(color=(d * cp_size + c) * tp_size + t, key=p, name="pp")
        dp = world.split(color=(p * cp_size + c) * tp_size + t, key=d, name="dp")
        dcp = dp if cp_size == 1 else world.split(color=p * tp_size + t, key=d * cp_size + c, name="dcp")
        group, place = divmod(d, ep_size)                   # which ep group of dp ranks, and where in it
        ep = world.split(color=((group * pp_size + p) * cp_size + c) * tp_size + t, key=place, name="ep")
        edp = dp if ep_size == 1 else world.split(color=((place * pp_size + p) * cp_size + c) * tp_size + t,
                                                   key=group, name="edp")
        return cls(world, tp, cp, pipeline, dp, dcp, pipe.end_stages(pipeline, p, pp_size), ep, edp, at)


def check(gpt_cfg, train_cfg, par, world_size):
    """Every axis's constraint, as one ConfigError naming the flag; --dp defaults to the ranks left over."""
    model = par.tp * par.cp * par.pp
    if par.dp == 1 and world_size % model == 0:
        par.dp = world_size // model
    if model * par.dp != world_size:
        cp = f" x --cp {par.cp}" if par.cp > 1 else ""
        raise ConfigError(f"--tp {par.tp}{cp} x --pp {par.pp} x --dp {par.dp} = {model * par.dp} ranks but mpirun "
                          f"started {world_size}; choose sizes whose product is {world_size}")
    tp_lib.check_layout(gpt_cfg, par.tp, par.sequence_parallel)
    ep_lib.check_layout(gpt_cfg, par.ep, par.dp)
    if gpt_cfg.n_experts and (par.cp > 1 or par.sequence_parallel):
        raise ConfigError(f"--n-experts routes each sequence whole (its capacity is per sequence), but "
                          f"{'--cp' if par.cp > 1 else '--sequence-parallel'} splits it over ranks; leave it out")
    if par.ep > 1 and par.zero_stage > 1:
        raise ConfigError(f"--zero-stage {par.zero_stage} with --ep {par.ep}: the experts' shards are ZeRO-1's here; "
                          f"use --zero-stage 1 with --ep")
    if par.cp > 1:
        cp_lib.check_layout(gpt_cfg, par.cp, par.cp_split, par.tp, par.sequence_parallel, par.cp_mode)
    pipe.check_layout(gpt_cfg, par, train_cfg)
    if train_cfg.batch_size % (par.dp * par.microbatches):
        raise ConfigError(f"--batch-size {train_cfg.batch_size} is not divisible by --dp {par.dp} x --microbatches "
                          f"{par.microbatches}; choose a multiple of {par.dp * par.microbatches}")
    if par.zero_stage > 1 and par.pp > 1:
        raise ConfigError(f"--zero-stage {par.zero_stage} is not combined with --pp {par.pp} here: it would "
                          f"reduce-scatter{' and re-gather' if par.zero_stage == 3 else ''} a stage's gradients for "
                          f"every micro-batch between pipeline sends; use --zero-stage 1 with pipelines, or --pp 1")
    if par.zero_stage > 1 and par.schedule == "zb-h1":
        raise ConfigError(f"--zero-stage {par.zero_stage} reduce-scatters each micro-batch's gradients as its "
                          "backward ends, but --schedule zb-h1 computes them later; use --zero-stage 1 or 0 with zb-h1")


def local_layout(gpt_cfg, stage, pp_size, tp_size, virtual=1, ep_size=1):
    """The tensors of pipeline stage `stage`, each with its shape on one of the tp ranks; with ep > 1, 1/ep of each
    block's experts, placed after the dense tensors (their gradients are summed over other ranks). Remembered, so
    that the planner can ask it of every stage of every layout of a large model (no caller changes a Layout)."""
    return _local_layout(dataclasses.astuple(gpt_cfg), stage, pp_size, tp_size, virtual, ep_size)


@functools.lru_cache(maxsize=4096)
def _local_layout(sizes, stage, pp_size, tp_size, virtual, ep_size):
    gpt_cfg = GPTConfig(*sizes)
    shapes = tp_lib.tp_layout(gpt_cfg, tp_size).shapes
    names = list(pipe.stage_layout(gpt_cfg, stage, pp_size, virtual).shapes)
    if ep_size == 1:
        return Layout([(name, shapes[name]) for name in names])
    experts = [name for name in names if is_expert(name)]
    return Layout([(name, shapes[name]) for name in names if not is_expert(name)] +
                  [(name, (shapes[name][0] // ep_size, *shapes[name][1:])) for name in experts])


def is_expert(name):
    """Whether `name` is one of the experts' stacked tensors, which expert parallelism splits."""
    return ".experts." in name


def split_layout(layout):
    """(the dense tensors' Layout, the experts') of a rank's layout with ep > 1, where the experts come last."""
    return tuple(Layout([(name, shape) for name, shape in layout.shapes.items() if is_expert(name) == part])
                 for part in (False, True))


# ----------------------------------------------------------------------------- one rank's training state

class State:
    """This rank's training state: the shards of its stage, their gradients and optimizer, the pipeline engine
    and the gradient synchronisation over dp (x cp: buckets, or ZeRO); whole() and load() for checkpoints.
    With cp > 1, `pos` are the sequence positions this rank holds, and `ring` its ring attention (None under
    Ulysses)."""

    def __init__(self, gpt_cfg, train_cfg, par, grid, full):
        self.gpt_cfg, self.train_cfg, self.par, self.grid = gpt_cfg, train_cfg, par, grid
        self.stage, P, tp = grid.pp.rank, grid.pp.size, grid.tp
        self.layout = local_layout(gpt_cfg, self.stage, P, tp.size, par.virtual_stages, par.ep)
        # with ep > 1, the dense tensors [0, dense) are summed over dp (x cp), the experts after them over edp
        self.dense = next((start for name, (start, _) in self.layout.offsets.items() if is_expert(name)),
                          self.layout.size) if par.ep > 1 else self.layout.size
        self.mine = ep_lib.owned(gpt_cfg.n_experts, par.ep, grid.ep.rank)
        master = tp_lib.shard(self.my_experts(gpt_layout(gpt_cfg).views(full)), self.layout, gpt_cfg, tp.size, tp.rank,
                              full.dtype)
        params, decay, using = master.astype(storage(train_cfg), copy=False), self.layout.mask(decays), None
        if par.zero_stage:
            self.zero = self._zero(par, params, modules(gpt_cfg))
            self.sync, p, g = self.zero, self.zero.p, self.zero.g
            self.params = params if par.zero_stage < 3 else self.zero.pshard
            self.grads = self.zero.grads if par.zero_stage == 1 else self.zero.gshard
            decay, master = self.my_shard(decay), self.my_shard(master).copy()
            using = self.zero.forward_hook, self.zero.backward_hook
        else:
            self.zero, self.params, self.grads = None, params, np.zeros(params.size, grad_dtype(train_cfg))
            p, g = self.layout.views(params), self.layout.views(self.grads)
            self.sync = self._sync(par, params)
        self.opt = make_adamw(train_cfg, decay, master)
        sp, T = par.sequence_parallel, gpt_cfg.block_size
        self.held = Transient()                  # the activations' bytes, measured: every cache kept is held here
        self.pos, self.ring = None, None         # with cp: the same parts on this rank's positions, cp's attention
        attention = tp_lib.ATTENTION
        if par.cp > 1:
            self.pos = cp_lib.positions(T, par.cp, grid.cp.rank, par.cp_split)
            if par.cp_mode == "ulysses":
                attention = ulysses_lib.Ulysses(grid.cp, T, par.cp_split)
            else:
                attention = self.ring = cp_lib.Ring(grid.cp, T, par.cp_split)
        self.experts = ep_lib.ExpertParallel(grid.ep, gpt_cfg.n_experts) if par.ep > 1 else None
        parts = pipe.zb.deferring(tp_lib.tp_parts(tp, sp, attention, self.pos,
                                                  self.experts.pair if self.experts else LOCAL),
                                  attention=attention.backward,
                                  enter=lambda x: tp_lib.enter(x, tp, sp),
                                  enter_backward=lambda dx: tp_lib.enter_backward(dx, tp, sp),
                                  leave_backward=lambda dx: tp_lib.leave_backward(dx, tp, sp),
                                  loss_backward=tp_lib.vocab_cross_entropy_backward)
        self.parts = training_parts(mixed(parts, params.dtype), train_cfg.recompute, self.held)
        self.st = pipe.Stage(gpt_cfg, self.stage, grid.pp, p, g, parts=self.parts, using=using,
                             seq_len=T // par.cp // (tp.size if sp else 1), dtype=params.dtype,
                             virtual=par.virtual_stages)
        self.counted = self._counted()

    def _zero(self, par, params, parts):
        """Chapter 04's ZeRO over dp x cp; with ep > 1 (stage 1), one over the dense part and one over edp for the
        experts', accumulating in one gradient."""
        grid, cut, dtype = self.grid, self.dense, grad_dtype(self.train_cfg)
        if par.ep == 1:
            return zero_lib.Zero(par.zero_stage, self.layout, parts, params, grid.dcp, par.bucket_mb, dtype)
        dense, experts = split_layout(self.layout)
        grads = np.zeros(self.layout.size, dtype)
        return ep_lib.SplitZero(
            zero_lib.Zero(1, dense, parts, params[:cut], grid.dcp, par.bucket_mb, dtype, grads[:cut]),
            zero_lib.Zero(1, experts, parts, params[cut:], grid.edp, par.bucket_mb, dtype, grads[cut:]), grads)

    def my_shard(self, flat):
        """Under ZeRO, this rank's shard of a flat buffer of its layout (with ep > 1: its two shards, joined)."""
        return self.zero.shard_of(flat) if self.par.ep > 1 else flat[self.zero.lo:self.zero.hi]

    def _sync(self, par, params):
        """Chapter 03's gradient sync over dp x cp; with ep > 1, the dense part's, and the experts' over edp."""
        grid, layout, cut = self.grid, self.layout, self.dense
        if par.ep == 1:
            return dp_lib.GradSync(par.dp_mode, layout, self.grads, grid.dcp, par.bucket_mb, params)
        dense, experts = split_layout(layout)
        return ep_lib.Split(dp_lib.GradSync(par.dp_mode, dense, self.grads[:cut], grid.dcp, par.bucket_mb),
                            dp_lib.GradSync("bucketed", experts, self.grads[cut:], grid.edp, par.bucket_mb),
                            self.grads, params)

    def my_experts(self, views):
        """Single-core views with every experts' tensor cut to the experts this rank holds."""
        return {name: view[self.mine] if is_expert(name) and self.par.ep > 1 else view for name, view in views.items()}

    def replicas(self):
        """(part of the parameters, the ranks that must hold it identical): chapter 03's check, per part."""
        if self.par.ep == 1:
            return [(self.params, self.grid.dcp)]
        return [(self.params[:self.dense], self.grid.dcp), (self.params[self.dense:], self.grid.edp)]

    def _counted(self):
        """[start, stop) ranges of the gradient (ZeRO: of its shard) this rank adds to the global norm: what
        chapters 02 and 05 count once, and without ZeRO on dp x cp rank 0 only (the replicas are equal), the
        experts' on edp rank 0."""
        grid, layout = self.grid, self.layout

        def once(name):
            return tp_lib.counts_once(name, grid.tp.rank) and pipe.counts_once(name, self.stage, grid.pp.size)

        if self.zero and self.par.ep == 1:
            return layout.ranges(once, self.zero.lo, self.zero.hi)
        if self.zero:                   # its dense shard, then its experts' shard (ranges are relative to lo)
            z, cut = self.zero, self.dense
            return layout.ranges(once, z.dense.lo, z.dense.hi) + [
                (a + z.cut, b + z.cut) for a, b in layout.ranges(once, cut + z.experts.lo, cut + z.experts.hi)]
        experts = [(a + self.dense, b + self.dense) for a, b in layout.ranges(once, self.dense)]   # relative to lo
        return (layout.ranges(once, 0, self.dense) if grid.dcp.rank == 0 else []) + (experts if grid.edp.rank == 0
                                                                                     else [])

    def moved(self):
        """(n, m) of every forward this rank's experts ran since `experts.kept` was cleared (none without ep): the
        rows it sent and those of every ep rank its experts received, from all their routing (a collective)."""
        if not self.experts:
            return []
        kept = self.grid.ep.mpi.allgather(self.experts.kept)
        return [ep_lib.rows_moved([k[i] for k in kept], self.grid.ep.rank, self.grid.ep.size)
                for i in range(len(self.experts.kept))]

    def ledgers(self):
        """{axis: the communicator whose ledger counts its bytes}, as ledger_formula names them (dp: over dp x cp)."""
        grid = self.grid
        return {"tp": grid.tp, "cp": grid.cp, "pp": grid.pp, "dp": grid.dcp, "ends": grid.ends, "ep": grid.ep,
                **({"edp": grid.edp} if self.par.ep > 1 else {})}

    def grad_norm(self, g):
        return global_norm(g, self.counted, self.grid.world)

    # ------------------------------------------------------------------------- checkpoints

    def whole(self):
        """{"params" | "adam_m" | "adam_v": {name: whole single-core tensor}} on world rank 0, None elsewhere:
        gathered over dp (ZeRO's shards), then tp (02's unshard), then pp (05's stages)."""
        grid, opt = self.grid, self.opt
        flats = list(model_state(self.params, opt).values())
        if self.zero:                   # m and v are sharded, and the weights from stage 3 (their master always)
            sharded = (self.zero.stage == 3 or hasattr(opt, "master"), True, True)
            flats = [self.zero.gather_flat(shard) if cut else shard for shard, cut in zip(flats, sharded)]
        V = self.par.virtual_stages
        layout = local_layout(self.gpt_cfg, self.stage, grid.pp.size, grid.tp.size, V)     # every expert's
        if self.par.ep > 1:
            flats = [self.all_experts(flat, layout) for flat in flats]
        if grid.dcp.rank != 0:
            return None
        stage_layout = pipe.stage_layout(self.gpt_cfg, self.stage, grid.pp.size, V)
        whole = []
        for flat in flats:
            tensors = tp_lib.unshard(flat, layout, self.gpt_cfg, grid.tp)
            whole.append(np.empty(stage_layout.size, flat.dtype))
            for name, view in stage_layout.views(whole[-1]).items():
                view[...] = tensors[name]
        return pipe.whole_state(self.gpt_cfg, whole, grid.pp, root=0, virtual=V) if grid.tp.rank == 0 else None

    def all_experts(self, flat, layout):
        """This rank's `flat` in `layout`, its stage's with every expert: each experts' tensor gathered over ep."""
        out, mine = np.empty(layout.size, flat.dtype), self.layout.views(flat)
        for name, view in layout.views(out).items():
            if is_expert(name):
                self.grid.ep.allgather(np.ascontiguousarray(mine[name]), view)
            else:
                view[...] = mine[name]
        return out

    def load(self, whole):
        """Take this rank's shards of a consolidated state, whatever layout wrote it: its tp shard of its stage's
        tensors (of its experts'), and under ZeRO its dp x cp shard of m and v (and from stage 3 of the
        parameters)."""
        grid, opt = self.grid, self.opt
        for kind, dest in model_state(self.params, opt).items():
            flat = tp_lib.shard(self.my_experts(whole[kind]), self.layout, self.gpt_cfg, grid.tp.size, grid.tp.rank,
                                dest.dtype)
            dest[...] = flat if dest.size == flat.size else self.my_shard(flat)
        if self.zero and self.zero.stage < 3 and hasattr(opt, "master"):      # the whole 16-bit copy too
            self.params[...] = tp_lib.shard(self.my_experts(whole["params"]), self.layout, self.gpt_cfg, grid.tp.size,
                                            grid.tp.rank, self.params.dtype)
        split = self.zero and self.par.ep > 1             # its optimizer's shard is a copy of two
        if split:
            self.zero.pull()
        opt.cast(self.zero.pshard if self.zero else self.params)
        if split:
            self.zero.push()


# ----------------------------------------------------------------------------- the ledgers

def ledger_formula(gpt_cfg, par, stage, batch_size, itemsize, recompute="none", moved=None):
    """{axis: {kind: bytes}} of one training step on a rank of pipeline stage `stage`, from the sizes alone
    (chapters 02, 05 and 03/04's formulas): what the ledger of any rank of that stage measures. `itemsize`: bytes
    per element, or a run's common.precision.widths. In mixed precision what tp and cp send inside a part of the
    model is float32 (each part computes in float32), the activations between stages are 16-bit, and the
    gradients' sums (sequence parallelism's, the tied embedding's, dp's) are in the gradient's width. With ep > 1,
    `moved` lists the (n, m) rows of every forward of this rank's experts (experts.rows_moved: what routing
    decided; None: a balanced router's, the planner's), and dp sums the dense tensors, edp the experts'."""
    w = plain(itemsize) if isinstance(itemsize, int) else itemsize
    e, M, sp = w.work, par.microbatches, par.sequence_parallel
    b = batch_size // (par.dp * M)                            # rows of one micro-batch
    V = par.virtual_stages
    layout = local_layout(gpt_cfg, stage, par.pp, par.tp, V, par.ep)
    first, last = stage == 0, stage == par.pp - 1
    T = gpt_cfg.block_size // par.cp                          # the positions a rank holds
    blocks = sum(len(chunk) for chunk in sched.chunk_layers(gpt_cfg.n_layer, stage, par.pp, V))
    out = {"tp": {}, "cp": {}, "pp": {}, "dp": {}, "ends": {}, "ep": {}}
    if par.ep > 1:
        layout, experts = split_layout(layout)
        if moved is None:
            moved = ep_lib.balanced(gpt_cfg, b, M * blocks * (2 if recompute == "full" else 1))
        out["ep"] = ep_lib.comm_formula(gpt_cfg.n_experts, moved, w.work, gpt_cfg.n_embd, recompute)
        out["edp"] = {} if par.dp == par.ep else (zero_lib.comm_formula(1, experts, M, w.weights, w.grads)
                                                  if par.zero_stage else {"allreduce": experts.size * w.grads})
    if par.tp > 1:
        replicated = sum(stop - start for name, (start, stop) in layout.offsets.items()
                         if tp_lib.kind(name) == "replicated") if sp else 0
        want = tp_lib.comm_formula(gpt_cfg, b, e, sp, blocks, first, last, M, replicated,
                                   settles=M if par.zero_stage > 1 else 1,   # ZeRO-2/3 settle every micro-batch
                                   recompute=recompute, seq_len=T, grad_itemsize=w.grads,
                                   mixture=bool(gpt_cfg.n_experts))
        out["tp"] = {kind: nbytes for kind, (_, nbytes) in want.items()}
    out["cp"] = cp_lib.comm_formula(gpt_cfg, b, e, par.cp, par.tp, blocks, M, recompute, par.cp_mode)
    if par.pp > 1:
        out["pp"] = pipe.p2p_formula(gpt_cfg, batch_size // par.dp, stage, par.pp, w.activations,
                                     T // par.tp if sp else T, V)
        out["pp"]["bcast"] = 8
        if first or last:
            out["ends"] = {"allreduce": int(np.prod(layout.shapes["wte"])) * w.grads}
    if par.dp * par.cp > 1:                                   # the gradient's sum, over dp x cp
        if par.zero_stage:
            out["dp"] = {**zero_lib.comm_formula(par.zero_stage, layout, M, w.weights, w.grads),
                         "allreduce": 8}                      # + the loss
        else:
            buckets = dp_lib.buckets(layout, par.bucket_mb * 2 ** 20, w.grads)
            want = dp_lib.comm_formula(par.dp_mode, layout, len(buckets), w.grads)
            out["dp"] = {kind: nbytes for kind, (_, nbytes) in want.items()}
    return out
