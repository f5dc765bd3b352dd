"""Coverage of the per-image failure-probability intervals and of the survival bands, over the grid users stand on.

* Per image, exact: every outcome of the protocol enumerated with its probability (geometric first-failure step
  censored at the budget; binomial failure counts), for p from 0 to 0.2 and budgets 50 to 3,000: the smallest
  coverage over the p grid, which must be at least the stated 95 %.
* Familywise: sets of 10 to 10,000 images (a third never failing, the rest with p up to 0.2), each image's one-
  sided bound at 95 %/n, 2,000 simulated sets: the share in which every image of the set is covered.
* Survival bands: 2,000 simulated test sets of 10 to 10,000 images, robust fractions 0.3 to 0.9: the share in which
  the simultaneous (DKW) band holds the whole true curve.

Run: ``python -m pytest benchmarks/test_bench_intervals.py`` (about a minute); writes ``last_intervals.json`` and
``last_intervals.md`` (the table in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from pyrobust.stats import failure_interval, survival_bands
from pyrobust.types import ROBUST
from tests.test_intervals import BUDGETS, _geometric_outcomes, _geometric_probabilities, _survival_truth

P_GRID = np.concatenate([[0.0], np.geomspace(1e-5, 0.2, 60)])
ROWS: list[dict] = []
HERE = Path(__file__).parent
REPS = 2000


@pytest.mark.parametrize("n_steps", BUDGETS)
@pytest.mark.parametrize("method", ["first-failure, two-sided", "first-failure, upper", "counts, two-sided",
                                    "counts, upper"])
def test_exact_coverage(method, n_steps):
    side = "upper" if method.endswith("upper") else "two"
    if method.startswith("first"):
        t = _geometric_outcomes(n_steps)
        lo, hi = failure_interval(t, None, n_steps, 0.95, side=side)
        weights = [_geometric_probabilities(p, n_steps) for p in P_GRID]
    else:
        f = np.arange(n_steps + 1)
        lo, hi = failure_interval(np.where(f > 0, 1, ROBUST), f, n_steps, 0.95, side=side)
        weights = [binom.pmf(f, n_steps, p) for p in P_GRID]
    cover = np.array([float(w[(lo <= p) & (p <= hi)].sum()) for p, w in zip(P_GRID, weights, strict=True)])
    ROWS.append({"what": f"per image, {method}", "condition": f"budget {n_steps}, p in [0, 0.2]",
                 "coverage_min": float(cover.min()), "coverage_mean": float(cover.mean()),
                 "p_at_min": float(P_GRID[int(cover.argmin())]), "how": "exact"})
    assert cover.min() >= 0.95 - 1e-9


@pytest.mark.parametrize("images", [10, 100, 1000, 10_000])
def test_familywise_coverage(images):
    rng = np.random.default_rng(images)
    n_steps = 250
    p = np.where(rng.random(images) < 1 / 3, 0.0, rng.uniform(0, 0.2, images) ** 2 / 0.2)
    hits = 0
    for _ in range(REPS):
        t = np.where(p > 0, rng.geometric(np.maximum(p, 1e-12)), n_steps + 1)
        _, up = failure_interval(np.where(t <= n_steps, t, ROBUST), None, n_steps, 1 - 0.05 / images, side="upper")
        hits += bool(np.all(p <= up))
    ROWS.append({"what": "every image of a set, one-sided, Bonferroni", "condition": f"{images:,} images, budget 250",
                 "coverage_min": hits / REPS, "coverage_mean": hits / REPS, "how": f"simulated, {REPS} sets"})
    assert hits / REPS >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / REPS)


@pytest.mark.parametrize("images", [10, 100, 1000, 10_000])
@pytest.mark.parametrize("robust_share", [0.3, 0.6, 0.9])
def test_band_coverage(images, robust_share):
    rng = np.random.default_rng(images * 10 + int(robust_share * 10))
    n_steps = 250
    rates = rng.uniform(0.002, 0.2, 4000)
    truth = _survival_truth(rates, robust_share, n_steps)
    hits = 0
    for _ in range(REPS):
        robust = rng.random(images) < robust_share
        t = rng.geometric(rates[rng.integers(0, rates.size, images)])
        b = survival_bands(np.where(robust | (t > n_steps), ROBUST, t), n_steps)
        lo, hi = np.array(b["simultaneous"]["lower"]), np.array(b["simultaneous"]["upper"])
        hits += bool(np.all((lo <= truth + 1e-12) & (truth <= hi + 1e-12)))
    ROWS.append({"what": "survival curve, simultaneous (DKW) band", "condition": f"{images:,} images, "
                 f"{robust_share:.0%} robust, 250 steps", "coverage_min": hits / REPS, "coverage_mean": hits / REPS,
                 "how": f"simulated, {REPS} sets"})
    assert hits / REPS >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / REPS)


def test_write_table():
    (HERE / "last_intervals.json").write_text(json.dumps(ROWS, indent=1) + "\n")
    lines = ["| interval | condition | coverage (min over p) | how |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['condition']} | {r['coverage_min']:.2%} | {r['how']} |" for r in ROWS]
    (HERE / "last_intervals.md").write_text("\n".join(lines) + "\n")
    assert ROWS
