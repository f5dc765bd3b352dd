"""Monte-Carlo simulation of the gate's whole decision logic, vectorised over replicates.

Per-image outcomes are drawn from known cell probabilities (the images between two looks are a multinomial draw,
exactly as if each image were drawn in turn), and every replicate goes through the gate's own plan
(:func:`pyrobust.gate.policy.plan_gate`: stages, looks, error spending, family rule) and its own decision object
(:class:`pyrobust.sequential.SequentialDecision`), stopping where ``run_gate`` stops. Used by
``tests/gate/test_gate_errors.py`` (a small grid, seeded) and ``benchmarks/test_bench_gate_errors.py`` (the full table).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from pyrobust.gate.policy import GatePolicy, plan_gate
from pyrobust.sequential import FAIL, PASS, SequentialDecision


@dataclass(frozen=True)
class Scenario:
    """``kind`` is the one check under test (its threshold comes from the policy). Cells:

    * minimums: ``p`` is the true fraction (accuracy or robust);
    * ``min_class_robust``: class 0 has rate ``p``, the other ``classes - 1`` have ``p + other_gap``;
    * drops: ``base`` is the baseline's rate, ``lost``/``gained`` the shares of images lost / gained.
    """

    kind: str
    n: int
    p: float = 0.0
    base: float = 0.0
    lost: float = 0.0
    gained: float = 0.0
    classes: int = 10
    other_gap: float = 0.15

    def cells(self) -> np.ndarray:
        if self.kind in ("min_robust", "min_accuracy"):
            return np.array([self.p, 1 - self.p])
        if self.kind == "min_class_robust":
            rates = np.array([self.p] + [min(1.0, self.p + self.other_gap)] * (self.classes - 1))
            return np.stack([rates, 1 - rates], axis=1).ravel() / self.classes
        both = self.base - self.lost
        return np.array([both, self.lost, self.gained, 1 - both - self.lost - self.gained])


def _counts(scenario: Scenario, cum: np.ndarray, n: int) -> list[tuple]:
    if scenario.kind in ("min_robust", "min_accuracy"):
        return [(cum[:, 0], np.full(cum.shape[0], n))]
    if scenario.kind == "min_class_robust":
        per = cum.reshape(cum.shape[0], scenario.classes, 2)
        return [(per[:, k, 0], per[:, k].sum(axis=1)) for k in range(scenario.classes)]
    return [(cum[:, 1], cum[:, 2], np.full(cum.shape[0], n))]


def simulate(policy: GatePolicy, scenario: Scenario, *, replicates: int, seed: int) -> dict:
    """Pass / fail / inconclusive rates of the check under test (the first check of class 0 for per-class), the
    gate's pass rate, and the mean number of images used by the stage that decides it."""
    rng = np.random.default_rng(seed)
    plan = plan_gate(policy, scenario.n, scenario.classes)
    clean = scenario.kind in ("min_accuracy", "max_accuracy_drop")
    specs = plan.clean if clean else plan.noise
    looks = [scenario.n] if clean else plan.noise_looks
    alphas = np.array([plan.clean_alpha]) if clean else plan.noise_alphas
    if [s.kind for s in plan.specs] != [s.kind for s in specs]:
        raise ValueError("simulate one kind of check at a time")
    decision = SequentialDecision(specs, alphas, family=policy.family, replicates=replicates)
    p = scenario.cells()
    cum = np.zeros((replicates, p.size), np.int64)
    used = np.zeros(replicates, np.int64)
    done = 0
    for n in looks:
        active = ~decision.stopped if policy.early_stop else np.ones(replicates, np.bool_)
        if decision.looks_done and not active.any():
            break
        cum += rng.multinomial(n - done, p, size=replicates) * active[:, None]
        used[active] = n
        done = n
        # Stopped replicates do not draw more images: their counts stay as they were, and ``active`` keeps their
        # verdicts frozen, exactly as run_gate stops evaluating.
        decision.look(_counts(scenario, cum, n), active=active)
    v = decision.verdict[:, 0]
    gate_pass = (decision.verdict == PASS).all(axis=1)
    return {"pass": float(np.mean(v == PASS)), "fail": float(np.mean(v == FAIL)),
            "inconclusive": float(np.mean(v == 0)), "gate_pass": float(np.mean(gate_pass)),
            "any_fail": float(np.mean((decision.verdict == FAIL).any(axis=1))),
            "images": float(used.mean()), "replicates": replicates}


def mc_bound(nominal: float, replicates: int) -> float:
    """Nominal rate plus three Monte-Carlo standard errors."""
    return nominal + 3 * np.sqrt(nominal * (1 - nominal) / replicates)


def scenario_seed(*key) -> int:
    """A seed from the scenario's description (crc32: Python's own hash of strings changes from run to run)."""
    return zlib.crc32(repr(key).encode())
