"""`threshold_at_fpr` against a brute-force search over every candidate threshold.

The reference does not reason about ranks at all: it tries each distinct score and the float just
above it, and keeps the lowest threshold whose measured false-positive rate does not exceed the
target. Rounding mistakes in the rank arithmetic (floor vs ceil, a missing epsilon, flagging a
tied score) change which candidate wins.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from patchcore.evaluation import metrics


def _brute_force_threshold(scores: list[float], fpr: float) -> float:
    """Lowest candidate threshold t with #(scores >= t) / n <= fpr, compared exactly."""
    s = np.asarray(scores, dtype=np.float64)
    target = Fraction(fpr).limit_denominator(10**6)  # 0.29 means 29/100, not its binary value
    candidates = sorted(set(s.tolist()) | {float(np.nextafter(v, np.inf)) for v in s})
    for t in candidates:
        if Fraction(int((s >= t).sum()), s.size) <= target:
            return t
    raise AssertionError("the float above the largest score always flags nothing")


CASES = [
    ([1, 2, 3, 4, 5, 6, 7], 0.3),  # 2.1 allowed -> 2
    ([1, 2, 3, 4, 5, 6, 7], 0.1),  # 0.7 allowed -> 0
    ([7, 1, 5, 3, 2, 6, 4], 0.5),  # unsorted, 3.5 allowed -> 3
    ([1, 2, 3, 3, 3, 4], 0.5),  # ties straddle the cut: only the 4 may be flagged
    ([1, 2, 3, 3, 3, 4], 0.67),  # 4.02 allowed: the three 3s and the 4
    ([5, 5, 5, 5], 0.5),  # all tied: nothing can be flagged below 100 %
    ([5, 5, 5, 5], 1.0),  # everything may be flagged: the lowest score
    ([0.1, 0.4, 0.35, 0.8, 0.2], 0.0),  # nothing flagged: just above the maximum
    ([-3.0, -1.0, -2.0], 2 / 3),  # negative scores, fpr * n == 2 up to rounding
]


@pytest.mark.parametrize("scores,fpr", CASES)
def test_threshold_at_fpr_equals_brute_force(scores: list[float], fpr: float) -> None:
    thr = metrics.threshold_at_fpr(scores, fpr)
    assert thr == _brute_force_threshold(scores, fpr)
    flagged = int((np.asarray(scores, dtype=np.float64) >= thr).sum())
    assert flagged <= fpr * len(scores) + 1e-12


def test_threshold_at_fpr_rounds_the_allowed_count_down_not_up() -> None:
    scores = list(range(1, 11))  # 10 scores
    # 0.25 * 10 = 2.5 false positives allowed -> 2 flagged (8 would be 30 %, too many)
    assert int((np.asarray(scores) >= metrics.threshold_at_fpr(scores, 0.25)).sum()) == 2
    # 0.29 * 100 is 28.999999999999996 in floats: 29 must still be allowed
    hundred = np.arange(100, dtype=np.float64)
    assert int((hundred >= metrics.threshold_at_fpr(hundred, 0.29)).sum()) == 29
    # 0.7 * 10 is 7.000000000000001 in floats: 7, never 8
    assert int((np.asarray(scores) >= metrics.threshold_at_fpr(scores, 0.7)).sum()) == 7


def test_threshold_at_fpr_on_random_scores_with_ties() -> None:
    rng = np.random.default_rng(0)
    for n in (3, 7, 13, 50):
        scores = rng.integers(0, 6, n).astype(np.float64).tolist()  # many ties
        for fpr in (0.0, 0.05, 0.1, 0.33, 0.5, 0.9, 1.0):
            assert metrics.threshold_at_fpr(scores, fpr) == _brute_force_threshold(scores, fpr)
