"""Per-image failure probabilities: exact intervals, the step budget from a target, and the survival bands, each
checked where users stand (p from 0 to 0.2, budgets 50 to 3,000, sets of 10 to 10,000 images, zero failures) by
exact enumeration and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from pyrobust.stats import (
    failure_interval,
    failure_probability,
    steps_for_bound,
    survival_bands,
    survival_curve,
)
from pyrobust.types import ROBUST

P_GRID = [0.0, 1e-4, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
BUDGETS = [50, 250, 1000, 3000]


def _geometric_outcomes(n_steps: int):
    """Every outcome of the first-failure protocol: fooled at 1..N, or robust (censored at N)."""
    return np.concatenate([np.arange(1, n_steps + 1), [ROBUST]])


def _geometric_probabilities(p: float, n_steps: int) -> np.ndarray:
    t = np.arange(1, n_steps + 1)
    return np.concatenate([(1 - p) ** (t - 1) * p, [(1 - p) ** n_steps]])


def test_the_issues_numbers():
    lo, hi = failure_interval(np.array([38]), None, 250)
    assert (round(lo[0], 4), round(hi[0], 3)) == (0.0007, 0.095)  # [0.07 %, 9.5 %]
    _, up = failure_interval(np.array([ROBUST]), None, 250, side="upper")
    assert round(up[0], 4) == 0.0119  # 0 failures in 250: p <= 1.19 % at 95 %
    assert steps_for_bound(0.01) == 299 and steps_for_bound(0.01, images=100) == 757
    assert 0.998**250 == pytest.approx(0.606, abs=1e-3)  # p = 0.002 survives 250 steps 61 % of the time


@pytest.mark.parametrize("n_steps", BUDGETS)
@pytest.mark.parametrize("side", ["two", "upper"])
def test_first_failure_intervals_cover_exactly(n_steps, side):
    """Exact coverage (every outcome enumerated with its probability) of the geometric interval is at least the
    stated 95 % for every p on the grid and every budget; the two-sided one also misses at most 2.5 % per side."""
    t = _geometric_outcomes(n_steps)
    lo, hi = failure_interval(t, None, n_steps, 0.95, side=side)
    for p in P_GRID:
        w = _geometric_probabilities(p, n_steps)
        assert w.sum() == pytest.approx(1.0)
        covered = float(w[(lo <= p) & (p <= hi)].sum())
        assert covered >= 0.95 - 1e-12, (p, covered)
        if side == "two":
            assert float(w[lo > p].sum()) <= 0.025 + 1e-12 and float(w[hi < p].sum()) <= 0.025 + 1e-12


@pytest.mark.parametrize("n_steps", BUDGETS)
def test_count_intervals_cover_exactly(n_steps):
    """Clopper-Pearson on failures / probes: exact binomial coverage >= 95 % on the grid, zero failures included."""
    f = np.arange(n_steps + 1)
    ff = np.where(f > 0, 1, ROBUST)  # the first-failure step only says whether there was one
    lo, hi = failure_interval(ff, f, n_steps, 0.95)
    _, up = failure_interval(ff, f, n_steps, 0.95, side="upper")
    for p in P_GRID:
        w = binom.pmf(f, n_steps, p)
        assert float(w[(lo <= p) & (p <= hi)].sum()) >= 0.95 - 1e-9, p
        assert float(w[p <= up].sum()) >= 0.95 - 1e-9, p


@pytest.mark.parametrize("p,n_steps", [(0.002, 250), (0.02, 50), (0.1, 3000), (0.0, 250)])
def test_first_failure_intervals_cover_in_simulation(p, n_steps):
    """The same by simulation of the protocol's outcome: 20,000 images with failure probability p."""
    rng = np.random.default_rng(int(p * 1e6) + n_steps)
    t = rng.geometric(p, 20_000) if p > 0 else np.full(20_000, n_steps + 1)
    ff = np.where(t <= n_steps, t, ROBUST)
    lo, hi = failure_interval(ff, None, n_steps)
    cover = float(np.mean((lo <= p) & (p <= hi)))
    assert cover >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / 20_000), cover


@pytest.mark.parametrize("images", [10, 1000, 10_000])
def test_familywise_bounds_hold_for_the_whole_set(images):
    """Sets of 10 to 10,000 images (a third never failing, the rest with p up to 0.2), each image's one-sided bound
    at 95 %/n (Bonferroni): in at least 95 % of 400 simulated sets every image is covered (the simulation error
    allows 93 %)."""
    rng = np.random.default_rng(images)
    n_steps = 250
    p = np.where(rng.random(images) < 1 / 3, 0.0, rng.uniform(0, 0.2, images) ** 2 / 0.2)
    level = 1 - 0.05 / images
    hits = 0
    for _ in range(400):
        t = np.where(p > 0, rng.geometric(np.maximum(p, 1e-12)), n_steps + 1)
        ff = np.where(t <= n_steps, t, ROBUST)
        _, up = failure_interval(ff, None, n_steps, level, side="upper")
        hits += bool(np.all(p <= up))
    assert hits / 400 >= 0.93, hits / 400


def test_a_budget_from_a_target_is_the_smallest_that_shows_it():
    for q in (0.001, 0.005, 0.01, 0.05, 0.2):
        for conf in (0.9, 0.95, 0.99):
            for images in (1, 10, 100, 10_000):
                n = steps_for_bound(q, conf, images)
                a = (1 - conf) / images
                assert (1 - q) ** n <= a < (1 - q) ** (n - 1), (q, conf, images, n)
                _, up = failure_interval(np.array([ROBUST]), None, n, 1 - a, side="upper")
                assert up[0] <= q + 1e-12
    for bad, match in ((dict(max_failure_prob=0), "max_failure_prob"), (dict(max_failure_prob=1), "max_failure_prob"),
                       (dict(max_failure_prob=0.1, images=0), "images"),
                       (dict(max_failure_prob=0.1, confidence=1), "confidence")):
        with pytest.raises(ValueError, match=match):
            steps_for_bound(**bad)


def test_point_estimates():
    ff = np.array([0, ROBUST, 1, 4, 10])
    assert np.allclose(failure_probability(ff, None, 10), [np.nan, 0, 1, 0.25, 0.1], equal_nan=True)
    assert np.allclose(failure_probability(ff, np.array([0, 0, 5, 2, 1]), 10), [np.nan, 0, 0.5, 0.2, 0.1],
                       equal_nan=True)
    lo, hi = failure_interval(ff, None, 10)
    assert np.isnan(lo[0]) and np.isnan(hi[0]) and hi[2] == 1.0
    with pytest.raises(ValueError, match="side must be"):
        failure_interval(ff, None, 10, side="lower")


def _survival_truth(p: np.ndarray, robust_share: float, n_steps: int) -> np.ndarray:
    """The true survival curve of a population: a share never fooled, the rest geometric with rates ``p``."""
    t = np.arange(n_steps + 1)
    return robust_share + (1 - robust_share) * np.mean((1 - p[:, None]) ** t[None], axis=0)


@pytest.mark.parametrize("images", [10, 100, 1000])
@pytest.mark.parametrize("robust_share", [0.3, 0.9])
def test_survival_bands_cover(images, robust_share):
    """The DKW band holds the whole true curve, and the pointwise band each step's value, in at least 95 % of
    400 simulated test sets (the simulation error allows 93 %)."""
    rng = np.random.default_rng(images + int(robust_share * 10))
    n_steps = 100
    rates = rng.uniform(0.005, 0.2, 2000)
    truth = _survival_truth(rates, robust_share, n_steps)
    whole, at = 0, np.zeros(3)
    checks = [1, 10, 100]
    for _ in range(400):
        robust = rng.random(images) < robust_share
        t = rng.geometric(rates[rng.integers(0, rates.size, images)])
        ff = np.where(robust | (t > n_steps), ROBUST, t)
        b = survival_bands(ff, n_steps)
        lo, hi = np.array(b["simultaneous"]["lower"]), np.array(b["simultaneous"]["upper"])
        whole += bool(np.all((lo[1:] <= truth[1:] + 1e-12) & (truth[1:] <= hi[1:] + 1e-12)))
        plo, phi = np.array(b["pointwise"]["lower"]), np.array(b["pointwise"]["upper"])
        at += [(plo[s] <= truth[s] <= phi[s]) for s in checks]
        assert np.all(plo <= survival_curve(ff, n_steps)) and np.all(survival_curve(ff, n_steps) <= phi)
    assert whole / 400 >= 0.93, whole / 400
    assert np.all(at / 400 >= 0.93), at / 400
