"""Small statistics used by the summaries and the gate.

* Wilson score intervals describe a measured fraction (summaries, reports).
* Clopper-Pearson bounds and :func:`paired_drop_bounds` back the gate's decisions: they are exact (conservative)
  for every sample size and every count, zero included, which the asymptotic intervals are not.
* Newcombe's square-and-add interval describes a paired difference (``compare`` and the study reports).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from perturbcore import ROBUST


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


def paired_difference_interval(both: int, only_first: int, only_second: int, neither: int,
                               confidence: float = 0.95) -> tuple[float, float, float]:
    """Difference p1 - p2 of two proportions measured on the same items, with Newcombe's hybrid score interval
    for paired data (Newcombe 1998, Statistics in Medicine 17:2635, method 10).

    The correlation term is the phi coefficient with the continuity adjustment Newcombe specifies and the
    Fagerland-Lydersen-Laake reference implementation applies (Fagerland, Lydersen & Laake 2014, Stat Methods Med
    Res 24:224, "Newcombe square-and-add"): with ``A = both*neither - only_first*only_second`` and ``N`` items,
    ``A`` is replaced by ``A - N/2`` when ``A > N/2``, by 0 when ``0 <= A <= N/2``, and kept when negative.
    For their Cavo table (59, 6, 16, 80) this gives -0.1186 to -0.0046 (pinned in the tests).

    This interval describes a difference; it is asymptotic and can be too narrow with few discordant items, so the
    gate decides with :func:`paired_drop_bounds` instead.

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
    cross: float = a * d - b * c
    cross = cross - n / 2 if cross > n / 2 else 0.0 if cross >= 0 else cross
    phi = cross / math.sqrt(denom) if denom > 0 else 0.0
    diff = p1 - p2
    dl2 = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du2 = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return (diff, max(-1.0, diff - math.sqrt(max(dl2, 0.0))), min(1.0, diff + math.sqrt(max(du2, 0.0))))


def clopper_pearson(successes, trials, alpha_side) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) bounds for a binomial proportion, vectorised over arrays.

    ``alpha_side`` is the error allowed on *each* side: ``P(p < lower) <= alpha_side`` and ``P(p > upper) <=
    alpha_side`` for every true ``p`` and every sample size (the bounds invert the binomial tails, so they never
    undercover; a count of 0 or ``trials`` gives the exact bound ``1 - alpha_side**(1/trials)``). With no trials the
    bounds are (0, 1).
    """
    from scipy.special import betaincinv

    x = np.asarray(successes, np.float64)
    n = np.asarray(trials, np.float64)
    a = np.asarray(alpha_side, np.float64)
    if np.any((a <= 0) | (a >= 0.5)):
        raise ValueError(f"alpha_side must be in (0, 0.5); got {alpha_side}")
    if np.any((x < 0) | (x > n)):
        raise ValueError("successes must be in [0, trials]")
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(x > 0, betaincinv(np.maximum(x, 1), np.maximum(n - x + 1, 1), a), 0.0)
        hi = np.where(x < n, betaincinv(x + 1, np.maximum(n - x, 1), 1 - a), 1.0)
    empty = n <= 0
    return np.where(empty, 0.0, lo), np.where(empty, 1.0, hi)


def paired_drop_bounds(lost, gained, trials, alpha_side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paired drop ``d = (lost - gained) / trials`` with bounds built from exact bounds on the two discordant
    cells, vectorised over arrays.

    ``lost``: items the first measure counts and the second does not (baseline robust, candidate not); ``gained``:
    the reverse. The bounds are a MOVER (Zou & Donner 2008, Stat Med 27:1693; Newcombe 2013, ch. 7): each cell gets
    its Clopper-Pearson bounds at ``alpha_side``, and they are combined by square-and-add with the multinomial
    correlation of the two cells, ``rho = -sqrt(p_l p_g / ((1 - p_l)(1 - p_g)))``. With no discordant items at all
    the upper bound is the exact bound of the lost cell, ``1 - alpha_side**(1/trials)`` (about 2.4 % for 250 items
    at ``alpha_side`` 0.25 %), where asymptotic paired intervals shrink to zero width. The one-sided error of this
    rule is checked by simulation in ``tests/gate/test_gate_errors.py`` and ``benchmarks/test_bench_gate_errors.py``.

    Returns (drop, lower, upper).
    """
    b = np.asarray(lost, np.float64)
    c = np.asarray(gained, np.float64)
    n = np.asarray(trials, np.float64)
    safe_n = np.maximum(n, 1)
    pb, pc = b / safe_n, c / safe_n
    lb, ub = clopper_pearson(b, n, alpha_side)
    lc, uc = clopper_pearson(c, n, alpha_side)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = -np.sqrt(np.where((pb < 1) & (pc < 1), pb * pc / ((1 - pb) * (1 - pc)), 0.0))
    d = pb - pc
    up_b, down_c = ub - pb, pc - lc
    down_b, up_c = pb - lb, uc - pc
    upper = d + np.sqrt(np.maximum(up_b**2 + down_c**2 - 2 * rho * up_b * down_c, 0.0))
    lower = d - np.sqrt(np.maximum(down_b**2 + up_c**2 - 2 * rho * down_b * up_c, 0.0))
    empty = n <= 0
    return (np.where(empty, 0.0, d), np.where(empty, -1.0, np.maximum(lower, -1.0)),
            np.where(empty, 1.0, np.minimum(upper, 1.0)))


def normal_quantile(p: float) -> float:
    return NormalDist().inv_cdf(p)


def images_for_power(variance: float, margin: float, alpha_side: float, power: float = 0.8) -> float:
    """Images a one-sided test at ``alpha_side`` needs to reach ``power`` when the truth is ``margin`` away from
    the threshold, for a per-image variance ``variance`` (normal approximation)."""
    if margin <= 0:
        return math.inf
    z = normal_quantile(1 - alpha_side) + normal_quantile(power)
    return z * z * max(variance, 1e-4) / margin**2


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


# ---------------------------------------------------------------------------------- per-image failure probability
def _alpha(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    return 1 - confidence


def failure_probability(first_failure, failures, max_steps: int) -> np.ndarray:
    """Each image's estimated per-step failure probability p̂ (float64; NaN for an image wrong before any noise).

    With failure counts (``failures`` not None): failing steps / ``max_steps`` probes. Without: the maximum-
    likelihood estimate of a geometric first-failure step, 1 / step for an image fooled at ``step``, and 0 for an
    image never fooled in ``max_steps`` (censored: only its bound says how small p is)."""
    ff = np.asarray(first_failure)
    out = np.full(ff.shape, np.nan)
    if failures is not None:
        f = np.asarray(failures, np.float64)
        ok = ff != 0
        out[ok] = f[ok] / max_steps
        return out
    fooled = ff > 0
    out[fooled] = 1.0 / ff[fooled]
    out[ff == ROBUST] = 0.0
    return out


def failure_interval(first_failure, failures, max_steps: int, confidence: float = 0.95,
                     side: str = "two") -> tuple[np.ndarray, np.ndarray]:
    """Exact bounds on each image's per-step failure probability p (float64 arrays; NaN for an image wrong before
    any noise), for every p and every budget (they never undercover):

    * with failure counts: Clopper-Pearson on failures / ``max_steps``;
    * without: the first-failure step T is geometric, censored at ``max_steps``, and P(T <= t) = 1 - (1 - p)^t
      is monotone in p, so inverting its two tails gives the exact interval: for an image fooled at step t,
      [1 - (1 - a)^(1/t), 1 - a^(1/(t-1))] (upper bound 1 at t = 1); for an image never fooled, [0, 1 - a^(1/N)].

    ``side="two"``: a two-sided interval at ``confidence`` (a = (1 - confidence) / 2 on each side);
    ``side="upper"``: the one-sided upper bound at ``confidence`` (a = 1 - confidence; the lower bound is 0): the
    claim "p <= bound at 95 %" (1.19 % for 0 failures in 250 steps)."""
    if side not in ("two", "upper"):
        raise ValueError(f"side must be 'two' or 'upper'; got {side!r}")
    a = _alpha(confidence) / (2 if side == "two" else 1)
    ff = np.asarray(first_failure)
    lo = np.full(ff.shape, np.nan)
    hi = np.full(ff.shape, np.nan)
    ok = ff != 0
    if failures is not None:
        f = np.asarray(failures)[ok]
        clo, chi = clopper_pearson(f, np.full(f.shape, max_steps), a)
        lo[ok], hi[ok] = clo, chi
    else:
        fooled = ff > 0
        t = ff[fooled].astype(np.float64)
        lo[fooled] = -np.expm1(np.log1p(-a) / t)
        with np.errstate(divide="ignore"):
            hi[fooled] = np.where(t > 1, -np.expm1(np.log(a) / np.maximum(t - 1, 1)), 1.0)
        robust = ff == ROBUST
        lo[robust] = 0.0
        hi[robust] = -math.expm1(math.log(a) / max_steps)
    if side == "upper":
        lo[ok] = 0.0
    return lo, hi


def steps_for_bound(max_failure_prob: float, confidence: float = 0.95, images: int = 1) -> int:
    """The step budget N at which an image never fooled has p <= ``max_failure_prob`` at ``confidence``:
    the smallest N with (1 - q)^N <= a, where a = 1 - confidence, or a / ``images`` for a claim on every image of a
    fixed set at once (Bonferroni; Holm's first step is the same). 299 for 1 % at 95 %; 757 for each of 100
    images."""
    if not 0 < max_failure_prob < 1:
        raise ValueError(f"max_failure_prob must be in (0, 1); got {max_failure_prob}")
    if images < 1:
        raise ValueError(f"images must be >= 1; got {images}")
    a = _alpha(confidence) / images
    n = math.log(a) / math.log1p(-max_failure_prob)
    steps = math.ceil(n - 1e-9)
    while (1 - max_failure_prob) ** steps > a:  # rounding at the boundary
        steps += 1
    return max(1, steps)


def robust_at(first_failure, steps: int) -> np.ndarray:
    """Images correctly classified and not fooled within the first ``steps`` steps."""
    ff = np.asarray(first_failure)
    return (ff == ROBUST) | (ff > steps)


def survival_bands(first_failure, max_steps: int, confidence: float = 0.95) -> dict:
    """The survival curve (share of all images not fooled after each step 0..max_steps) with two bands
    (:func:`curve_bands`)."""
    ff = np.asarray(first_failure)
    return curve_bands(survival_curve(ff, max_steps), ff.shape[0], confidence)


def curve_bands(fraction, n: int, confidence: float = 0.95) -> dict:
    """Two bands around a survival curve of ``n`` images (``fraction``: its value after each step):

    * ``pointwise``: Clopper-Pearson at each step (each step's share covers at ``confidence`` on its own);
    * ``simultaneous``: the Dvoretzky-Kiefer-Wolfowitz band, ± sqrt(ln(2 / a) / (2 n)) (Massart's constant),
      which covers the whole curve at once at ``confidence`` for any n and any distribution of failure steps.
    """
    a = _alpha(confidence)
    curve = np.asarray(fraction, np.float64)
    if n <= 0:
        ones, zeros = [1.0] * curve.size, [0.0] * curve.size
        return {"confidence": confidence, "pointwise": {"lower": zeros, "upper": ones, "method": "clopper-pearson"},
                "simultaneous": {"lower": zeros, "upper": ones, "half_width": 1.0, "method": "dkw"}}
    counts = np.rint(curve * n)
    lo, hi = clopper_pearson(counts, np.full(counts.shape, n), a / 2)
    eps = math.sqrt(math.log(2 / a) / (2 * n))
    return {"confidence": confidence,
            "pointwise": {"lower": [float(v) for v in lo], "upper": [float(v) for v in hi],
                          "method": "clopper-pearson"},
            "simultaneous": {"lower": [float(v) for v in np.clip(curve - eps, 0, 1)],
                             "upper": [float(v) for v in np.clip(curve + eps, 0, 1)],
                             "half_width": eps, "method": "dkw"}}


# -------------------------------------------------------------------------------------------- rank statistics
def auc_interval(score, positive, confidence: float = 0.95) -> tuple[float, float, float]:
    """Area under the ROC curve of ``score`` for telling ``positive`` items apart (ties count half), with DeLong's
    variance (DeLong, DeLong & Clarke-Pearson 1988) and a logit-transformed normal interval, which stays in
    [0, 1]. NaN scores are dropped. Returns (auc, lower, upper); NaNs when a class is empty."""
    from scipy.stats import rankdata

    s = np.asarray(score, np.float64)
    y = np.asarray(positive, bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return (math.nan, math.nan, math.nan)
    r_all = rankdata(s)
    r_pos = rankdata(s[y])
    r_neg = rankdata(s[~y])
    auc = float((r_all[y].sum() - m * (m + 1) / 2) / (m * n))
    v10 = (r_all[y] - r_pos) / n  # per positive: share of negatives below it
    v01 = 1 - (r_all[~y] - r_neg) / m  # per negative: share of positives above it
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    z = normal_quantile(1 - _alpha(confidence) / 2)
    clipped = min(max(auc, 0.5 / (m * n)), 1 - 0.5 / (m * n))
    se_logit = math.sqrt(var) / (clipped * (1 - clipped))
    centre = math.log(clipped / (1 - clipped))
    lo, hi = (1 / (1 + math.exp(-(centre + k * z * se_logit))) for k in (-1, 1))
    return (auc, float(lo), float(hi))


def _rank_correlation_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair of ``a`` and ``b`` (midranks for ties)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))


def spearman_interval(x, y, confidence: float = 0.95, resamples: int = 1000) -> tuple[float, float, float]:
    """Spearman's rank correlation of ``x`` and ``y`` (NaN pairs dropped) with an approximate interval: normal on
    Fisher's z scale with the standard error of z over ``resamples`` bootstrap resamples of the pairs (seeded by the
    data, so reproducible). Per-image p̂ are heavily tied (every robust image at 0), where the textbook variances
    (Fieller, Bonett-Wright) undercover (91 % at 95 % in ``tests/test_agreement.py``'s simulation); this one covers
    93-96 % there. Returns (rho, lower, upper); NaNs below 4 pairs or for a constant variable."""
    import zlib

    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 4 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return (math.nan, math.nan, math.nan)
    r = float(_rank_correlation_rows(a[None], b[None])[0])
    rng = np.random.default_rng(zlib.crc32(a.tobytes() + b.tobytes()))
    zs = []
    for lo in range(0, resamples, 100):
        idx = rng.integers(0, a.size, size=(min(100, resamples - lo), a.size))
        rs = _rank_correlation_rows(a[idx], b[idx])
        zs.append(np.arctanh(np.clip(rs[np.isfinite(rs)], -0.999999, 0.999999)))
    z_all = np.concatenate(zs)
    se = float(np.std(z_all, ddof=1)) if z_all.size > 1 else math.inf
    q = normal_quantile(1 - _alpha(confidence) / 2)
    c = math.atanh(min(max(r, -0.999999), 0.999999))
    return (r, math.tanh(c - q * se), math.tanh(c + q * se))


def paired_ratio_difference(num_a, den_a, num_b, den_b, confidence: float = 0.95,
                            resamples: int = 2000) -> tuple[float, float, float]:
    """The change ``sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a)`` of two ratios measured on the same items (for
    robust of correct: robust flags over correct flags of each run), with a paired percentile bootstrap over the
    items (seeded by the data, so reproducible): the denominators differ between the runs and move together, which
    no two-proportion formula captures. Returns (change, lower, upper); NaNs when a denominator is empty."""
    import zlib

    arrays = [np.asarray(v, np.float64) for v in (num_a, den_a, num_b, den_b)]
    na, da, nb, db = arrays
    if da.sum() == 0 or db.sum() == 0:
        return (math.nan, math.nan, math.nan)
    change = float(nb.sum() / db.sum() - na.sum() / da.sum())
    rng = np.random.default_rng(zlib.crc32(b"".join(a.tobytes() for a in arrays)))
    n = na.size
    draws = []
    for lo in range(0, resamples, 200):
        idx = rng.integers(0, n, size=(min(200, resamples - lo), n))
        with np.errstate(invalid="ignore", divide="ignore"):
            d = nb[idx].sum(1) / db[idx].sum(1) - na[idx].sum(1) / da[idx].sum(1)
        draws.append(d[np.isfinite(d)])
    d_all = np.concatenate(draws)
    tail = _alpha(confidence) / 2
    lo_, hi_ = (float(v) for v in np.quantile(d_all, [tail, 1 - tail]))
    return (change, lo_, hi_)
