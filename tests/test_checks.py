"""The comparison every verify.py prints its verdict from."""
import math

import numpy as np

from common.checks import Report, difference


def test_difference_is_relative_to_the_largest_reference_value():
    assert difference(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == ((2,), 0.5, 0.25)


def test_a_reference_of_zeros_is_matched_only_by_zeros():
    # rank-vs-rank spreads are compared against 0: any spread is an infinite relative difference, none is 0
    assert difference(np.zeros(3), np.zeros(3))[2] == 0.0
    assert difference(np.array([0.0, 1e-12]), np.zeros(2))[1:] == (1e-12, math.inf)


def test_missing_misshapen_and_nan_tensors_fail():
    report = Report(tol=1e-10)
    assert not report.compare("missing", None, np.ones(2), verbose=False)
    assert not report.compare("shape", np.ones(3), np.ones(2), verbose=False)
    assert not report.compare("nan", np.array([np.nan]), np.ones(1), verbose=False)
    assert report.compare("equal", np.ones(2), np.ones(2), verbose=False)
    assert [ok for _, ok in report.rows] == [False, False, False, True]
