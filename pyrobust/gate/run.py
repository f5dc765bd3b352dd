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
that saved. Intervals treat the test images as a sample from the distribution the model will meet."""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import DataSelection, Dataset
from pyrobust.engine.loop import clean_predictions
from pyrobust.engine.plan import RunOptions, RunPlan, load_data, plan_run, split_settings
from pyrobust.engine.runtime import BoundModel
from pyrobust.errors import DataError, InvalidInput, NonFiniteModel
from pyrobust.gate.policy import (
    Check,
    GatePlan,
    GatePolicy,
    GateResult,
    NoiseCheck,
    bracketed,
    check_counts,
    checks_from,
    decide,
    golden_check,
    plan_gate,
    plan_golden,
)
from pyrobust.sequential import (
    FAIL,
    SequentialDecision,
    random_order,
)
from pyrobust.stats import robust_at
from pyrobust.store.results import load_results, sanity_warnings
from pyrobust.types import (
    L0_DEFAULTS,
    NONFINITE,
    PAIRING_IGNORES,
    PAPER_MAX_STEPS,
    ROBUST,
    NoiseSpec,
    Outcome,
    RunRecord,
    RunState,
    differences,
    fingerprint,
)


# ------------------------------------------------------------------------------------------------------- run
def _model_info(m: BoundModel) -> dict:
    return {"path": str(Path(m.path).resolve()), "sha256": m.sha256, "external_data": m.external_data,
            "input": m.input.name, "input_type": m.input.type, "output": m.output.name,
            "layout": m.binding.layout}


def run_gate(
    candidate: str | os.PathLike,
    dataset,
    *,
    policy: GatePolicy,
    baseline: str | os.PathLike | None = None,
    baseline_model: str | os.PathLike | None = None,
    baseline_sha256: str | None = None,
    noise: NoiseSpec | None = None,
    data: DataSelection | None = None,
    options: RunOptions | None = None,
    output: str | None = None,
    progress=None,
    log=None,
    status=None,
    **settings,
) -> GateResult:
    """Decide ``policy`` for ``candidate``: a clean pass for the accuracy checks, then noise looks for the
    robustness checks until the verdict can no longer change (or every image is used). A baseline is a model, or a
    folder of its saved results on the same data and noise, tied to the model they came from: ``baseline_model``
    (its file) or ``baseline_sha256`` (its pinned digest; the file is then the one the results name), and verified
    against it before it is used (:func:`verify_saved_baseline`). ``noise``, ``data``, ``options`` and
    ``settings`` are as for :func:`pyrobust.evaluate` (the three records, and any of their fields by name): they
    go through the same run plan."""
    budget_given = "max_steps" in settings or (noise is not None and noise.max_steps != PAPER_MAX_STEPS)
    spec, options, selection = split_settings(settings, noise=noise, options=options, data=data)
    log = log or (lambda line: None)
    if policy.needs_baseline and baseline is None:
        raise InvalidInput("max_robust_drop and max_accuracy_drop compare with a baseline: give a baseline model "
                           "or a results folder of it")
    # the data is refused from its header when it cannot fit, rather than found out by a MemoryError
    ds, ds_spec = load_data(dataset, selection=selection, max_bytes=options.budget)
    spec = _gate_spec(policy, spec, ds.n, budget_given, log)
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
        models = _Contestants(cand, base, base_saved.outcome if base_saved else None)
        return _decide(policy, models, base_info, selection.record(ds_spec, ds), progress, log)


def run_gates(
    candidate: str | os.PathLike,
    dataset,
    *,
    policy: GatePolicy | None,
    noise_checks=(),
    rules: GatePolicy | None = None,
    baseline: str | os.PathLike | None = None,
    noise: NoiseSpec | None = None,
    data: DataSelection | None = None,
    options: RunOptions | None = None,
    log=None,
    **kwargs,
) -> GateResult:
    """The gate's own checks (``policy``, under ``noise``) and checks under more noise families (``noise_checks``,
    :class:`~pyrobust.gate.policy.NoiseCheck` or their text), in one decision. Each noise condition is a gate of
    its own on the same images and seed, and the error is split between them (Bonferroni): with K conditions each
    runs at confidence ``1 - (1 - confidence)/K``, so a wrong verdict anywhere has chance at most
    ``(1 - confidence)/2`` per side, as for one gate. With early stop, a failed condition ends the gate (the rest are
    recorded as not evaluated). ``rules``: a policy whose rules (confidence, error control, looks, denominators)
    apply when there is no ``policy`` (only noise checks); its thresholds are not checked. The other arguments are
    :func:`run_gate`'s; with no noise checks this is :func:`run_gate`."""
    from pyrobust.gate.policy import parse_noise_check

    checks = [parse_noise_check(c) for c in noise_checks]
    if not checks:
        if policy is None:
            raise InvalidInput("the gate has nothing to check: give a threshold or a noise check")
        return run_gate(candidate, dataset, policy=policy, baseline=baseline, noise=noise, data=data,
                        options=options, log=log, **kwargs)
    log = log or (lambda line: None)
    rules = policy if policy is not None else rules if rules is not None else GatePolicy(min_robust=0.5)
    texts = [c.noise.text() for c in checks]
    twice = sorted({t for t in texts if texts.count(t) > 1})
    if twice:
        raise InvalidInput(f"the noise {twice[0]} has two noise checks; put its thresholds in one")
    picked = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN_KEYS}
    spec, options, data = split_settings(kwargs, noise=noise, options=options, data=data)
    kwargs = picked
    bpath = Path(baseline) if baseline is not None else None
    for c in checks:
        if c.max_robust_drop is not None and baseline is None:
            raise InvalidInput(f"max_robust_drop under {c.noise.text()} compares with a baseline: give one")
        if c.max_robust_drop is not None and bpath is not None and bpath.is_dir():
            raise InvalidInput(f"max_robust_drop under {c.noise.text()} needs the baseline model: a results folder "
                               f"holds the results of one noise ({bpath}); pass the baseline .onnx")
    k = len(checks) + (policy is not None)
    confidence = 1 - rules.alpha / k
    conditions: list[tuple[str, GatePolicy, NoiseSpec, NoiseCheck | None]] = []
    if policy is not None:
        noisy = any(getattr(policy, t) is not None for t in GatePolicy.THRESHOLDS
                    if t not in ("min_accuracy", "max_accuracy_drop"))
        conditions.append((spec.noise_name if noisy else "no noise", replace(policy, confidence=confidence), spec,
                           None))
    for c in checks:
        steps = c.max_steps if c.max_steps is not None else \
            PAPER_MAX_STEPS if c.noise.kind == "sweep" or c.max_failure_prob is not None else spec.max_steps
        try:
            l0: dict = dict(L0_DEFAULTS)
            cspec = replace(spec, corruption=c.noise, mode="restart", count_failures=False, max_steps=steps, **l0)
        except InvalidInput as exc:
            raise InvalidInput(f"the check under {c.noise.text()}: {exc}") from None
        conditions.append((c.noise.text(), c.policy(rules, confidence), cspec, c))
    log(f"{k} noise conditions, each decided at {confidence:.4%} confidence (Bonferroni over the conditions)"
        if k > 1 else f"1 noise condition, decided at {confidence:.4%} confidence")
    done: list[tuple[str, GatePolicy, GateResult | None, NoiseCheck | None]] = []
    for label, pol, cspec, cond in conditions:
        if pol.early_stop and any(r is not None and r.decision == "fail" for _, _, r, _ in done):
            done.append((label, pol, None, cond))
            continue
        log(f"noise condition {len(done) + 1}/{k}: {label}")
        drop = pol.needs_baseline or cond is None
        r = run_gate(candidate, dataset, policy=pol, baseline=baseline if drop else None,
                     noise=cspec, data=data, options=options, log=log,
                     **{key: v for key, v in kwargs.items() if drop or not key.startswith("baseline")})
        done.append((label, pol, r, cond))
    return _combined(done, rules, k)


_RUN_KEYS = ("baseline_model", "baseline_sha256", "output", "progress", "status")


def _combined(done: list, rules: GatePolicy, k: int) -> GateResult:
    """One result from the conditions' results: their checks (named CHECK@NOISE for the noise checks), work and
    warnings added up, the verdict over all checks; ``conditions`` records each one."""
    ran = [r for _, _, r, _ in done if r is not None]
    first = ran[0]
    checks, looks, warnings, records = [], [], [], []
    nonfinite = {"clean": 0, "noisy": 0}
    for label, pol, r, c in done:
        if r is None:
            planned = [(key, key, float(getattr(c, key))) for key in ("min_robust", "min_class_robust",
                       "max_robust_drop", "max_failure_prob") if getattr(c, key) is not None]
            planned += [(f"min_robust_at[{steps}]", "min_robust_at", frac) for steps, frac in c.min_robust_at or ()]
            skipped = [Check(f"{n}@{label}", kind, threshold, math.nan, (math.nan, math.nan), "inconclusive", 0,
                             confidence=math.nan, stage="noise",
                             message=f"{n}@{label}: not evaluated, the gate had already failed under another noise")
                       for n, kind, threshold in planned]
            checks += skipped
            records.append({"noise": label, "noise_check": c is not None, "policy": asdict(pol), "decision": None,
                            "evaluated": False,
                            "checks": [x.name for x in skipped]})
            continue
        own = []
        for x in r.checks:
            if c is not None:
                new = f"{x.name}@{label}"
                if x.message.startswith(f"{x.name}:"):
                    x.message = new + x.message[len(x.name):]
                x.name = new
            own.append(x)
        checks += own
        looks += [{**look, "noise": label} for look in r.looks]
        warnings += [w if c is None else f"under {label}: {w}" for w in r.warnings]
        for key in nonfinite:
            nonfinite[key] += r.nonfinite[key]
        records.append({"noise": label, "noise_check": c is not None, "policy": asdict(pol),
                        "decision": r.decision, "evaluated": True,
                        "checks": [x.name for x in own], "images_evaluated": r.images_evaluated,
                        "inferences": r.inferences, "stopped_early": r.stopped_early, "stop_reason": r.stop_reason,
                        "throughput": r.throughput, "settings": r.settings})
    decision_word = decide(checks)
    skipped_any = any(r is None for _, _, r, _ in done)
    reasons = [f"{label}: {r.stop_reason}" for label, _, r, _ in done if r is not None and r.stopped_early]
    if skipped_any:
        reasons.append("a noise condition failed: the ones after it were not run")
    full = [r.inferences_full_estimate for r in ran]
    timing: dict = {}
    for r in ran:
        for who in ("candidate", "baseline"):
            if who in r.throughput:
                _add_timing(timing, who, r.throughput[who]["inferences"], r.throughput[who]["seconds"])
    return GateResult(
        decision=decision_word,
        passed=decision_word == "pass" or (decision_word == "inconclusive" and rules.inconclusive == "pass"),
        checks=checks, images=first.images, images_evaluated=max(r.images_evaluated for r in ran), looks=looks,
        inferences=sum(r.inferences for r in ran),
        inferences_full_estimate=None if skipped_any or any(f is None for f in full) else sum(full),
        stopped_early=bool(reasons), stop_reason="; ".join(reasons) if reasons else "every image evaluated",
        nonfinite=nonfinite, warnings=warnings, policy=replace(rules, confidence=rules.confidence),
        throughput=throughput_record(timing),
        candidate=first.candidate, baseline=next((r.baseline for r in ran if r.baseline), None),
        dataset=first.dataset,
        settings={**first.settings, "conditions": k, "confidence_per_condition": 1 - rules.alpha / k},
        conditions=records,
    )


def _gate_spec(policy: GatePolicy, spec: NoiseSpec, images: int, budget_given: bool, log) -> NoiseSpec:
    """The noise the checks need: a golden-set check sets the step budget and counts failures; every min_robust_at
    budget must lie within the step budget."""
    golden = plan_golden(policy, images)
    if golden is not None:
        if budget_given:
            raise InvalidInput("max_failure_prob sets the step budget (the steps at which an image never fooled "
                               f"clears it for each of the {images} images: {golden.steps}); leave out max_steps")
        spec = replace(spec, max_steps=golden.steps, count_failures=True)
        log(f"golden set: {golden.steps} steps per image, every step counted ({images} images, p <= "
            f"{golden.max_failure_prob:.2%} each at {1 - golden.alpha_side:.4%})")
    for steps, _ in policy.min_robust_at or ():
        if steps > spec.max_steps:
            raise InvalidInput(f"min_robust_at asks for the robust fraction at {steps} steps, beyond the step budget "
                               f"({spec.max_steps}); raise max_steps to {steps} or more")
    return spec


@dataclass(frozen=True)
class _Contestants:
    """The candidate's run plan and the baseline's: a plan of its model, or its saved (verified) outcome."""

    cand: RunPlan
    base: RunPlan | None = None
    base_saved: Outcome | None = None

    @property
    def has_baseline(self) -> bool:
        return self.base is not None or self.base_saved is not None


@dataclass
class _Stage:
    """What one stage of the gate found: its checks, its looks, the inferences it ran and what it warned of."""

    checks: list[Check] = field(default_factory=list)
    looks: list[dict] = field(default_factory=list)
    inferences: int = 0
    warnings: list[str] = field(default_factory=list)
    nonfinite: int = 0  # outputs that were NaN or infinite: clean images (clean stage) or noisy inputs
    nonfinite_clean: int = 0  # the noise stage's clean predictions, when there was no clean stage
    stop_reason: str | None = None  # set when the gate may stop after this stage
    images: int = 0  # images through the noise protocol
    info: dict = field(default_factory=dict)
    # per model ("candidate", "baseline"): [inferences, seconds] run by this stage, for the throughput record
    timing: dict = field(default_factory=dict)

    def timed(self, who: str, inferences: int, seconds: float) -> None:
        _add_timing(self.timing, who, inferences, seconds)


def _add_timing(timing: dict, who: str, inferences: int, seconds: float) -> None:
    """Add one model's inferences and seconds to a {model: [inferences, seconds]} tally."""
    row = timing.setdefault(who, [0, 0.0])
    row[0] += int(inferences)
    row[1] += float(seconds)


def _clean_stage(policy: GatePolicy, plan: GatePlan, m: _Contestants, log) -> _Stage:
    """The clean pass: one inference per image (per model) decides the accuracy checks in one look."""
    ds, cand, base = m.cand.dataset, m.cand, m.base
    out = _Stage()
    t = time.perf_counter()
    pred = clean_predictions(cand.model, ds, cand.noise, batch_size=cand.batch_size)
    out.timed("candidate", ds.n, time.perf_counter() - t)
    out.inferences += ds.n
    _refuse_all_nonfinite(pred, cand.model.path)
    out.nonfinite = int(np.count_nonzero(pred == NONFINITE))
    out.warnings += sanity_warnings(ds.labels, pred, model="the candidate")
    base_ok = None
    if base is not None:
        t = time.perf_counter()
        base_ok = clean_predictions(base.model, ds, base.noise, batch_size=base.batch_size) == ds.labels
        out.timed("baseline", ds.n, time.perf_counter() - t)
        out.inferences += ds.n
    elif m.base_saved is not None:
        base_ok = m.base_saved.first_failure != 0
    counts = [check_counts(s, labels=ds.labels, cand=pred == ds.labels, base=base_ok) for s in plan.clean]
    alphas = np.array([plan.clean_alpha])
    decision = SequentialDecision(plan.clean, alphas, family=policy.family)
    decision.look(counts)
    out.checks = checks_from(decision, plan.clean, alphas, "clean", counts, ds.n)
    out.looks.append({"look": 0, "stage": "clean", "images": ds.n, "inferences": out.inferences,
                      "confidence": 1 - plan.clean_alpha,
                      "undecided": [x.name for x in out.checks if x.verdict == "inconclusive"]})
    log(f"clean pass: {ds.n} images, accuracy checks " + ", ".join(f"{x.name} {x.verdict}" for x in out.checks))
    if policy.early_stop and any(x.verdict == "fail" for x in out.checks):
        out.stop_reason = "an accuracy check failed on the clean pass: no noise was needed"
    return out


def _noise_stage(policy: GatePolicy, plan: GatePlan, m: _Contestants, inferences_before: int, progress,
                 log, open_clean: tuple[str, ...] = ()) -> _Stage:
    """Noise looks for the checks that need noise, on images in a seeded random order, each look running only its
    new images, until the verdict can no longer change (with early stop) or every image is used."""
    ds, spec, cand, base = m.cand.dataset, m.cand.noise, m.cand, m.base
    total = ds.n
    out = _Stage()
    order = random_order(spec.seed, total)
    cand_state = RunState(total)
    base_state = RunState(total) if base is not None else None
    base_ff = m.base_saved.first_failure if m.base_saved is not None else None
    decision = SequentialDecision(plan.noise, plan.noise_alphas, family=policy.family)
    counts: list[tuple] = []

    def noise_inferences() -> int:
        return cand_state.inferences + (base_state.inferences if base_state is not None else 0)

    for k, n in enumerate(plan.noise_looks):
        pos = np.sort(order[out.images:n])
        t, before = time.perf_counter(), cand_state.inferences
        _, out.info = cand.execute(cand_state, positions=pos, progress=progress)
        out.timed("candidate", cand_state.inferences - before, time.perf_counter() - t)
        if base is not None and base_state is not None:
            t, before = time.perf_counter(), base_state.inferences
            base.execute(base_state, positions=pos)
            out.timed("baseline", base_state.inferences - before, time.perf_counter() - t)
            base_ff = base_state.first_failure
        out.images = n
        seen = np.sort(order[:n])
        if k == 0:
            _refuse_all_nonfinite(cand_state.clean_prediction[seen], cand.model.path)
            if not plan.clean:  # no clean pass: the first look's clean predictions are checked instead
                out.warnings += sanity_warnings(ds.labels[seen], cand_state.clean_prediction[seen],
                                                model="the candidate")
        ff_seen = cand_state.first_failure[seen]
        base_robust = None if base_ff is None else base_ff[seen] == ROBUST
        among = ff_seen != 0 if policy.robust_of == "correct" else None
        counts = [check_counts(s, labels=ds.labels[seen], cand=_flags(s, ff_seen), base=base_robust, among=among)
                  for s in plan.noise]
        if plan.noise:
            decision.look(counts)
        golden = None
        if plan.golden is not None:
            mask = np.zeros(total, np.bool_)
            mask[seen] = True
            golden = golden_check(plan.golden, cand_state.first_failure, cand_state.failures, mask, n)
        undecided = [s.name for j, s in enumerate(plan.noise) if decision.verdict[0, j] == 0]
        if golden is not None and golden.verdict == "inconclusive":
            undecided.append(golden.name)
        out.looks.append({"look": k + 1, "stage": "noise", "images": n,
                          "inferences": inferences_before + noise_inferences(),
                          "confidence": float(1 - plan.noise_alphas[k]), "undecided": undecided})
        log(f"look {k + 1}/{len(plan.noise_looks)}: {n} of {total} images; "
            + (f"undecided: {', '.join(undecided)}" if undecided else "every noise check decided")
            + (f" (left inconclusive on the clean pass: {', '.join(open_clean)})" if open_clean else ""))
        failed = bool(any(decision.verdict[0] == FAIL)) or (golden is not None and golden.verdict == "fail")
        settled = (not plan.noise or bool(decision.stopped[0])) and (golden is None or golden.verdict != "inconclusive")
        if policy.early_stop and (failed or settled) and n < total:
            out.stop_reason = (f"a check failed at look {k + 1}: the verdict cannot change" if failed
                               else f"every check was decided at look {k + 1}")
            break
    out.inferences = noise_inferences()
    seen = np.sort(order[:out.images])
    cand_clean, cand_flab = cand_state.clean_prediction[seen], cand_state.failure_label[seen]
    out.nonfinite = int(np.count_nonzero((cand_clean != NONFINITE) & (cand_flab == NONFINITE)))
    out.nonfinite_clean = int(np.count_nonzero(cand_clean == NONFINITE))
    out.checks = checks_from(decision, plan.noise, plan.noise_alphas, "noise", counts, total) if plan.noise else []
    if policy.robust_of == "correct":
        for c in out.checks:
            if c.kind in ("min_robust", "min_class_robust", "min_robust_at"):
                c.message += " (a share of the correctly classified images)"
    if golden is not None:
        out.checks.append(golden)
    return out


def _flags(spec, ff: np.ndarray) -> np.ndarray:
    """Per image: robust (never fooled), or for min_robust_at[t] not fooled within t steps (and right before)."""
    if spec.kind == "min_robust_at":
        return (ff != 0) & robust_at(ff, bracketed(spec))
    return ff == ROBUST


def _not_evaluated(plan: GatePlan) -> _Stage:
    """The noise checks of a gate that already failed on the clean pass."""
    specs = [(s.name, s.kind, s.threshold) for s in plan.noise]
    if plan.golden is not None:
        specs.append(("max_failure_prob", "max_failure_prob", plan.golden.max_failure_prob))
    return _Stage(checks=[Check(name, kind, threshold, math.nan, (math.nan, math.nan), "inconclusive", 0,
                                confidence=math.nan, stage="noise",
                                message=f"{name}: not evaluated, the gate had already failed on the clean pass")
                          for name, kind, threshold in specs])


def _decide(policy: GatePolicy, m: _Contestants, base_info: dict | None, dataset: dict, progress,
            log) -> GateResult:
    """The clean stage, then the noise stage unless the clean stage settled the gate; one result from both."""
    ds, spec, total = m.cand.dataset, m.cand.noise, m.cand.dataset.n
    plan = plan_gate(policy, total, np.unique(ds.labels), baseline=m.has_baseline)
    t0 = time.perf_counter()
    clean = _clean_stage(policy, plan, m, log) if plan.clean else _Stage()
    for c in clean.checks:
        c.seconds = time.perf_counter() - t0
    failed_early = clean.stop_reason is not None
    if not plan.needs_noise:
        noise = _Stage()
    elif failed_early:
        noise = _not_evaluated(plan)
    else:
        t1 = time.perf_counter()
        noise = _noise_stage(policy, plan, m, clean.inferences, progress, log,
                             tuple(c.name for c in clean.checks if c.verdict == "inconclusive"))
        for c in noise.checks:
            c.seconds = time.perf_counter() - t1
    nonfinite = {"clean": clean.nonfinite if plan.clean else noise.nonfinite_clean, "noisy": noise.nonfinite}
    warns = clean.warnings + noise.warnings
    if nonfinite["clean"] or nonfinite["noisy"]:
        warns.append(f"the candidate returned NaN or infinite outputs for {nonfinite['clean']} clean image(s) and "
                     f"{nonfinite['noisy']} noisy input(s); they count as wrong / fooled")
    stopped_early = failed_early or (plan.needs_noise and noise.images < total)
    # The work of the same gate without early stop; unknown when no noise look ran (the clean pass failed).
    per_image_noise = noise.inferences / max(noise.images, 1)
    full = None if failed_early and plan.needs_noise else \
        (total * (1 + (m.base is not None)) if plan.clean else 0) + int(round(per_image_noise * total))
    checks = clean.checks + noise.checks
    decision_word = decide(checks)
    timing: dict = {}
    for stage in (clean, noise):
        for who, (n, s) in stage.timing.items():
            _add_timing(timing, who, n, s)
    stop_reason = clean.stop_reason or noise.stop_reason or "every image evaluated"
    return GateResult(
        decision=decision_word,
        passed=decision_word == "pass" or (decision_word == "inconclusive" and policy.inconclusive == "pass"),
        checks=checks, images=total, images_evaluated=noise.images, looks=clean.looks + noise.looks,
        inferences=clean.inferences + noise.inferences, inferences_full_estimate=full,
        stopped_early=stopped_early, stop_reason=stop_reason if stopped_early else "every image evaluated",
        nonfinite=nonfinite, warnings=warns, policy=policy, throughput=throughput_record(timing),
        candidate=_model_info(m.cand.model), baseline=base_info,
        dataset={**dataset, "count": total, "sha256": ds.sha256, "source": ds.source},
        settings={"noise": spec.to_dict(), **m.cand.settings(noise.info), "looks_planned": plan.noise_looks,
                  "alpha_per_look": [float(a) for a in plan.noise_alphas],
                  "clean_alpha": plan.clean_alpha, "order_seed": spec.seed,
                  "golden": None if plan.golden is None else asdict(plan.golden)},
    )


def throughput_record(timing: dict) -> dict:
    """Inferences per second of each model over the same images, settings and threads (the clean pass and the noise
    looks, noise kernels included), and the candidate's against the baseline's: what a quantised or fp16 variant
    buys. Null where a model ran nothing or too briefly to time."""
    out: dict = {}
    for who in ("candidate", "baseline"):
        if who in timing:
            n, s = timing[who]
            out[who] = {"inferences": n, "seconds": round(s, 4), "inferences_per_second": n / s if s > 0 else None}
    c, b = out.get("candidate"), out.get("baseline")
    out["candidate_vs_baseline"] = (c["inferences_per_second"] / b["inferences_per_second"]
                                    if c and b and c["inferences_per_second"] and b["inferences_per_second"] else None)
    return out


def _refuse_all_nonfinite(pred: np.ndarray, path) -> None:
    if pred.size and bool(np.all(pred == NONFINITE)):
        raise NonFiniteModel(f"{path}: every output of the model is NaN or infinite ({pred.size} images); it cannot be "
                         "gated. Check the model's export and its expected input range and normalisation")


def _saved_baseline(folder: Path, ds: Dataset, spec: NoiseSpec) -> RunRecord:
    """A baseline's saved results, usable only for the same images, data and noise as this gate's."""
    record = load_results(folder)
    here = fingerprint(model_sha256="", dataset_sha256=ds.sha256, count=ds.n, spec=spec.to_dict())
    diffs = differences(record.fingerprint, here, compare=("data", "noise"), ignore=PAIRING_IGNORES)
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
