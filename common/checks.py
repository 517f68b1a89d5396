"""The comparison table every verify.py prints: one row per tensor, then `PASS: ...` or `FAIL: ...`."""
import numpy as np


class Report:
    """Compares tensors against a reference; relative difference is max|got - want| / max|want|."""

    def __init__(self, tol):
        self.tol = tol
        self.rows = []

    def compare(self, name, got, want, verbose=True):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            diff = rel = float("inf")
        else:
            diff = float(np.abs(got - want).max()) if got.size else 0.0
            rel = diff / max(float(np.abs(want).max()) if want.size else 0.0, 1e-300)
        ok = rel <= self.tol
        self.rows.append((name, ok))
        if verbose:
            print(f"{name:<32} {str(want.shape):<14} max|Δ| {diff:9.2e}  rel {rel:9.2e}  {'ok' if ok else 'FAIL'}")
        return ok

    def finish(self, label="", verbose=True):
        """Print the verdict line (after `label`, on the rank that prints); returns the process exit code
        (0 only if every row passed), on every rank."""
        failed = [name for name, ok in self.rows if not ok]
        if not self.rows:
            verdict = "FAIL: nothing was compared"
        elif failed:
            verdict = f"FAIL: {len(failed)} of {len(self.rows)} tensors exceed {self.tol:g}: {', '.join(failed[:5])}"
        else:
            verdict = f"PASS: {len(self.rows)} tensors within {self.tol:g}"
        if verbose:
            print(label + verdict)
        return 0 if self.rows and not failed else 1
