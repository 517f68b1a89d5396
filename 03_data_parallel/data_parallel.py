"""Data parallelism: every rank holds the whole model and computes gradients on its own rows of the batch.

The math. The loss is a mean over the B*T positions of the global batch. Split the B rows into N ranks of
M micro-batches each, all of equal size b = B/(N M); then L = 1/(N M) sum_{r,k} L_{r,k}, where L_{r,k} is the
mean loss of rank r's micro-batch k, and so is the gradient. Each micro-batch's backward therefore runs with
dloss = 1/(N M), gradients accumulate with += over the M micro-batches, and one all-reduce (a sum) after the
last one leaves every rank with exactly the single-core gradient, so identical AdamW steps keep the replicas
identical. (Averaging per-rank means is only right because every micro-batch has the same size; scaling by
1/M on each rank and forgetting the 1/N, or averaging only the last micro-batch, both train - wrongly.)

How the gradient is all-reduced (--dp-mode):
    naive       one all-reduce per parameter tensor, after the backward                     52 calls by default
    bucketed    contiguous slices of the flat gradient of ~bucket_mb, after the backward    fewer, larger calls
    overlapped  the same buckets, each started (Iallreduce) as soon as the backward has finished all of
                its tensors - the last layers first - and waited on before the optimizer step

Communication per step and rank: Psi elements of gradient (e bytes each), whatever the mode; a ring
all-reduce sends and receives 2 Psi e (N - 1)/N of them. Plus one 8-byte all-reduce of the loss for the log.

GradSync.record() makes the next step keep its timeline: when each part of the forward and backward ran and
each all-reduce ran (blocking) or was started and completed (overlapped), the overlap made visible.
"""
import contextlib

import numpy as np

from common.network import now


# ----------------------------------------------------------------------------- shard (the batch, not the model)

def micro_batch_rows(batch_size, dp, grad_accum, rank, micro):
    """Rows of the global batch that rank `rank` uses for its micro-batch `micro`."""
    size = batch_size // (dp * grad_accum)
    start = (rank * grad_accum + micro) * size
    return slice(start, start + size)


# ----------------------------------------------------------------------------- synchronise gradients

def buckets(layout, bucket_bytes, itemsize):
    """[start, stop) slices of the flat gradient, filled from its end (where the backward starts), each closed
    once it holds bucket_bytes; a tensor is never split."""
    out, stop = [], layout.size
    for name in reversed(list(layout.offsets)):
        start = layout.offsets[name][0]
        if (stop - start) * itemsize >= bucket_bytes:
            out.append((start, stop))
            stop = start
    if stop > 0:
        out.append((0, stop))
    return out


class GradSync:
    """All-reduces the flat gradient `grads` over `dp` in one of the three modes, then steps the replica.

    The protocol chapter 04's ZeRO implements too: zero_grad(); the model runs each part inside
    forward_hook/backward_hook (here only timed, when recording); each backward that communicates gets `ready`
    as its hook (see common.driver.stage_backward) and is followed by finish(), which completes the sum (only the
    last micro-batch's here: `every_microbatch` is False); step() clips by the global norm and updates. `gshard`
    is the gradient this rank updates from: for a replica, all of it."""
    every_microbatch = False

    def __init__(self, mode, layout, grads, dp, bucket_mb, params=None):
        self.mode, self.layout, self.grads, self.dp, self.params = mode, layout, grads, dp, params
        self.gshard = grads
        self.buckets = buckets(layout, bucket_mb * 2 ** 20, grads.itemsize)
        self.requests, self.launched = [], 0
        self.trace, self.t0 = None, 0.0             # see record()

    def record(self):
        """Keep a timeline from now on in `trace`: (op, name, start, end), seconds from now. op is forward or
        backward (name: the part), allreduce (name: the tensor, naive, or the bucket's index) or iallreduce
        (launched, and completed: when the network model says the sum arrives, else when its wait returned)."""
        self.trace, self.t0 = [], now()

    def _note(self, op, name, start, end=None):
        if self.trace is not None:
            self.trace.append((op, name, start - self.t0, (now() if end is None else end) - self.t0))

    def _timed(self, op, name):
        """A context whose span goes into the trace as (op, name) while recording; costs nothing otherwise."""
        return contextlib.nullcontext() if self.trace is None else self._span(op, name)

    @contextlib.contextmanager
    def _span(self, op, name):
        start = now()
        yield
        self._note(op, name, start)

    def zero_grad(self):
        self.grads.fill(0)

    def forward_hook(self, part):
        return self._timed("forward", part)         # every replica holds every weight: nothing to gather

    def backward_hook(self, part):
        return self._timed("backward", part)

    def ready(self, name):
        if self.mode == "overlapped":
            self._launch_from(self.layout.offsets[name][0])    # every gradient from here to the end is final

    def _launch_from(self, done):
        while self.launched < len(self.buckets) and self.buckets[self.launched][0] >= done:
            start, stop = self.buckets[self.launched]
            self.requests.append((now(), self.dp.iallreduce(self.grads[start:stop])))
            self.launched += 1

    def finish(self):
        if self.mode == "overlapped":
            self._launch_from(0)                          # what the backward's hook has not launched yet
            for i, (launched, request) in enumerate(self.requests):
                request.Wait()
                # the model knows when the sum arrived, maybe long before this wait; MPI only that it has
                self._note("iallreduce", i, launched, request.when() if hasattr(request, "when") else None)
        else:
            pieces = self.layout.offsets.items() if self.mode == "naive" else enumerate(self.buckets)
            for name, (start, stop) in pieces:
                with self._timed("allreduce", name):
                    self.dp.allreduce(self.grads[start:stop])
        self.requests, self.launched = [], 0

    def step(self, opt, lr, grad_clip, norm_of=None):
        """Clip by the global norm, norm_of(gradient) (default: this replica's, the same on every rank), and
        update (in mixed precision: from the gradient unscaled to float32, see common.precision)."""
        g = opt.unscaled(self.grads)
        opt.update(self.params, g, lr, grad_clip, norm_of(g) if norm_of else None)


def comm_formula(mode, layout, n_buckets, itemsize):
    """{kind: (calls, bytes)} of one step on each rank: the whole gradient once, in the mode's pieces, plus the
    8-byte all-reduce of the loss for the log."""
    grad = layout.size * itemsize
    pieces = {"naive": len(layout.offsets), "bucketed": n_buckets, "overlapped": n_buckets}[mode]
    if mode == "overlapped":
        return {"iallreduce": (pieces, grad), "allreduce": (1, 8)}
    return {"allreduce": (pieces + 1, grad + 8)}


def mean_over_replicas(batches, dp, loss_of):
    """The mean of loss_of(x, y) over `batches`, each replica taking its 1/N of every batch's rows, as in
    training (every rank runs as many forwards, which ZeRO-3's gathers need). loss_of may give None where no
    loss is seen (a pipeline stage before the last): the caller then takes the loss from the rank that has it."""
    size = len(batches[0][0]) // dp.size
    rows = slice(dp.rank * size, (dp.rank + 1) * size)
    losses = [loss_of(x[rows], y[rows]) for x, y in batches]
    total = dp.allreduce(np.array([sum(loss or 0.0 for loss in losses)], dtype=np.float64))
    return float(total[0] / (dp.size * len(batches)))


def check_replicas(params, dp, step):
    """Raise unless every data-parallel rank holds bit-identical parameters: replicas that drift apart still
    train, so a missing all-reduce would otherwise go unnoticed."""
    if not dp.identical(params):
        raise RuntimeError(f"data-parallel replicas differ after step {step}: a gradient was not all-reduced")
