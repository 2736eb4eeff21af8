"""Paired comparison of two models on the same cases: effect, interval, test, undefined pairs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from covnet.evaluation.paired import gap_closed, paired_difference


def test_a_consistent_small_gain_is_seen_despite_a_large_case_spread():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.2, 0.9, 60)                      # cases differ far more than the models do
    b = difficulty + rng.normal(0, 0.01, 60)
    a = b + 0.03 + rng.normal(0, 0.01, 60)
    result = paired_difference(list(a), list(b))
    assert result.pairs == 60 and result.mean_difference == pytest.approx(0.03, abs=0.005)
    assert 0 < result.ci_low < 0.03 < result.ci_high < 0.06 and result.excludes_zero
    assert result.p_value < 1e-6 and result.a_better > 55


def test_no_difference_keeps_zero_in_the_interval():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.2, 0.9, 40)
    a = b + rng.normal(0, 0.05, 40)
    result = paired_difference(list(a), list(b))
    assert result.ci_low < 0 < result.ci_high and not result.excludes_zero and result.p_value > 0.05


def test_undefined_scores_drop_their_pair():
    result = paired_difference([0.5, None, float("nan"), 0.7, 0.9], [0.4, 0.3, 0.2, 0.6, None])
    assert result.pairs == 2 and result.mean_difference == pytest.approx(0.1)
    empty = paired_difference([None], [0.5])
    assert empty.pairs == 0 and math.isnan(empty.mean_difference)
    with pytest.raises(ValueError, match="same cases"):
        paired_difference([0.1], [0.1, 0.2])


def test_gap_closed():
    assert gap_closed(0.7, base=0.6, oracle=0.8) == pytest.approx(0.5)
    assert gap_closed(0.55, base=0.6, oracle=0.8) == pytest.approx(-0.25)
    assert math.isnan(gap_closed(0.7, base=0.6, oracle=0.6))
    assert math.isnan(gap_closed(0.0, base=0.55, oracle=0.0))      # an oracle below the base sets no ceiling
