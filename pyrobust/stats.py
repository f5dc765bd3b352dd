"""Small statistics used by the summaries: Wilson score intervals and the survival curve."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from pyrobust.types import ROBUST


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if trials <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}]; got {successes}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; floating-point rounding would leave ~1e-17.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return (lo, hi)


def survival_curve(first_failure: np.ndarray, max_steps: int) -> np.ndarray:
    """Fraction of all images not yet fooled after each step 0..max_steps (step 0: the accuracy)."""
    n = first_failure.shape[0]
    if n == 0:
        return np.zeros(max_steps + 1)
    fooled_at = np.bincount(first_failure[first_failure != ROBUST], minlength=max_steps + 1)[: max_steps + 1]
    return 1.0 - np.cumsum(fooled_at) / n
