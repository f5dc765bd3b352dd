"""The gate's policy and its checks: :class:`GatePolicy` (thresholds, confidence, error control), the checks it
plans for a dataset (:func:`plan_gate`), the counts behind each check, the records a decision produces
(:class:`Check`, :class:`GateResult`) and the overall verdict (:func:`decide`). No models run here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from perturbcore.families import Family, parse
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
from pyrobust.stats import images_for_power, look_schedule
from pyrobust.validate import Choice, Constraint, Fraction, Integer, Number, check_fields, declare

# 3: the noise settings have their own block in settings, as in summary.json; 4: checks under more noise families
# (``conditions``)
GATE_SCHEMA = 4
POWER_MARGIN, POWER = 0.01, 0.8  # the power statement in gate.json: a model 1 point better, 80 % power
VERDICT = {PASS: "pass", FAIL: "fail", 0: "inconclusive"}


_THRESHOLD = Fraction(none=True, hint="(e.g. 0.85 or 85%)")
ROBUST_OF = ("all", "correct")
POLICY_CONSTRAINTS: dict[str, Constraint] = {
    "min_accuracy": _THRESHOLD, "min_robust": _THRESHOLD, "min_class_robust": _THRESHOLD,
    "max_robust_drop": _THRESHOLD, "max_accuracy_drop": _THRESHOLD,
    "max_failure_prob": Number(0, 0.5, lo_open=True, hi_open=True, none=True, kind="a probability",
                               hint="(e.g. 0.01 or 1%)"),
    "max_fragile": Integer(0),
    "robust_of": Choice(ROBUST_OF, hint="(all: share of all images; correct: of the correctly classified ones)"),
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
    # robust fractions at several budgets from one run: ((steps, minimum), ...), e.g. ((10, 0.95), (250, 0.8))
    min_robust_at: tuple[tuple[int, float], ...] | None = None
    # the denominator of min_robust, min_class_robust and min_robust_at: all images, or the correctly classified
    robust_of: str = "all"
    # a golden set: at most max_fragile images may have a per-step failure probability above max_failure_prob
    max_failure_prob: float | None = None
    max_fragile: int = 0

    THRESHOLDS = ("min_accuracy", "min_robust", "min_class_robust", "max_robust_drop", "max_accuracy_drop",
                  "min_robust_at", "max_failure_prob")

    def __post_init__(self) -> None:
        check_fields(self, POLICY_CONSTRAINTS)
        if self.min_robust_at is not None:
            object.__setattr__(self, "min_robust_at", parse_robust_at(self.min_robust_at))
        if all(getattr(self, n) is None for n in self.THRESHOLDS):
            raise InvalidInput("the gate has nothing to check: give min_accuracy, min_robust, min_class_robust, "
                               "min_robust_at, max_failure_prob, or a baseline with max_robust_drop / "
                               "max_accuracy_drop")
        if self.max_fragile and self.max_failure_prob is None:
            raise InvalidInput("max_fragile counts the images allowed above max_failure_prob: give max_failure_prob")
        if self.robust_of == "correct" and self.max_robust_drop is not None:
            raise InvalidInput("max_robust_drop compares shares of all images (paired image by image); robust_of="
                               "correct applies to min_robust, min_class_robust and min_robust_at: drop it or "
                               "use robust_of=all")

    @property
    def needs_baseline(self) -> bool:
        return self.max_robust_drop is not None or self.max_accuracy_drop is not None

    @property
    def alpha(self) -> float:
        return 1 - self.confidence


declare("GatePolicy", POLICY_CONSTRAINTS, lambda **kw: GatePolicy(**{"min_robust": 0.5, **kw}))


def parse_robust_at(value) -> tuple[tuple[int, float], ...]:
    """``"10:95%,50:90%,250:80%"`` (or pairs) -> ((10, 0.95), (50, 0.9), (250, 0.8)): a minimum robust fraction
    after each number of steps, budgets distinct."""
    items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        try:
            if isinstance(item, str):
                steps_text, frac_text = item.split(":")
                steps = int(steps_text)
                frac = float(frac_text[:-1]) / 100 if frac_text.strip().endswith("%") else float(frac_text)
            else:
                steps, frac = item
                if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
                    raise ValueError
                steps, frac = int(steps), float(frac)
        except (ValueError, TypeError):
            raise InvalidInput(f"min_robust_at takes STEPS:FRACTION pairs such as 10:95%,250:80%; got {item!r}") \
                from None
        if steps < 1 or not 0 <= frac <= 1:
            raise InvalidInput(f"min_robust_at needs steps >= 1 and a fraction in [0, 1]; got {item!r}")
        out.append((steps, frac))
    if not out:
        raise InvalidInput("min_robust_at needs at least one STEPS:FRACTION pair, e.g. 10:95%")
    if len({s for s, _ in out}) != len(out):
        raise InvalidInput(f"min_robust_at names a budget twice: {value!r}")
    return tuple(sorted(out))


# ------------------------------------------------------------------------------------------------ noise checks
NOISE_CHECK_FRACTIONS = ("min_robust", "min_class_robust", "max_robust_drop", "max_failure_prob")
NOISE_CHECK_KEYS = (*NOISE_CHECK_FRACTIONS, "min_robust_at", "max_fragile", "max_steps")


def _share(key: str, value) -> float:
    """A threshold written 0.8, "0.8" or "80%", in [0, 1]."""
    if isinstance(value, bool):
        raise InvalidInput(f"{key} must be a fraction like 0.85 or a percentage like 85%; got {value!r}")
    text = str(value).strip()
    try:
        v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InvalidInput(f"{key} must be a fraction like 0.85 or a percentage like 85%; got {text!r}") from None
    if not 0 <= v <= 1:
        raise InvalidInput(f"{key} must be between 0 and 1 (0% and 100%); got {text!r}")
    return v


def _count(key: str, value, lo: int) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("-").isdigit() or int(text) < lo:
        raise InvalidInput(f"{key} must be a whole number >= {lo}; got {value!r}")
    return int(text)


@dataclass(frozen=True)
class NoiseCheck:
    """Checks under one more noise family, beside the gate's own noise: the family (one typed spec, from the one
    grammar) and the thresholds that need noise. Written on the command line as ``FAMILY[:k=v,...] KEY=VALUE ...``
    (``gaussian:sigma=0.1 min_robust=80%``) and in a gate's TOML as a ``[[gate.noise_check]]`` table
    (``family = "gaussian"``, ``sigma = 0.1``, ``min_robust = "80%"``). ``max_steps``: this noise's step budget
    (default the gate's; a severity sweep's is its five levels; a golden set sets its own)."""

    noise: Family
    min_robust: float | None = None
    min_class_robust: float | None = None
    min_robust_at: tuple[tuple[int, float], ...] | None = None
    max_robust_drop: float | None = None
    max_failure_prob: float | None = None
    max_fragile: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        where = f"the check under {self.noise.text()}"
        if all(getattr(self, k) is None for k in (*NOISE_CHECK_FRACTIONS, "min_robust_at")):
            raise InvalidInput(f"{where} has no threshold: give min_robust, min_class_robust, min_robust_at, "
                               "max_robust_drop or max_failure_prob")
        if self.noise.kind == "sweep" and (self.max_failure_prob is not None or self.min_robust_at is not None):
            raise InvalidInput(f"{where}: {self.noise.name} is a severity sweep (no random draws, its steps are "
                               "its severities), so max_failure_prob and min_robust_at do not apply; use min_robust "
                               "(images that survive every severity)")
        if self.max_failure_prob is not None and self.max_steps is not None:
            raise InvalidInput(f"{where}: max_failure_prob sets the step budget; leave out max_steps")
        self.policy(GatePolicy(min_robust=0.5), 0.95)  # the thresholds' own checks, now rather than at the run

    def text(self) -> str:
        """The command-line form, which :func:`parse_noise_check` reads back to an equal check."""
        parts = [self.noise.text()]
        for key in NOISE_CHECK_KEYS:
            v = getattr(self, key)
            if v is None or (key == "max_fragile" and v == 0):
                continue
            if key == "min_robust_at":
                v = ",".join(f"{s}:{f!r}" for s, f in v)
            parts.append(f"{key}={v!r}" if isinstance(v, float) else f"{key}={v}")
        return " ".join(parts)

    def policy(self, like: GatePolicy, confidence: float) -> GatePolicy:
        """This check's thresholds as a gate policy, with ``like``'s rules (error control, looks, denominators)."""
        return GatePolicy(min_robust=self.min_robust, min_class_robust=self.min_class_robust,
                          min_robust_at=self.min_robust_at, max_robust_drop=self.max_robust_drop,
                          max_failure_prob=self.max_failure_prob, max_fragile=self.max_fragile,
                          confidence=confidence, inconclusive=like.inconclusive, early_stop=like.early_stop,
                          family=like.family, spending=like.spending, robust_of=like.robust_of)


def parse_noise_check(value) -> NoiseCheck:
    """A :class:`NoiseCheck` from its command-line text (``"gaussian:sigma=0.1 min_robust=80%"``) or a TOML table
    (``{"family": "gaussian", "sigma": 0.1, "min_robust": "80%"}``, or ``noise = "gaussian:sigma=0.1"`` in place
    of the family and its parameters)."""
    if isinstance(value, NoiseCheck):
        return value
    if isinstance(value, str):
        tokens = value.split()
        if not tokens:
            raise InvalidInput("a noise check needs a family and a threshold, e.g. 'gaussian:sigma=0.1 "
                               "min_robust=80%'")
        family_text, items = tokens[0], {}
        for tok in tokens[1:]:
            key, eq, v = tok.partition("=")
            if not eq or not key:
                raise InvalidInput(f"noise check {value!r}: {tok!r} is not KEY=VALUE (e.g. min_robust=80%)")
            if key in items:
                raise InvalidInput(f"noise check {value!r}: {key} is given twice")
            items[key] = v
    elif isinstance(value, dict):
        items = dict(value)
        fam = items.pop("family", None)
        text = items.pop("noise", None)
        if (fam is None) == (text is None):
            raise InvalidInput(f"a noise check names its noise once: family = \"gaussian\" (with its parameters as "
                               f"keys) or noise = \"gaussian:sigma=0.1\"; got {value!r}")
        if not isinstance(fam if fam is not None else text, str):
            raise InvalidInput(f"a noise check's family must be text such as \"gaussian\"; got {value!r}")
        params = {k: items.pop(k) for k in list(items) if k not in NOISE_CHECK_KEYS}
        if text is not None and params:
            raise InvalidInput(f"noise check {text!r}: unknown key(s) {', '.join(sorted(params))}; allowed: "
                               f"{', '.join(NOISE_CHECK_KEYS)}")
        family_text = text if isinstance(text, str) else str(fam) + (
            ":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
    else:
        raise InvalidInput(f"a noise check is text such as 'gaussian:sigma=0.1 min_robust=80%' or a table; got "
                           f"{type(value).__name__}")
    try:
        family = parse(family_text)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    unknown = sorted(set(items) - set(NOISE_CHECK_KEYS))
    if unknown:
        raise InvalidInput(f"noise check under {family.text()}: unknown key(s) {', '.join(unknown)}; allowed: "
                           f"{', '.join(NOISE_CHECK_KEYS)}")
    kw: dict = {}
    for key, v in items.items():
        if key in NOISE_CHECK_FRACTIONS:
            kw[key] = _share(key, v)
        elif key == "min_robust_at":
            kw[key] = parse_robust_at(v)
        else:
            kw[key] = _count(key, v, 1 if key == "max_steps" else 0)
    return NoiseCheck(family, **kw)


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
    seconds: float = 0.0  # wall time of the stage that decided it (the clean pass, or the noise looks)


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
    # with checks under more noise families: one record per noise condition (its noise, policy, verdict and work)
    conditions: list[dict] = field(default_factory=list)
    # each model's inferences per second in this gate (pyrobust.gate.run.throughput_record)
    throughput: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def _policy_record(self) -> dict:
        """The policy as JSON; a gate of noise checks only has the rules of its policy but none of its thresholds
        (each condition's policy is in ``conditions``)."""
        d = asdict(self.policy)
        if self.conditions and all(r["noise_check"] for r in self.conditions):
            d.update({k: None for k in GatePolicy.THRESHOLDS})
        return d

    def to_dict(self) -> dict:
        full = self.inferences_full_estimate
        return {
            "schema_version": GATE_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "decision": self.decision, "passed": self.passed, "exit_code": self.exit_code,
            "policy": self._policy_record(),
            "checks": [check_json(c) for c in self.checks],
            "images": self.images, "images_evaluated": self.images_evaluated, "looks": self.looks,
            "inferences": self.inferences,
            "work": {"stopped_early": self.stopped_early, "stop_reason": self.stop_reason,
                     "inferences": self.inferences, "inferences_full_estimate": full,
                     "inferences_saved": None if full is None else max(0, full - self.inferences),
                     "share_of_full": None if not full else self.inferences / full,
                     "throughput": self.throughput},
            "nonfinite_outputs": self.nonfinite, "warnings": self.warnings,
            "candidate": self.candidate, "baseline": self.baseline, "dataset": self.dataset,
            "settings": self.settings, "conditions": self.conditions, "versions": versions(),
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


# ------------------------------------------------------------------------------------------------- golden set
@dataclass(frozen=True)
class GoldenSpec:
    """The golden-set check: at most ``max_fragile`` of the ``images`` may have a per-step failure probability
    above ``max_failure_prob``. Each image gets exact Clopper-Pearson bounds on its failures over ``steps`` probes at
    one-sided level ``alpha_side`` = (1 - confidence) / 2 / images (Bonferroni over the set), and ``steps`` is the
    budget at which an image never fooled clears the threshold: if more than ``max_fragile`` images truly lie above
    it, the chance that the check passes is at most (1 - confidence) / 2, as for every other check's wrong pass."""

    max_failure_prob: float
    max_fragile: int
    images: int
    alpha_side: float
    steps: int


def plan_golden(policy: GatePolicy, images: int) -> GoldenSpec | None:
    if policy.max_failure_prob is None:
        return None
    from pyrobust.stats import steps_for_bound
    from pyrobust.types import MAX_STEPS_LIMIT

    if policy.max_fragile >= images:
        raise InvalidInput(f"max_fragile {policy.max_fragile} allows every one of the {images} images to fail: "
                           "nothing would be checked; give fewer")
    alpha_side = policy.alpha / 2 / images
    steps = steps_for_bound(policy.max_failure_prob, 1 - policy.alpha / 2, images)
    if steps > MAX_STEPS_LIMIT:
        raise InvalidInput(f"showing p <= {policy.max_failure_prob:.4g} for each of {images:,} images needs {steps:,} "
                           f"steps, more than the {MAX_STEPS_LIMIT:,} allowed: raise max_failure_prob or use fewer "
                           "images")
    return GoldenSpec(policy.max_failure_prob, policy.max_fragile, images, alpha_side, steps)


def golden_check(g: GoldenSpec, first_failure: np.ndarray, failures: np.ndarray, seen: np.ndarray,
                 images_seen: int) -> Check:
    """The golden-set check after a look: images not yet seen have bounds [0, 1], an image wrong before any noise
    [1, 1] (it fails every step). It passes when the (k+1)-th largest upper bound is at most the threshold (at most
    k images are not shown below it), fails when the (k+1)-th largest lower bound is above it (more than k images
    are shown above it), and is open otherwise. ``value``/``interval`` are those two order statistics."""
    from pyrobust.stats import clopper_pearson

    lo = np.zeros(g.images)
    hi = np.ones(g.images)
    ff, f = first_failure[seen], failures[seen]
    right = ff != 0
    clo, chi = clopper_pearson(np.where(right, f, g.steps), np.full(ff.shape, g.steps), g.alpha_side)
    lo[seen] = np.where(right, clo, 1.0)
    hi[seen] = np.where(right, chi, 1.0)
    k = g.max_fragile + 1
    hi_k = float(np.sort(hi)[-k])
    lo_k = float(np.sort(lo)[-k])
    q = g.max_failure_prob
    verdict = "pass" if hi_k <= q else "fail" if lo_k > q else "inconclusive"
    not_shown = int(np.count_nonzero(hi > q))
    above = int(np.count_nonzero(lo > q))
    c = Check("max_failure_prob", "max_failure_prob", q, hi_k, (lo_k, hi_k), verdict, int(images_seen),
              confidence=1 - 2 * g.alpha_side, stage="noise")
    left = g.images - images_seen
    c.message = (f"max_failure_prob: {not_shown} of {g.images} images not shown to have a per-step failure "
                 f"probability <= {q:.2%}, {above} shown above it (exact bounds over {g.steps} steps at "
                 f"{1 - g.alpha_side:.4%} each, Bonferroni over the set{f', {left} not yet evaluated' if left else ''})"
                 f", at most {g.max_fragile} allowed: {verdict}")
    if verdict == "inconclusive" and not left:
        c.message += (f"; {not_shown - above} image(s) failed too often to be shown below {q:.2%} and too seldom to "
                      "be shown above it, so a larger set does not settle it: allow more images (max_fragile) or a "
                      "larger max_failure_prob, or fix those images")
    return c


# ------------------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class GatePlan:
    """Which checks run where, and the error each look spends."""

    clean: list[CheckSpec]  # decided once, on the clean pass of every image
    noise: list[CheckSpec]  # decided look by look on the noise protocol
    clean_alpha: float
    noise_looks: list[int]
    noise_alphas: np.ndarray
    golden: GoldenSpec | None = None  # the golden-set check, decided on every image's exact bounds

    @property
    def needs_noise(self) -> bool:
        return bool(self.noise) or self.golden is not None

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
    for steps, frac in policy.min_robust_at or ():
        specs.append(CheckSpec(f"min_robust_at[{steps}]", "min_robust_at", frac))
    if policy.max_robust_drop is not None and baseline:
        specs.append(CheckSpec("max_robust_drop", "max_robust_drop", policy.max_robust_drop))
    clean_alpha, noise_alpha = stage_alphas(specs, policy.alpha, policy.family)
    looks = look_schedule(total) if policy.early_stop else [total]
    return GatePlan(clean=[s for s in specs if not s.needs_noise], noise=[s for s in specs if s.needs_noise],
                    clean_alpha=clean_alpha, noise_looks=looks,
                    noise_alphas=look_alphas(looks, noise_alpha, policy.spending), golden=plan_golden(policy, total))


def bracketed(spec: CheckSpec) -> int:
    """The number in a check's name: the class of ``min_class_robust[k]``, the steps of ``min_robust_at[t]``."""
    return int(spec.name[spec.name.index("[") + 1:-1])


def check_counts(spec: CheckSpec, *, labels: np.ndarray, cand: np.ndarray, base: np.ndarray | None,
                 among: np.ndarray | None = None) -> tuple:
    """The counts a check is decided from. ``cand``/``base``: per-image flags (correct for accuracy checks, robust
    (at the check's budget) for robustness checks) on the images seen so far; ``among``: the images a minimum is a
    share of (the correctly classified ones with robust_of=correct; default all)."""
    if among is not None and not spec.is_drop:
        cand, labels = cand[among], labels[among]
    if spec.is_drop:
        if base is None:
            raise InvalidInput(f"{spec.name} compares with a baseline; none was given")
        lost = int(np.count_nonzero(base & ~cand))
        gained = int(np.count_nonzero(~base & cand))
        return (lost, gained, int(cand.size))
    if spec.kind == "min_class_robust":
        sel = labels == bracketed(spec)
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
            c.images_to_settle = _settle_count(settle_images(spec, counts[j], last_alpha / 2), c.n, total, c)
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
    if c.kind == "min_robust_at":
        x, n = counts if c.verdict == "inconclusive" else (round(c.value * c.n), c.n)
        steps = c.name[c.name.index("[") + 1:-1]  # a Check's name, as bracketed() reads a CheckSpec's
        return (f"{c.name}: not fooled within {steps} steps {c.value:.2%} ({x}/{n}), {c.confidence:.2%} interval "
                f"[{lo:.2%}, {hi:.2%}], threshold >= {c.threshold:.2%}: {c.verdict}")
    if c.kind.startswith("max_"):
        lost, gained, n = counts
        what = "robust fraction" if c.kind == "max_robust_drop" else "accuracy"
        moved = f"drop {c.value:.2%}" if c.value > 0 else f"gain {-c.value:.2%}" if c.value < 0 else \
            "unchanged" if not lost else "unchanged on balance"
        return (f"{c.name}: {what} {moved} ({lost} image{'' if lost == 1 else 's'} lost, {gained} gained of {n}, "
                "paired), "
                f"{c.confidence:.2%} interval [{lo:+.2%}, {hi:+.2%}], threshold <= {c.threshold:+.2%}: {c.verdict}")
    x, n = counts if c.verdict == "inconclusive" else (round(c.value * c.n), c.n)
    what = c.kind.removeprefix("min_").replace("_", " ")
    return (f"{c.name}: {what} {c.value:.2%} ({x}/{n}), {c.confidence:.2%} interval [{lo:.2%}, {hi:.2%}], "
            f"threshold >= {c.threshold:.2%}: {c.verdict}")


SETTLE_LIMIT = 10_000  # look no further than this many times the images seen


def settle_images(spec: CheckSpec, counts: tuple, alpha_side: float) -> int | None:
    """The fewest images at which the check's exact bounds, at the level of its last look, would decide it if the
    shares seen so far held (counts scaled up, rounded); None when no number up to ``SETTLE_LIMIT`` times the
    images seen would (the estimate sits on, or too near, the threshold)."""
    from pyrobust.sequential import _fails, _passes, bounds

    n = int(counts[-1])
    if n <= 0:
        return None

    def decided(m: int) -> bool:
        scaled = (*(round(v * m / n) for v in counts[:-1]), m)
        _, lo, hi = bounds(spec, scaled, alpha_side)
        return bool(_passes(spec, lo, hi) or _fails(spec, lo, hi))

    hi_m = n + 1
    while not decided(hi_m):
        if hi_m > n * SETTLE_LIMIT:
            return None
        hi_m *= 2
    lo_m = max(n, hi_m // 2)  # not decided at lo_m (or it is n, where the check stayed open)
    while hi_m - lo_m > 1:
        mid = (lo_m + hi_m) // 2
        lo_m, hi_m = (lo_m, mid) if decided(mid) else (mid, hi_m)
    return hi_m


def _settle_count(need: int | None, n: int, total: int, c: Check) -> int | None:
    if need is None:
        c.message += (" (the estimate sits on the threshold or too near it: no number of images at these shares "
                      "settles it)")
        return None
    more = max(1, need - n)
    c.message += f"; about {more:,} more images at the same shares would settle it"
    if n + more > total:
        left = total - n
        c.message += f" (the dataset has {'no' if left == 0 else left} more)"
    return more


def decide(checks: list[Check]) -> str:
    verdicts = {c.verdict for c in checks}
    return "fail" if "fail" in verdicts else "inconclusive" if "inconclusive" in verdicts else "pass"
