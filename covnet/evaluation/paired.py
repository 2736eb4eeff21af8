"""Is model A better than model B on the same cases? Paired differences with a bootstrap confidence interval
and the Wilcoxon signed-rank test.

Both models must have scored the same cases (the same references, split and plan): the comparison is over the
per-case differences ``a - b``, which removes the between-case spread (a hard case is hard for both). Cases
where either score is undefined (``None``/NaN, e.g. Dice of an empty reference against an empty prediction)
are left out, and the count of pairs used is reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import wilcoxon

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    pairs: int
    mean_difference: float                 # mean of a - b
    ci_low: float                          # bootstrap percentile interval of the mean difference
    ci_high: float
    p_value: float                         # two-sided Wilcoxon signed-rank test of the differences
    a_better: int                          # pairs where a > b
    b_better: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def describe(self, precision: int = 3) -> str:
        return (f"{self.mean_difference:+.{precision}f} [{self.ci_low:+.{precision}f}, {self.ci_high:+.{precision}f}]"
                f", p={self.p_value:.2g}, n={self.pairs}")


def _defined(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], *, seed: int = 0,
                      resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> PairedDifference:
    """Compare per-case scores ``a[i]`` and ``b[i]`` of the same cases."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same cases: {len(a)} vs {len(b)} values")
    kept = [(float(x), float(y)) for x, y in zip(a, b) if _defined(x) and _defined(y)]
    if not kept:
        nan = float("nan")
        return PairedDifference(0, nan, nan, nan, nan, 0, 0)
    differences = np.array([x - y for x, y in kept])
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(resamples, len(differences)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    p_value = float("nan") if np.all(differences == 0) else float(wilcoxon(differences).pvalue)
    return PairedDifference(len(kept), float(differences.mean()), float(low), float(high), p_value,
                            int((differences > 0).sum()), int((differences < 0).sum()))


def gap_closed(arm: float, base: float, oracle: float) -> float:
    """Share of the base-to-oracle gap that ``arm`` closes (1: as good as the oracle). NaN without a gap to
    close: an oracle no better than the base (its ceiling is then no ceiling)."""
    gap = oracle - base
    return float("nan") if not math.isfinite(gap) or gap < 1e-12 else (arm - base) / gap
