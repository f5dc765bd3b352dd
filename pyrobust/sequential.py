"""The gate's decision rule, free of models and files: checks decided look by look from counts.

Everything here works on arrays of counts with one entry per *replicate*, so the same code decides one real gate
(one replicate) and thousands of simulated ones (``tests/gate/test_gate_errors.py`` measures its error rates that way).

**One check.** A minimum (``min_accuracy``, ``min_robust``, ``min_class_robust[k]``) is decided with exact
Clopper-Pearson bounds on the fraction; a drop against a baseline (``max_robust_drop``, ``max_accuracy_drop``) with
:func:`~pyrobust.stats.paired_drop_bounds`, exact bounds on the two discordant cells combined by square-and-add. At
a look spending error ``a``, the check *passes* when the bound on the good side clears the threshold at one-sided
level ``a/2`` and *fails* when the bound on the other side lies beyond it (at ``a/2``, or less under a family rule).
So each check's chance of a wrong pass, and of a wrong fail, is at most ``a/2`` per look.

**Looks.** Checks that need noise are decided at sample sizes fixed in advance (:func:`~pyrobust.stats.look_schedule`).
The error ``alpha = 1 - confidence`` is spent over the looks, equally (Bonferroni) or O'Brien-Fleming-like (Lan-DeMets
spending ``2 - 2 Phi(z / sqrt(t))``: little at the first looks, most at the last); either way the per-look errors add
up to ``alpha``, so by the union bound a wrong verdict at *any* look, whatever look the gate stops at, has chance at
most ``alpha/2`` per side. A decided check keeps its verdict. Accuracy checks need no noise and are decided once on
the clean pass of every image.

**Several checks.** A wrong fail of any check fails the gate, so with many checks (ten per-class checks) wrong fails
add up. ``family="holm"`` (the default) runs Holm's step-down over the fail decisions of the checks still open at a
look, which keeps the chance of *any* wrong fail at most ``alpha/2`` across checks; ``"bonferroni"`` divides by their
number; ``"none"`` controls each check alone. With a family rule the error is split between the clean-pass stage
and the noise stage in proportion to their checks. Wrong passes need no correction: the gate passes only when every
check passes, so a gate with one truly bad check passes wrongly at most as often as that check does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pyrobust.stats import clopper_pearson, normal_quantile, paired_drop_bounds

KINDS = ("min_accuracy", "min_robust", "min_class_robust", "min_robust_at", "max_robust_drop", "max_accuracy_drop")
NOISE_KINDS = ("min_robust", "min_class_robust", "min_robust_at", "max_robust_drop")
FAMILIES = ("holm", "bonferroni", "none")
SPENDING = ("equal", "obrien-fleming")
PASS, FAIL, OPEN = 1, -1, 0
MIN_ALPHA = 1e-12  # a look spending less decides nothing (its bounds are shown at this level)


@dataclass(frozen=True)
class CheckSpec:
    name: str
    kind: str
    threshold: float

    @property
    def is_drop(self) -> bool:
        return self.kind.startswith("max_")

    @property
    def needs_noise(self) -> bool:
        return self.kind in NOISE_KINDS


def random_order(seed: int, n: int) -> np.ndarray:
    """The fixed random order in which sequential runs (the gate, ``evaluate(precision=...)``) take images."""
    return np.random.default_rng([seed, 0x6A7E]).permutation(n)


def look_alphas(looks: list[int], alpha: float, spending: str = "equal") -> np.ndarray:
    """Two-sided error spent at each look; the entries add up to ``alpha``."""
    if spending not in SPENDING:
        raise ValueError(f"spending must be one of {', '.join(SPENDING)}; got {spending!r}")
    k = len(looks)
    if spending == "equal" or k == 1:
        return np.full(k, alpha / k)
    t = np.asarray(looks, np.float64) / looks[-1]
    z = normal_quantile(1 - alpha / 2)
    cum = np.array([2 - 2 * _phi(z / math.sqrt(ti)) for ti in t])
    cum[-1] = alpha
    return np.diff(np.concatenate([[0.0], cum]))


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def bounds(spec: CheckSpec, counts: tuple, alpha_side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, lower, upper) of a check from its counts: ``(successes, n)`` for a minimum, ``(lost, gained, n)``
    for a drop."""
    if spec.is_drop:
        lost, gained, n = counts
        return paired_drop_bounds(lost, gained, n, alpha_side)
    x, n = counts
    lo, hi = clopper_pearson(x, n, alpha_side)
    return np.asarray(x, np.float64) / np.maximum(np.asarray(n, np.float64), 1), lo, hi


def _passes(spec: CheckSpec, lo, hi) -> np.ndarray:
    return hi <= spec.threshold if spec.is_drop else lo >= spec.threshold


def _fails(spec: CheckSpec, lo, hi) -> np.ndarray:
    return lo > spec.threshold if spec.is_drop else hi < spec.threshold


def _n(spec: CheckSpec, counts: tuple) -> np.ndarray:
    return np.asarray(counts[-1])


class SequentialDecision:
    """Verdicts of a set of checks over one stage's looks, for ``replicates`` gates at once.

    Call :meth:`look` with each look's counts in order; ``verdict`` (replicates x checks; PASS, FAIL or OPEN),
    ``decided_at`` (the look index, -1 while open) and the value/bounds at decision time are kept per check.
    ``stopped`` says which replicates have nothing left to learn (a check failed, or all are decided): a gate
    stops there when early stop is on.
    """

    def __init__(self, specs: list[CheckSpec], alphas: np.ndarray, *, family: str = "holm", replicates: int = 1):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
        self.specs = specs
        self.alphas = np.asarray(alphas, np.float64)
        self.family = family
        m = len(specs)
        self.verdict = np.zeros((replicates, m), np.int8)
        self.decided_at = np.full((replicates, m), -1, np.int64)
        self.value = np.zeros((replicates, m))
        self.lower = np.zeros((replicates, m))
        self.upper = np.zeros((replicates, m))
        self.n = np.zeros((replicates, m), np.int64)
        self.looks_done = 0

    @property
    def stopped(self) -> np.ndarray:
        if not self.specs:
            return np.ones(self.verdict.shape[0], np.bool_)
        return (self.verdict == FAIL).any(axis=1) | (self.verdict != OPEN).all(axis=1)

    def look(self, counts: list[tuple], *, active: np.ndarray | None = None) -> None:
        """Decide at the next look. ``counts[j]`` holds check j's count arrays (one entry per replicate);
        ``active`` masks the replicates that are still running (the others keep their state)."""
        k = self.looks_done
        if k >= self.alphas.size:
            raise ValueError("no looks left")
        self.looks_done += 1
        alpha = self.alphas[k]
        reps = self.verdict.shape[0]
        running = np.ones(reps, np.bool_) if active is None else np.asarray(active, np.bool_)
        if alpha < MIN_ALPHA:  # O'Brien-Fleming spends (almost) nothing at the first looks: no decision there
            alpha = MIN_ALPHA
            decide_nothing = True
        else:
            decide_nothing = False
        open_ = (self.verdict == OPEN) & running[:, None]
        m_open = open_.sum(axis=1)  # the family at this look: the checks still open
        if self.family == "bonferroni":
            fail_side = alpha / 2 / np.maximum(m_open, 1)
        else:
            fail_side = np.full(reps, alpha / 2)
        side = alpha / 2
        new_pass = np.zeros_like(open_)
        values, los, his = [], [], []
        for j, spec in enumerate(self.specs):
            v, lo, hi = bounds(spec, counts[j], side)
            values.append(np.broadcast_to(v, reps))
            los.append(np.broadcast_to(lo, reps))
            his.append(np.broadcast_to(hi, reps))
            new_pass[:, j] = _passes(spec, lo, hi) & open_[:, j]
        if self.family == "holm":
            new_fail = self._holm_fails(counts, open_, alpha)
        else:
            new_fail = np.zeros_like(open_)
            for j, spec in enumerate(self.specs):
                _, lo, hi = bounds(spec, counts[j], fail_side)
                new_fail[:, j] = _fails(spec, lo, hi) & open_[:, j]
        if decide_nothing:
            new_pass[:], new_fail[:] = False, False
        decided = new_pass | new_fail
        self.verdict[new_pass] = PASS
        self.verdict[new_fail] = FAIL
        self.decided_at[decided] = k
        for j, spec in enumerate(self.specs):
            # An open check shows its latest bounds; a decided one keeps those it was decided with.
            show = open_[:, j]
            self.value[show, j] = values[j][show]
            self.lower[show, j] = los[j][show]
            self.upper[show, j] = his[j][show]
            self.n[show, j] = np.broadcast_to(_n(spec, counts[j]), reps)[show]

    def _holm_fails(self, counts, open_, alpha) -> np.ndarray:
        """Holm's step-down over the fail decisions of the open checks: reject at level alpha/2/(m - r) with r
        already rejected, until a round rejects nothing (the same rejections as sorting p-values)."""
        rejected = np.zeros_like(open_)
        while True:
            left = (open_ & ~rejected).sum(axis=1)
            level = alpha / 2 / np.maximum(left, 1)
            new = np.zeros_like(open_)
            for j, spec in enumerate(self.specs):
                cand = open_[:, j] & ~rejected[:, j]
                if not cand.any():
                    continue
                _, lo, hi = bounds(spec, counts[j], level)
                new[:, j] = _fails(spec, lo, hi) & cand
            if not new.any():
                return rejected
            rejected |= new


def stage_alphas(specs: list[CheckSpec], alpha: float, family: str) -> tuple[float, float]:
    """Error for the clean-pass stage and for the noise stage: each gets ``alpha`` when checks are controlled one
    by one; a family rule splits ``alpha`` between the stages in proportion to their checks."""
    clean = sum(not s.needs_noise for s in specs)
    noise = len(specs) - clean
    if family == "none" or not specs:
        return alpha, alpha
    return alpha * clean / len(specs), alpha * noise / len(specs)


def precision_bounds(hits, n, alpha_side) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For ``evaluate(precision=...)``: (fraction, lower, upper, half-width) of a fraction at one look, where the
    half-width is the larger distance from the estimate to a bound (Clopper-Pearson intervals are not symmetric)."""
    hits = np.asarray(hits, np.float64)
    n = np.asarray(n, np.float64)
    p = hits / np.maximum(n, 1)
    lo, hi = clopper_pearson(hits, n, alpha_side)
    return p, lo, hi, np.maximum(p - lo, hi - p)

