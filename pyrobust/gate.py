"""``pyrobust gate``: decide whether a candidate model may be released, from statistical evidence.

Each threshold is a *check*: it **passes** when an exact bound clears the threshold, **fails** when the bound on the
other side lies beyond it, and is **inconclusive** otherwise. The decision rule (exact bounds, looks, error
spending, families of checks) lives in :mod:`pyrobust.sequential`; this module runs the models to feed it.

* ``min_accuracy`` / ``min_robust`` / ``min_class_robust``: the fraction of test images classified correctly / never
  fooled (overall, or within each class), with Clopper-Pearson bounds.
* ``max_robust_drop`` / ``max_accuracy_drop`` against a baseline: the drop ``baseline - candidate`` is measured on
  the *same* images with the *same* noise draws (the counter-based generator makes them identical), with exact
  bounds on the images lost and gained combined by square-and-add (:func:`pyrobust.stats.paired_drop_bounds`).

**Order of work.** Accuracy needs no noise: a clean pass over every image (1/(max_steps+1) of the protocol's cost)
decides the accuracy checks in one look. Only the checks that need noise then run the protocol, on images in a fixed
random order (seeded), at look sizes fixed in advance. With early stop (the default) the gate stops as soon as its
verdict can no longer change: a check failed, or every check is decided; ``gate.json`` records why and how much work
that saved. Intervals treat the test images as a sample from the distribution the model will meet.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pyrobust.datasets import Dataset
from pyrobust.engine.loop import clean_predictions
from pyrobust.engine.plan import RunPlan, load_data, plan_run, split_settings
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import InvalidInput, NonFiniteModel
from pyrobust.escape import md_code, md_text, xml_text
from pyrobust.images import parse_resize
from pyrobust.sequential import (
    FAIL,
    FAMILIES,
    PASS,
    SPENDING,
    CheckSpec,
    SequentialDecision,
    look_alphas,
    random_order,
    stage_alphas,
)
from pyrobust.stats import images_for_power, look_schedule, normal_quantile
from pyrobust.store.files import write_bytes_atomic, write_json_atomic
from pyrobust.store.results import load_results, sanity_warnings, versions
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome, RunRecord, RunState, differences, fingerprint

GATE_SCHEMA = 2
GITHUB_SUMMARY_LIMIT = 1024 * 1024  # GitHub refuses a step summary over 1 MiB
POWER_MARGIN, POWER = 0.01, 0.8  # the power statement in gate.json: a model 1 point better, 80 % power
_VERDICT = {PASS: "pass", FAIL: "fail", 0: "inconclusive"}


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
        for name in self.THRESHOLDS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                raise InvalidInput(f"{name} must be a fraction in [0, 1] (e.g. 0.85 or 85%); got {v!r}")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or \
                not 0.5 <= self.confidence < 1:
            raise InvalidInput(f"confidence must be in [0.5, 1); got {self.confidence!r}")
        if self.inconclusive not in ("fail", "pass"):
            raise InvalidInput(f"inconclusive must be fail or pass; got {self.inconclusive!r}")
        if self.family not in FAMILIES:
            raise InvalidInput(f"family must be one of {', '.join(FAMILIES)}; got {self.family!r}")
        if self.spending not in SPENDING:
            raise InvalidInput(f"spending must be one of {', '.join(SPENDING)}; got {self.spending!r}")
        if all(getattr(self, n) is None for n in self.THRESHOLDS):
            raise InvalidInput("the gate has nothing to check: give min_accuracy, min_robust, min_class_robust, "
                               "or a baseline with max_robust_drop / max_accuracy_drop")

    @property
    def needs_baseline(self) -> bool:
        return self.max_robust_drop is not None or self.max_accuracy_drop is not None

    @property
    def alpha(self) -> float:
        return 1 - self.confidence


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
            "checks": [_json_check(c) for c in self.checks],
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


def _json_check(c: Check) -> dict:
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


def _checks_from(decision: SequentialDecision, specs: list[CheckSpec], alphas: np.ndarray, stage: str,
                 counts: list[tuple], total: int) -> list[Check]:
    out = []
    last_alpha = float(alphas[decision.looks_done - 1])
    for j, spec in enumerate(specs):
        verdict = _VERDICT[int(decision.verdict[0, j])]
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


# ------------------------------------------------------------------------------------------------------- run
def _model_info(m: OnnxModel) -> dict:
    return {"path": str(Path(m.path).resolve()), "sha256": m.sha256, "external_data": m.external_data,
            "input": m.input.name, "input_type": m.input.type, "output": m.output.name,
            "layout": m.binding.layout if m.binding else None}


def run_gate(
    candidate: str | os.PathLike,
    dataset,
    *,
    policy: GatePolicy,
    baseline: str | os.PathLike | None = None,
    baseline_model: str | os.PathLike | None = None,
    baseline_sha256: str | None = None,
    noise: NoiseSpec | None = None,
    output: str | None = None,
    data_dir=None,
    limit: int | None = None,
    start: int | None = None,
    stop: int | None = None,
    resize=None,
    progress=None,
    log=None,
    status=None,
    **settings,
) -> GateResult:
    """Decide ``policy`` for ``candidate``: a clean pass for the accuracy checks, then noise looks for the
    robustness checks until the verdict can no longer change (or every image is used). A baseline is a model, or a
    folder of its saved results on the same data and noise, tied to the model they came from: ``baseline_model``
    (its file) or ``baseline_sha256`` (its pinned digest; the file is then the one the results name), and verified
    against it before it is used (:func:`verify_saved_baseline`). ``noise`` and ``settings`` are as for
    :func:`pyrobust.evaluate` (noise fields, and run options such as ``batch_size``, ``sessions``, ``scheduler``,
    ``max_memory_mb``, ``custom_ops``): both go through the same run plan."""
    spec, options = split_settings(noise, settings)
    log = log or (lambda line: None)
    if policy.needs_baseline and baseline is None:
        raise InvalidInput("max_robust_drop and max_accuracy_drop compare with a baseline: give a baseline model "
                           "or a results folder of it")
    # the data is refused from its header when it cannot fit, rather than found out by a MemoryError
    size = parse_resize(resize) if isinstance(resize, str) else resize
    ds, ds_spec = load_data(dataset, data_dir=data_dir, start=start, stop=stop, limit=limit, max_bytes=options.budget,
                            resize=size)
    base_saved, base_info = None, None
    bpath = Path(baseline) if baseline is not None else None
    if bpath is not None and bpath.is_dir():
        base_saved = _saved_baseline(bpath, ds, spec)
        base_info = {"results": str(bpath.resolve()), **base_saved.model}
    elif baseline_model is not None or baseline_sha256 is not None:
        raise InvalidInput("baseline_model=FILE and baseline_sha256=HEX tie a results folder to its model; the "
                           "baseline is a model here, so leave them out")
    with ExitStack() as stack:
        cand = stack.enter_context(plan_run(candidate, ds, spec, options, status=status, output=output))
        base = None
        if bpath is not None and base_saved is None:
            base = stack.enter_context(plan_run(bpath, ds, spec, options, status=status, connection=cand.connection,
                                                output=output))
            base_info = _model_info(base.model)
        elif base_saved is not None and bpath is not None and base_info is not None:
            model_path = _baseline_model_path(base_saved, bpath, baseline_model, baseline_sha256)
            if status is not None:
                status("verifying the baseline results against their model")
            bplan = stack.enter_context(plan_run(model_path, ds, spec, options, status=status,
                                                 connection=cand.connection, output=output))
            base_info["verified"] = verify_saved_baseline(base_saved, bplan, pinned=baseline_sha256, log=log)
        return _decide(policy, cand, base, base_saved.outcome if base_saved else None, base_info, ds_spec,
                       data_dir, (start, stop, limit, size), progress, log)


def _decide(policy: GatePolicy, cand: RunPlan, base: RunPlan | None, base_saved: Outcome | None,
            base_info: dict | None, ds_spec: str, data_dir, selection: tuple, progress, log) -> GateResult:
    ds, spec = cand.dataset, cand.noise
    has_baseline = base is not None or base_saved is not None
    total = ds.n
    plan = plan_gate(policy, total, np.unique(ds.labels), baseline=has_baseline)
    inferences = 0
    look_log: list[dict] = []
    checks: list[Check] = []
    warns: list[str] = []
    nonfinite = {"clean": 0, "noisy": 0}
    stop_reason = "every image evaluated"
    failed_early = False

    # Stage 1: the clean pass decides the accuracy checks in one look.
    if plan.clean:
        pred = clean_predictions(cand.model, ds, spec, batch_size=cand.batch_size)
        inferences += total
        _refuse_all_nonfinite(pred, cand.model.path)
        nonfinite["clean"] = int(np.count_nonzero(pred == NONFINITE))
        cand_ok = pred == ds.labels
        warns += sanity_warnings(ds.labels, pred, model="the candidate")
        base_ok = None
        if base is not None:
            base_ok = clean_predictions(base.model, ds, base.noise, batch_size=base.batch_size) == ds.labels
            inferences += total
        elif base_saved is not None:
            base_ok = base_saved.first_failure != 0
        clean_counts = [check_counts(s, labels=ds.labels, cand=cand_ok, base=base_ok) for s in plan.clean]
        alphas = np.array([plan.clean_alpha])
        clean_decision = SequentialDecision(plan.clean, alphas, family=policy.family)
        clean_decision.look(clean_counts)
        checks += _checks_from(clean_decision, plan.clean, alphas, "clean", clean_counts, total)
        look_log.append({"look": 0, "stage": "clean", "images": total, "inferences": inferences,
                         "confidence": 1 - plan.clean_alpha,
                         "undecided": [x.name for x in checks if x.verdict == "inconclusive"]})
        log(f"clean pass: {total} images, accuracy checks "
            + ", ".join(f"{x.name} {x.verdict}" for x in checks))
        failed_early = policy.early_stop and any(x.verdict == "fail" for x in checks)
        if failed_early:
            stop_reason = "an accuracy check failed on the clean pass: no noise was needed"

    # Stage 2: noise looks for the checks that need noise, each running only its new images.
    done_n = 0
    per_image_noise = 0.0
    info: dict = {}
    if plan.noise and not failed_early:
        order = random_order(spec.seed, total)
        cand_state = RunState(total)
        base_state = RunState(total) if base is not None else None
        base_ff = base_saved.first_failure if base_saved is not None else None
        decision = SequentialDecision(plan.noise, plan.noise_alphas, family=policy.family)
        counts: list[tuple] = []
        for k, n in enumerate(plan.noise_looks):
            pos = np.sort(order[done_n:n])
            _, info = cand.execute(cand_state, positions=pos, progress=progress)
            if base is not None and base_state is not None:
                base.execute(base_state, positions=pos)
                base_ff = base_state.first_failure
            done_n = n
            seen = np.sort(order[:n])
            if k == 0:
                _refuse_all_nonfinite(cand_state.clean_prediction[seen], cand.model.path)
                if not plan.clean:  # no clean pass: the first look's clean predictions are checked instead
                    warns += sanity_warnings(ds.labels[seen], cand_state.clean_prediction[seen],
                                             model="the candidate")
            robust = cand_state.first_failure[seen] == ROBUST
            base_robust = None if base_ff is None else base_ff[seen] == ROBUST
            counts = [check_counts(s, labels=ds.labels[seen], cand=robust, base=base_robust) for s in plan.noise]
            decision.look(counts)
            undecided = [s.name for j, s in enumerate(plan.noise) if decision.verdict[0, j] == 0]
            noise_inferences = cand_state.inferences + (base_state.inferences if base_state is not None else 0)
            look_log.append({"look": k + 1, "stage": "noise", "images": n, "inferences": inferences + noise_inferences,
                             "confidence": float(1 - plan.noise_alphas[k]), "undecided": undecided})
            log(f"look {k + 1}/{len(plan.noise_looks)}: {n} of {total} images, {len(undecided)} check(s) undecided")
            if policy.early_stop and decision.stopped[0] and n < total:
                failed = any(decision.verdict[0] == FAIL)
                stop_reason = (f"a check failed at look {k + 1}: the verdict cannot change" if failed
                               else f"every check was decided at look {k + 1}")
                break
        noise_inferences = cand_state.inferences + (base_state.inferences if base_state is not None else 0)
        inferences += noise_inferences
        per_image_noise = noise_inferences / max(done_n, 1)
        seen = np.sort(order[:done_n])
        cand_clean, cand_flab = cand_state.clean_prediction[seen], cand_state.failure_label[seen]
        nonfinite["noisy"] = int(np.count_nonzero((cand_clean != NONFINITE) & (cand_flab == NONFINITE)))
        if not plan.clean:
            nonfinite["clean"] = int(np.count_nonzero(cand_clean == NONFINITE))
        checks += _checks_from(decision, plan.noise, plan.noise_alphas, "noise", counts, total)
    elif plan.noise:
        checks += [Check(s.name, s.kind, s.threshold, math.nan, (math.nan, math.nan), "inconclusive", 0,
                         confidence=math.nan, stage="noise",
                         message=f"{s.name}: not evaluated, the gate had already failed on the clean pass")
                   for s in plan.noise]
    if nonfinite["clean"] or nonfinite["noisy"]:
        warns.append(f"the candidate returned NaN or infinite outputs for {nonfinite['clean']} clean image(s) and "
                     f"{nonfinite['noisy']} noisy input(s); they count as wrong / fooled")
    stopped_early = failed_early or (bool(plan.noise) and done_n < total)
    models = 1 + (base is not None)
    # The work of the same gate without early stop; unknown when no noise look ran (the clean pass failed).
    full = None if failed_early and plan.noise else \
        (total * models if plan.clean else 0) + int(round(per_image_noise * total))
    decision_word = decide(checks)
    passed = decision_word == "pass" or (decision_word == "inconclusive" and policy.inconclusive == "pass")
    start, stop, limit, size = selection
    return GateResult(
        decision=decision_word, passed=passed, checks=checks, images=total, images_evaluated=done_n,
        looks=look_log, inferences=inferences,
        inferences_full_estimate=full,
        stopped_early=stopped_early, stop_reason=stop_reason if stopped_early else "every image evaluated",
        nonfinite=nonfinite, warnings=warns, policy=policy,
        candidate=_model_info(cand.model), baseline=base_info,
        dataset={"spec": ds_spec, "count": total, "sha256": ds.sha256, "source": ds.source,
                 "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "start": start, "stop": stop,
                 "limit": limit, **({"resize": list(size)} if size else {}),
                 **({"classes": list(ds.classes)} if ds.classes else {})},
        settings={**spec.to_dict(), **cand.settings(info), "looks_planned": plan.noise_looks,
                  "alpha_per_look": [float(a) for a in plan.noise_alphas],
                  "clean_alpha": plan.clean_alpha, "order_seed": spec.seed},
    )


def _refuse_all_nonfinite(pred: np.ndarray, path) -> None:
    if pred.size and bool(np.all(pred == NONFINITE)):
        raise NonFiniteModel(f"{path}: every output of the model is NaN or infinite ({pred.size} images); it cannot be "
                         "gated. Check the model's export and its expected input range and normalisation")


def _saved_baseline(folder: Path, ds: Dataset, spec: NoiseSpec) -> RunRecord:
    """A baseline's saved results, usable only for the same images, data and noise as this gate's."""
    record = load_results(folder)
    here = fingerprint(model_sha256="", dataset_sha256=ds.sha256, count=ds.n, spec=spec.to_dict())
    diffs = differences(record.fingerprint, here, compare=("data", "noise"))
    if diffs:
        raise InvalidInput(f"the baseline results in {folder} cannot be paired with this gate: {'; '.join(diffs)} "
                           "(there → here). Evaluate the baseline on the same data with the same settings, or pass "
                           "the baseline model")
    if record.outcome.n != ds.n or not np.array_equal(record.outcome.index, ds.index):
        raise InvalidInput(f"the baseline results in {folder} cover {record.outcome.n} of this gate's {ds.n} images "
                           "(a precision or partial run); evaluate the baseline on every image, or pass the "
                           "baseline model")
    return record


BASELINE_REPLAYS = 64  # images of a results baseline replayed through the whole protocol before it is trusted


def _baseline_model_path(record: RunRecord, folder: Path, model, pinned: str | None) -> Path:
    """The model file a results baseline is checked against: the one the user names, or with only a pinned digest
    the one the results name (its bytes must then have that digest)."""
    if pinned is not None and (not isinstance(pinned, str) or len(pinned) != 64 or
                               any(ch not in "0123456789abcdef" for ch in pinned.lower())):
        raise InvalidInput(f"baseline_sha256 must be a SHA-256 (64 hexadecimal digits); got {pinned!r}")
    if model is not None:
        return Path(model)
    if pinned is None:
        raise InvalidInput(f"the baseline results in {folder} are not tied to a model: nothing but the folder "
                           "vouches for them. Pass the model they came from (baseline_model=FILE) or pin its SHA-256 "
                           f"(baseline_sha256=HEX; the results name {record.model['sha256'][:16]}…), or pass the "
                           "baseline model itself as the baseline")
    return Path(record.model["path"])


def verify_saved_baseline(record: RunRecord, plan: RunPlan, *, pinned: str | None, log, replays: int | None = None,
                          rng: np.random.Generator | None = None) -> dict:
    """Check that saved baseline results are what their model gives, before they decide anything: the model's
    SHA-256 must be the one the results record (and ``pinned``, when given); its clean prediction of **every**
    image must equal the recorded one (this proves the accuracy the results claim); and ``replays`` images drawn at
    random (unpredictably, so a doctored folder cannot know which) must replay through the whole protocol to the
    recorded first-failure step and label. A folder in which a share f of the correctly classified images was
    altered passes the replay with probability (1 - f)^replays: about 4 % for f = 5 % with 64 replays. Returns what
    was checked, for ``gate.json``."""
    from pyrobust.errors import DataError

    out = record.outcome
    digest = plan.model.sha256
    where = f"the baseline results in {record.folder}"
    if pinned is not None and digest != pinned.lower():
        raise DataError(f"{plan.model.path}: its SHA-256 is {digest[:16]}…, not the pinned {pinned[:16]}…; give "
                        "the baseline model that was pinned")
    if digest != record.model["sha256"]:
        raise DataError(f"{where} are of the model with SHA-256 {record.model['sha256'][:16]}…, not of "
                        f"{plan.model.path} ({digest[:16]}…); give the model they came from, or evaluate this one")
    ds = plan.dataset
    clean = clean_predictions(plan.model, ds, plan.noise, batch_size=plan.batch_size)
    wrong = np.flatnonzero(clean != out.clean_prediction)
    if wrong.size:
        i = int(wrong[0])
        raise DataError(f"{where} do not match their model: image #{int(out.index[i])} is predicted "
                        f"{int(clean[i])} but the results say {int(out.clean_prediction[i])} ({wrong.size} of "
                        f"{ds.n} clean predictions differ); the folder was altered or is not this model's. "
                        "Evaluate the baseline again")
    correct = np.flatnonzero(out.first_failure != 0)
    k = min(BASELINE_REPLAYS if replays is None else replays, correct.size)
    rng = rng or np.random.default_rng()  # fresh entropy: which images are replayed must not be predictable
    pos = np.sort(rng.choice(correct, size=k, replace=False)) if k else correct[:0]
    state = RunState(ds.n)
    if k:
        plan.execute(state, positions=pos)
    for i in pos:
        if (state.first_failure[i], state.failure_label[i]) != (out.first_failure[i], out.failure_label[i]):
            def said(ff, fl):
                return "robust" if ff == ROBUST else f"fooled at step {ff} (as {fl})"
            raise DataError(f"{where} do not match their model: image #{int(out.index[i])} replays as "
                            f"{said(int(state.first_failure[i]), int(state.failure_label[i]))} but the results say "
                            f"{said(int(out.first_failure[i]), int(out.failure_label[i]))}; the folder was altered or "
                            "is not this model's. Evaluate the baseline again")
    log(f"baseline results verified: model SHA-256 {digest[:12]}…, {ds.n} clean predictions, {k} images replayed")
    return {"model": _model_info(plan.model), "sha256_pinned": pinned is not None, "clean_predictions": int(ds.n),
            "replayed": int(k), "replayed_indices": [int(out.index[i]) for i in pos],
            "inferences": int(ds.n + state.inferences)}


# --------------------------------------------------------------------------------------------------- reports
_ICON = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️"}


def _interval(c: Check) -> str:
    if math.isnan(c.value):
        return "not evaluated"
    if c.kind.startswith("max_"):
        return f"{c.value:+.2%} [{c.interval[0]:+.2%}, {c.interval[1]:+.2%}]"
    return f"{c.value:.2%} [{c.interval[0]:.2%}, {c.interval[1]:.2%}]"


def _threshold(c: Check) -> str:
    return f"≤ {c.threshold:+.2%}" if c.kind.startswith("max_") else f"≥ {c.threshold:.2%}"


def markdown_summary(result: GateResult) -> str:
    """The step summary (GitHub renders it as GFM, raw HTML included): every name the model, the data or a results
    folder chose is a code span or escaped text (:mod:`pyrobust.escape`), so none becomes markup."""
    head = {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive"}[result.decision]
    base = ""
    if result.baseline:
        base = f"; baseline {md_code(Path(result.baseline.get('path', result.baseline.get('results', ''))).name)}"
    lines = [f"### pyrobust gate {head} {_ICON[result.decision]}", "",
             f"Candidate {md_code(Path(result.candidate['path']).name)} (sha256 "
             f"`{result.candidate['sha256'][:12]}`) on {md_code(result.dataset['spec'])}: "
             f"{result.images_evaluated} of {result.images} images through the noise protocol, "
             f"{result.inferences:,} inferences{base}.", "",
             "| check | value [interval] | threshold | verdict |", "|---|---|---|---|"]
    for c in result.checks:
        lines.append(f"| {md_code(c.name, table=True)} | {_interval(c)} | {_threshold(c)} | {_ICON[c.verdict]} "
                     f"{c.verdict} |")
    lines.append("")
    p = result.policy
    lines.append(f"Exact intervals at each check's per-look level ({p.confidence:.0%} overall: accuracy on the clean "
                 f"pass of every image, robustness over {len(result.settings['looks_planned'])} planned looks, "
                 f"error spent {p.spending}; fail verdicts controlled across checks: {p.family}); noise: "
                 f"{result.settings['pixels']} pixels, {result.settings['max_steps']} steps, "
                 f"{result.settings['scheme']}, {result.settings['mode']}, seed {result.settings['seed']}.")
    if result.stopped_early:
        lines.append(f"Stopped early: {md_text(result.stop_reason)}.")
    for w in result.warnings:
        lines.append(f"- ⚠️ {md_text(w)}")
    for c in result.checks:
        if c.verdict == "inconclusive":
            lines.append(f"- {md_code(c.name)} is inconclusive: {md_text(c.message.split('; ', 1)[-1])}")
    return "\n".join(lines) + "\n"


def junit_xml(result: GateResult) -> bytes:
    failing = {"fail"} | ({"inconclusive"} if result.policy.inconclusive == "fail" else set())
    suite = ET.Element("testsuite", name="pyrobust gate", tests=str(len(result.checks)),
                       failures=str(sum(c.verdict in failing for c in result.checks)),
                       skipped=str(sum(c.verdict == "inconclusive" and c.verdict not in failing
                                       for c in result.checks)),
                       errors="0", timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for c in result.checks:
        message = xml_text(c.message)  # XML 1.0 has no place for control characters: escaped, not written raw
        case = ET.SubElement(suite, "testcase", classname=xml_text(f"pyrobust.gate.{c.kind}"), name=xml_text(c.name))
        if c.verdict in failing:
            ET.SubElement(case, "failure", message=message, type=c.verdict).text = message
        elif c.verdict == "inconclusive":
            ET.SubElement(case, "skipped", message=message)
        out = ET.SubElement(case, "system-out")
        out.text = message
    root = ET.Element("testsuites", name="pyrobust", tests=suite.get("tests", "0"), failures=suite.get("failures", "0"))
    root.append(suite)
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def append_github_summary(markdown: str, path: str | os.PathLike) -> bool:
    """Append to ``$GITHUB_STEP_SUMMARY``, keeping the file under GitHub's 1 MiB limit; False if it did not fit."""
    p = Path(path)
    used = p.stat().st_size if p.exists() else 0
    data = markdown.encode()
    if used + len(data) > GITHUB_SUMMARY_LIMIT:
        data = b"pyrobust gate: summary omitted (the step summary is near GitHub's 1 MiB limit); see gate.json\n"
        if used + len(data) > GITHUB_SUMMARY_LIMIT:
            return False
    with open(p, "ab") as fh:
        fh.write(data)
    return True


def write_outputs(result: GateResult, *, out: Path | None = None, junit: Path | None = None,
                  summary: Path | None = None) -> list[Path]:
    written = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "gate.json", result.to_dict())
        written.append(out / "gate.json")
    if junit is not None:
        write_bytes_atomic(junit, junit_xml(result))
        written.append(junit)
    if summary is not None:
        write_bytes_atomic(summary, markdown_summary(result).encode())
        written.append(summary)
    return written
