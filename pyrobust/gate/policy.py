"""The gate's policy and its checks: :class:`GatePolicy` (thresholds, confidence, error control), the checks it
plans for a dataset (:func:`plan_gate`), the counts behind each check, the records a decision produces
(:class:`Check`, :class:`GateResult`) and the overall verdict (:func:`decide`). No models run here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

from pyrobust.errors import InvalidInput
from pyrobust.machine import versions
from pyrobust.sequential import (
    FAIL,
    FAMILIES,
    PASS,
    SPENDING,
    CheckSpec,
    SequentialDecision,
    look_alphas,
    stage_alphas,
)
from pyrobust.stats import images_for_power, look_schedule, normal_quantile
from pyrobust.validate import Choice, Constraint, Fraction, Number, check_fields, declare

GATE_SCHEMA = 3  # 3: the noise settings have their own block in settings, as in summary.json
POWER_MARGIN, POWER = 0.01, 0.8  # the power statement in gate.json: a model 1 point better, 80 % power
VERDICT = {PASS: "pass", FAIL: "fail", 0: "inconclusive"}


_THRESHOLD = Fraction(none=True, hint="(e.g. 0.85 or 85%)")
POLICY_CONSTRAINTS: dict[str, Constraint] = {
    "min_accuracy": _THRESHOLD, "min_robust": _THRESHOLD, "min_class_robust": _THRESHOLD,
    "max_robust_drop": _THRESHOLD, "max_accuracy_drop": _THRESHOLD,
    "confidence": Number(0.5, 1, hi_open=True, hint="(e.g. 0.95)"),
    "inconclusive": Choice(("fail", "pass")),
    "family": Choice(FAMILIES),
    "spending": Choice(SPENDING),
}


@dataclass(frozen=True)
class GatePolicy:
    min_accuracy: float | None = None
    min_robust: float | None = None
    min_class_robust: float | None = None
    max_robust_drop: float | None = None
    max_accuracy_drop: float | None = None
    confidence: float = 0.95
    inconclusive: str = "fail"  # what an inconclusive check means for the exit code: fail or pass
    early_stop: bool = True
    family: str = "holm"  # error control of fail verdicts across checks: holm, bonferroni or none
    spending: str = "equal"  # how the error is spent over the looks: equal or obrien-fleming

    THRESHOLDS = ("min_accuracy", "min_robust", "min_class_robust", "max_robust_drop", "max_accuracy_drop")

    def __post_init__(self) -> None:
        check_fields(self, POLICY_CONSTRAINTS)
        if all(getattr(self, n) is None for n in self.THRESHOLDS):
            raise InvalidInput("the gate has nothing to check: give min_accuracy, min_robust, min_class_robust, "
                               "or a baseline with max_robust_drop / max_accuracy_drop")

    @property
    def needs_baseline(self) -> bool:
        return self.max_robust_drop is not None or self.max_accuracy_drop is not None

    @property
    def alpha(self) -> float:
        return 1 - self.confidence


declare("GatePolicy", POLICY_CONSTRAINTS, lambda **kw: GatePolicy(**{"min_robust": 0.5, **kw}))


@dataclass
class Check:
    name: str
    kind: str
    threshold: float
    value: float
    interval: tuple[float, float]
    verdict: str
    n: int
    confidence: float  # two-sided confidence of ``interval`` (the level of the look that decided it, or the last)
    stage: str  # clean (decided on the clean pass) or noise
    message: str = ""
    images_to_settle: int | None = None
    power: dict | None = None


@dataclass
class GateResult:
    decision: str  # pass, fail or inconclusive
    passed: bool  # the decision under the inconclusive policy
    checks: list[Check]
    images: int
    images_evaluated: int  # images that ran the noise protocol
    looks: list[dict]
    inferences: int
    inferences_full_estimate: int | None
    stopped_early: bool
    stop_reason: str
    nonfinite: dict
    warnings: list[str]
    policy: GatePolicy
    candidate: dict
    baseline: dict | None
    dataset: dict
    settings: dict

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        full = self.inferences_full_estimate
        return {
            "schema_version": GATE_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "decision": self.decision, "passed": self.passed, "exit_code": self.exit_code,
            "policy": asdict(self.policy),
            "checks": [check_json(c) for c in self.checks],
            "images": self.images, "images_evaluated": self.images_evaluated, "looks": self.looks,
            "inferences": self.inferences,
            "work": {"stopped_early": self.stopped_early, "stop_reason": self.stop_reason,
                     "inferences": self.inferences, "inferences_full_estimate": full,
                     "inferences_saved": None if full is None else max(0, full - self.inferences),
                     "share_of_full": None if not full else self.inferences / full},
            "nonfinite_outputs": self.nonfinite, "warnings": self.warnings,
            "candidate": self.candidate, "baseline": self.baseline, "dataset": self.dataset,
            "settings": self.settings, "versions": versions(),
        }


def check_json(c: Check) -> dict:
    """A check as JSON: a check that never ran (the gate failed before its stage) has null numbers, not NaN."""
    d = asdict(c)
    for key in ("value", "confidence"):
        if isinstance(d[key], float) and math.isnan(d[key]):
            d[key] = None
    if any(isinstance(v, float) and math.isnan(v) for v in d["interval"]):
        d["interval"] = None
    return d


# ------------------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class GatePlan:
    """Which checks run where, and the error each look spends."""

    clean: list[CheckSpec]  # decided once, on the clean pass of every image
    noise: list[CheckSpec]  # decided look by look on the noise protocol
    clean_alpha: float
    noise_looks: list[int]
    noise_alphas: np.ndarray

    @property
    def specs(self) -> list[CheckSpec]:
        return self.clean + self.noise


def plan_gate(policy: GatePolicy, total: int, classes, *, baseline: bool = True) -> GatePlan:
    """``classes``: the number of classes, or the labels that occur (one ``min_class_robust`` check each)."""
    if isinstance(classes, (int, np.integer)):
        classes = range(int(classes))
    specs = []
    if policy.min_accuracy is not None:
        specs.append(CheckSpec("min_accuracy", "min_accuracy", policy.min_accuracy))
    if policy.max_accuracy_drop is not None and baseline:
        specs.append(CheckSpec("max_accuracy_drop", "max_accuracy_drop", policy.max_accuracy_drop))
    if policy.min_robust is not None:
        specs.append(CheckSpec("min_robust", "min_robust", policy.min_robust))
    if policy.min_class_robust is not None:
        specs += [CheckSpec(f"min_class_robust[{int(k)}]", "min_class_robust", policy.min_class_robust)
                  for k in classes]
    if policy.max_robust_drop is not None and baseline:
        specs.append(CheckSpec("max_robust_drop", "max_robust_drop", policy.max_robust_drop))
    clean_alpha, noise_alpha = stage_alphas(specs, policy.alpha, policy.family)
    looks = look_schedule(total) if policy.early_stop else [total]
    return GatePlan(clean=[s for s in specs if not s.needs_noise], noise=[s for s in specs if s.needs_noise],
                    clean_alpha=clean_alpha, noise_looks=looks,
                    noise_alphas=look_alphas(looks, noise_alpha, policy.spending))


def check_counts(spec: CheckSpec, *, labels: np.ndarray, cand: np.ndarray, base: np.ndarray | None) -> tuple:
    """The counts a check is decided from. ``cand``/``base``: per-image flags (correct for accuracy checks, robust
    for robustness checks) on the images seen so far."""
    if spec.is_drop:
        if base is None:
            raise InvalidInput(f"{spec.name} compares with a baseline; none was given")
        lost = int(np.count_nonzero(base & ~cand))
        gained = int(np.count_nonzero(~base & cand))
        return (lost, gained, int(cand.size))
    if spec.kind == "min_class_robust":
        k = int(spec.name[spec.name.index("[") + 1:-1])
        sel = labels == k
        return (int(np.count_nonzero(cand[sel])), int(np.count_nonzero(sel)))
    return (int(np.count_nonzero(cand)), int(cand.size))


def checks_from(decision: SequentialDecision, specs: list[CheckSpec], alphas: np.ndarray, stage: str,
                 counts: list[tuple], total: int) -> list[Check]:
    out = []
    last_alpha = float(alphas[decision.looks_done - 1])
    for j, spec in enumerate(specs):
        verdict = VERDICT[int(decision.verdict[0, j])]
        at = int(decision.decided_at[0, j])
        alpha = float(alphas[at]) if at >= 0 else last_alpha
        c = Check(spec.name, spec.kind, spec.threshold, float(decision.value[0, j]),
                  (float(decision.lower[0, j]), float(decision.upper[0, j])), verdict, int(decision.n[0, j]),
                  confidence=1 - alpha, stage=stage)
        c.message = _message(c, counts[j])
        variance = _variance(spec, c, counts[j])
        if verdict == "inconclusive":
            gap = abs(c.value - spec.threshold)
            need = math.inf if gap == 0 else normal_quantile(1 - last_alpha / 2) ** 2 * variance / gap**2
            c.images_to_settle = _settle_count(need, c.n, total, c)
        need = images_for_power(variance, POWER_MARGIN, last_alpha / 2, POWER)
        c.power = {"margin": POWER_MARGIN, "power": POWER, "images": math.ceil(need)}
        good = "above" if not spec.is_drop else "below"
        c.power["message"] = (f"to pass a model {POWER_MARGIN:.0%} {good} the threshold with {POWER:.0%} power, "
                              f"about {math.ceil(need):,} images are needed")
        out.append(c)
    return out


def _variance(spec: CheckSpec, c: Check, counts: tuple) -> float:
    if spec.is_drop:
        lost, gained, n = counts
        return max((lost + gained) / max(n, 1) - c.value**2, 1e-4)
    p = min(max(spec.threshold + POWER_MARGIN, 0.0), 1.0)
    return max(p * (1 - p), 1e-4)


def _message(c: Check, counts: tuple) -> str:
    lo, hi = c.interval
    if c.kind.startswith("max_"):
        lost, gained, n = counts
        what = "robust fraction" if c.kind == "max_robust_drop" else "accuracy"
        return (f"{c.name}: {what} drop {c.value:+.2%} ({lost} images lost, {gained} gained of {n}, paired), "
                f"{c.confidence:.2%} interval [{lo:+.2%}, {hi:+.2%}], threshold <= {c.threshold:+.2%}: {c.verdict}")
    x, n = counts if c.verdict == "inconclusive" else (round(c.value * c.n), c.n)
    what = c.kind.removeprefix("min_").replace("_", " ")
    return (f"{c.name}: {what} {c.value:.2%} ({x}/{n}), {c.confidence:.2%} interval [{lo:.2%}, {hi:.2%}], "
            f"threshold >= {c.threshold:.2%}: {c.verdict}")


def _settle_count(need: float, n: int, total: int, c: Check) -> int | None:
    if not math.isfinite(need):
        c.message += " (the estimate sits on the threshold: no number of images settles it)"
        return None
    more = max(0, math.ceil(need) - n)
    c.message += f"; about {more} more images would settle it"
    if n + more > total:
        left = total - n
        c.message += f" (the dataset has {'no' if left == 0 else left} more)"
    return more


def decide(checks: list[Check]) -> str:
    verdicts = {c.verdict for c in checks}
    return "fail" if "fail" in verdicts else "inconclusive" if "inconclusive" in verdicts else "pass"
