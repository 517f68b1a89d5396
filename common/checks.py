"""The comparison table every verify.py prints: one row per tensor (or per group of tensors, naming the worst),
then `PASS: ...` or `FAIL: ...`."""
import math

import numpy as np


def difference(got, want):
    """(shape of want, max|got - want|, max|got - want| / max|want|); infinite when either is missing (None) or
    the shapes differ, and when `want` is all zeros and `got` is not."""
    if got is None or want is None:
        return np.shape(want), math.inf, math.inf
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return want.shape, math.inf, math.inf
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    scale = float(np.abs(want).max()) if want.size else 0.0
    return want.shape, diff, diff / scale if scale else (math.inf if diff else 0.0)


def severity(rel, digits=3):
    """How wrong a relative difference is, to `digits` significant digits: two layouts that compute the same
    wrong value differ in their last bits, and which of them is named first must not depend on the machine's
    floating-point kernels. NaN is as wrong as a difference gets."""
    return math.inf if math.isnan(rel) else float(f"{rel:.{digits - 1}e}")


def named(**parts):
    """Several {name: tensor} as one, each name after its part's: named(m=m_views, v=v_views)["m h.0.ln_1.w"]."""
    return {f"{part} {name}": tensor for part, tensors in parts.items() for name, tensor in tensors.items()}


class Report:
    """Compares tensors against a reference; relative difference is max|got - want| / max|want| per tensor.
    `width` is that of the name column, `detail` that of the next (a shape, or the worst tensor of a group)."""

    def __init__(self, tol, width=32, detail=14):
        self.tol, self.width, self.detail = tol, width, detail
        self.rows = []                                   # (name, ok) of every tensor compared, in order
        self.tols = []                                   # ... and the tolerance each was held to
        self.found = []                                  # (relative difference, compare_tensors' name or None)

    def _add(self, name, rel, tensor=None, tol=None):
        tol = self.tol if tol is None else tol
        ok = rel <= tol
        self.rows.append((name, ok))
        self.tols.append(tol)
        self.found.append((severity(rel), tensor))
        return ok

    def _print(self, name, detail, diff, rel, ok):
        print(f"{name:<{self.width}} {detail:<{self.detail}} max|Δ| {diff:9.2e}  rel {rel:9.2e}  "
              f"{'ok' if ok else 'FAIL'}")

    def compare(self, name, got, want, verbose=True, tol=None):
        """One row: `got` against `want`, as one tensor (within `tol`, if given, instead of the report's)."""
        shape, diff, rel = difference(got, want)
        ok = self._add(name.strip(), rel, tol=tol)
        if verbose:
            self._print(name, str(shape), diff, rel, ok)
        return ok

    def compare_tensors(self, label, got, want, verbose=True, group=None, tol=None):
        """Compare `got` and `want` ({name: array}) tensor by tensor: one row per tensor, `label name`, or given
        `group`, one row `label group` naming its worst tensor. Each tensor counts in the verdict as
        `label name`; one missing from either side fails."""
        names = list(want) + [name for name in got if name not in want]
        if not names:                                    # an empty comparison must not pass unnoticed
            what = f"{label} {group}" if group else label
            self._add(f"{what.strip()} (no tensors)", math.inf)
            if verbose:
                print(f"{what} (no tensors)  FAIL")
            return False
        measured = {name: difference(got.get(name), want.get(name)) for name in names}
        ok = all([self._add(f"{label.strip()} {name}", rel, name, tol) for name, (_, _, rel) in measured.items()])
        if verbose and group is None:
            for name, (shape, diff, rel) in measured.items():
                self._print(f"{label} {name}", str(shape), diff, rel, rel <= (self.tol if tol is None else tol))
        elif verbose:
            worst = max(measured, key=lambda name: severity(measured[name][2]))
            self._print(f"{label} {group}", f"worst {worst}", *measured[worst][1:], ok)
        return ok

    def finish(self, label="", verbose=True):
        """Print the verdict line (after `label`, on the rank that prints): how many tensors were compared, or
        which exceed the tolerance. Returns the process exit code (0 only if every tensor passed), on every rank."""
        failed = [i for i, (_, ok) in enumerate(self.rows) if not ok]
        other = sum(tol != self.tol for tol in self.tols)            # rows in 16-bit precision: their own
        if not self.rows:
            verdict = "FAIL: nothing was compared"
        elif failed:
            verdict = (f"FAIL: {len(failed)} of {len(self.rows)} tensors exceed {self.tol:g}: {self.culprits(failed)}"
                       + (" (16-bit rows: their derived tolerance)" if other else ""))
        else:
            verdict = f"PASS: {len(self.rows)} tensors within {self.tol:g}" + (
                f" ({other} in 16-bit precision within their derived tolerance)" if other else "")
        if verbose:
            print(label + verdict)
        return 0 if self.rows and not failed else 1

    def culprits(self, failed, shown=5):
        """Up to `shown` names of the failed entries, the ones to read first: compare_tensors' tensors worst first,
        each name once (a wrong gradient spoils every later step, but its own tensor stays the worst), then the
        rest; equal severities in the order of their names, so the same failure reads the same on any machine."""
        names, seen = [], set()
        for i in sorted(failed, key=lambda i: (self.found[i][1] is None, -self.found[i][0], self.rows[i][0])):
            tensor = self.found[i][1]
            if len(names) < shown and (tensor is None or tensor not in seen):
                names.append(self.rows[i][0])
                seen.add(tensor)
        more = len(failed) - len(names)
        return ", ".join(names) + (f", and {more} more" if more else "")
