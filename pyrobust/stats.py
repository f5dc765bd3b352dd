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


def z_value(confidence: float) -> float:
    """Two-sided normal quantile for ``confidence``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def paired_difference_interval(both: int, only_first: int, only_second: int, neither: int,
                               confidence: float = 0.95) -> tuple[float, float, float]:
    """Difference p1 - p2 of two proportions measured on the same items, with Newcombe's hybrid score interval
    for paired data (Newcombe 1998, Statistics in Medicine 17:2635, method 10).

    ``both``: items counted by both measures; ``only_first`` / ``only_second``: by one only; ``neither``.
    Returns (difference, lower, upper).
    """
    a, b, c, d = both, only_first, only_second, neither
    n = a + b + c + d
    if n == 0:
        return (0.0, -1.0, 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, confidence)
    l2, u2 = wilson_interval(a + c, n, confidence)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    dl2 = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du2 = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return (diff, max(-1.0, diff - math.sqrt(max(dl2, 0.0))), min(1.0, diff + math.sqrt(max(du2, 0.0))))


def images_to_settle(p_hat: float, threshold: float, confidence: float) -> float:
    """Roughly how many images make a Wald interval around ``p_hat`` narrow enough to clear ``threshold``."""
    gap = abs(p_hat - threshold)
    if gap == 0:
        return math.inf
    var = max(p_hat * (1 - p_hat), 1e-4)
    return z_value(confidence) ** 2 * var / gap**2


def look_schedule(total: int, *, first: int | None = None, growth: float = 1.5) -> list[int]:
    """Sample sizes at which a sequential test looks: geometric from ``first`` (default: 2.5 % of the images, at
    least 100) to ``total``, which is always the last look."""
    if total < 1:
        raise ValueError("total must be >= 1")
    n = min(total, first if first is not None else max(100, math.ceil(total * 0.025)))
    looks = []
    while n < total:
        looks.append(int(n))
        n = max(n + 1, math.ceil(n * growth))
    looks.append(int(total))
    return looks
