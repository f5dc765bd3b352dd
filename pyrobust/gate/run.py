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
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import Dataset
from pyrobust.data.images import parse_resize
from pyrobust.engine.loop import clean_predictions
from pyrobust.engine.plan import RunPlan, load_data, plan_run, split_settings
from pyrobust.engine.runtime import BoundModel
from pyrobust.errors import InvalidInput, NonFiniteModel
from pyrobust.gate.policy import Check, GatePolicy, GateResult, check_counts, checks_from, decide, plan_gate
from pyrobust.sequential import (
    FAIL,
    SequentialDecision,
    random_order,
)
from pyrobust.store.results import load_results, sanity_warnings
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome, RunRecord, RunState, differences, fingerprint


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
        checks += checks_from(clean_decision, plan.clean, alphas, "clean", clean_counts, total)
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
        checks += checks_from(decision, plan.noise, plan.noise_alphas, "noise", counts, total)
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
