"""The result format: per-image arrays in ``results.npz`` and the schema-versioned ``summary.json``.

Every file is written atomically (temporary file, flush, fsync, rename), and ``summary.json`` is written last: a
folder holding ``results.npz`` without ``summary.json`` is an unfinished run."""

from __future__ import annotations

import io
import json
import os
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import class_names
from pyrobust.errors import DataError, InvalidInput
from pyrobust.files import atomic_path, read_run_file, write_json_atomic
from pyrobust.machine import versions
from pyrobust.stats import (
    auc_interval,
    failure_interval,
    failure_probability,
    survival_bands,
    survival_curve,
    wilson_interval,
)
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome, RunRecord

SCHEMA_VERSION = 2  # 2: the noise settings have their own block, apart from the run settings
READABLE_SCHEMAS = (1, 2)
RESULTS_FILE = "results.npz"
SUMMARY_FILE = "summary.json"


# Files a pyrobust run writes; an output folder holding any of them belongs to a run.
# drawn by pyrobust.report
REPORT_FILES = ("survival.png", "per_class.png", "examples.png", "failure.png", "failure_probability.png")
RUN_FILES = (RESULTS_FILE, SUMMARY_FILE, *REPORT_FILES)
MANY_CLASSES = 1000


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"count": int(k), "of": int(n), "fraction": (k / n) if n else None, "ci95": [lo, hi]}


CHANCE_FACTOR = 2.0  # accuracy below this many times chance looks like a mistake, not a bad model
SANITY_MIN_IMAGES = 20


def sanity_warnings(labels: np.ndarray, clean_prediction: np.ndarray, *, model: str = "the model") -> list[str]:
    """Warnings for results that look like a mistake rather than a measurement: most clean predictions name classes
    the labels never use, or the accuracy is near chance. Each names the likely causes and the options that fix
    them. Silent wrong numbers are the worst failure, so these are never dropped."""
    out: list[str] = []
    n = int(labels.size)
    if n < SANITY_MIN_IMAGES:
        return out
    k = int(np.unique(labels).size)
    top = int(labels.max()) + 1
    outside = int(np.count_nonzero(clean_prediction >= top))
    if outside > n / 2:
        out.append(f"{outside} of {n} clean predictions ({outside / n:.0%}) are classes >= {top}, which the labels "
                   f"never use: {model} may score another label set (wrong dataset), or the scores come from the "
                   "wrong output (pass --output NAME)")
    acc = float(np.mean(clean_prediction == labels))
    if k >= 2 and acc < CHANCE_FACTOR / k:
        out.append(f"accuracy {acc:.1%} is near chance ({1 / k:.1%} for {k} classes): {model} probably gets other "
                   "input than it was trained on. Check the pixel range (--pixel-range 0,255 for a model that "
                   "divides by 255 inside), the normalisation (--mean/--std), the scores output (--output) and the "
                   "dataset")
    return out


def noise_of(summary: dict) -> NoiseSpec:
    """The noise a summary records: its ``noise`` block (schema 2), or the noise fields of its settings (schema 1)."""
    return NoiseSpec.from_dict(summary["noise"] if summary.get("schema_version", SCHEMA_VERSION) >= 2
                               else summary["settings"])


INTERVAL_CONFIDENCE = 0.95
FRAGILE_LISTED = 20
HISTOGRAM_EDGES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def per_image_block(outcome: Outcome, max_steps: int, confidence: float = INTERVAL_CONFIDENCE) -> dict:
    """What summary.json says of the per-image failure probabilities: how they were measured, their histogram, the
    bound every never-fooled image gets, and the most fragile images with their exact intervals."""
    counted = outcome.failures is not None
    p = failure_probability(outcome.first_failure, outcome.failures, max_steps)
    lo, hi = failure_interval(outcome.first_failure, outcome.failures, max_steps, confidence)
    _, upper = failure_interval(outcome.first_failure, outcome.failures, max_steps, confidence, side="upper")
    ok = ~np.isnan(p)
    hist, _ = np.histogram(p[ok], bins=np.asarray(HISTOGRAM_EDGES))
    order = np.lexsort((outcome.index[ok], -p[ok]))[:FRAGILE_LISTED]
    where = np.flatnonzero(ok)[order]
    return {
        "method": "failure counts, clopper-pearson" if counted else "first-failure step, exact geometric",
        "probes_per_image": int(max_steps),
        "confidence": confidence,
        "images": int(ok.sum()),
        "mean": float(p[ok].mean()) if ok.any() else None,
        "median": float(np.median(p[ok])) if ok.any() else None,
        "never_failed_upper_bound": float(-np.expm1(np.log(1 - confidence) / max_steps)),
        "histogram": {"edges": list(HISTOGRAM_EDGES), "counts": [int(v) for v in hist]},
        "most_fragile": [{"index": int(outcome.index[i]), "p_hat": float(p[i]),
                          "interval": [float(lo[i]), float(hi[i])], "upper_bound": float(upper[i]),
                          **({"failures": int(outcome.failures[i])} if counted and outcome.failures is not None
                             else {"first_failure": int(outcome.first_failure[i])})}
                         for i in where if p[i] > 0],
    }


def severity_block(outcome: Outcome, spec: NoiseSpec, shape: tuple[int, int, int] | None) -> dict:
    """What summary.json says of a severity sweep: each level's setting (for images of ``shape``), how many images
    first failed at it, and how many survived every level."""
    from perturbcore.families import Sweep

    assert isinstance(spec.corruption, Sweep)
    ff = outcome.first_failure
    levels = []
    for s in range(1, spec.max_steps + 1):
        levels.append({"severity": s, "first_failing": int(np.count_nonzero(ff == s)),
                       **({"setting": spec.corruption.describe_level(s, shape)} if shape is not None else {})})
    return {"what": "step s is severity s of the family's ladder; an image's first-failure step is its first "
                    "failing severity",
            "levels": levels, "survive_all": int(np.count_nonzero(ff == ROBUST)),
            "correct": int(np.count_nonzero(ff != 0))}


def margin_block(outcome: Outcome, confidence: float = INTERVAL_CONFIDENCE) -> dict | None:
    """How well the clean margin (one forward pass) predicts the robust flag among correctly classified images:
    the AUC with DeLong's interval. None when the margins were not recorded."""
    if outcome.clean_margin is None or np.all(np.isnan(outcome.clean_margin)):
        return None
    ok = outcome.correct & ~np.isnan(outcome.clean_margin)
    margin, robust = outcome.clean_margin[ok], outcome.robust[ok]
    auc, lo, hi = auc_interval(margin, robust, confidence)

    def med(a: np.ndarray) -> float | None:  # JSON has no infinity (a one-class model's margins are +inf)
        v = float(np.median(a)) if a.size else None
        return v if v is not None and np.isfinite(v) else None

    return {"what": "clean score of the label minus the best other score; AUC: how well it tells robust from "
                    "fooled among correctly classified images",
            "auc": None if np.isnan(auc) else auc, "interval": None if np.isnan(auc) else [lo, hi],
            "confidence": confidence, "images": int(ok.sum()),
            "median_robust": med(margin[robust]), "median_fooled": med(margin[~robust])}


def build_summary(outcome: Outcome, *, spec: NoiseSpec, model: dict, dataset: dict, settings: dict,
                  n_classes: int, image_shape: tuple[int, int, int] | None = None) -> dict:
    """Everything a reader needs about one evaluation, computed from the per-image arrays."""
    ff, y = outcome.first_failure, outcome.label
    n = outcome.n
    correct = ff != 0
    robust = ff == ROBUST
    n_correct, n_robust = int(correct.sum()), int(robust.sum())
    nonfinite = int((outcome.failure_label == NONFINITE).sum())
    top = int(y.max()) + 1 if n else 0
    outside = int(np.count_nonzero(outcome.clean_prediction >= top)) if n else 0
    curve = survival_curve(ff, spec.max_steps)
    fooled_steps = ff[ff > 0]
    per_class = []
    names = class_names(dataset.get("name", ""), n_classes, dataset.get("classes"))
    images_k = np.bincount(y, minlength=n_classes)
    correct_k = np.bincount(y[correct], minlength=n_classes)
    robust_k = np.bincount(y[robust], minlength=n_classes)
    # Every class up to MANY_CLASSES; beyond (labels up to 99,999, say) only the classes that have images, so the
    # summary's size follows the data, not the largest label.
    listed = range(n_classes) if n_classes <= MANY_CLASSES else np.flatnonzero(images_k)
    for k in listed:
        k = int(k)
        nk, ck, rk = int(images_k[k]), int(correct_k[k]), int(robust_k[k])
        per_class.append({
            "class": k, "name": names[k], "images": nk, "correct": ck, "robust": rk,
            "fooled": ck - rk,
            "accuracy": ck / nk if nk else None,
            "robust_rate": rk / nk if nk else None,
            "robust_rate_ci95": list(wilson_interval(rk, nk)),
            "robust_rate_of_correct": rk / ck if ck else None,
        })
    secs = outcome.seconds
    # Inferences the protocol needs: the clean pass, then steps up to the first failure (or all of them; all of them
    # for every correctly classified image when counting failures). Step
    # packing may run more (steps past a failure, scored in the same batch); they change no result.
    useful = int(n + spec.max_steps * n_correct) if spec.count_failures else \
        int(n + np.where(ff > 0, ff, 0).sum() + spec.max_steps * n_robust)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "dataset": {**dataset, "count": n},
        "noise": spec.to_dict(),
        "settings": settings,
        "metrics": {
            "images": n,
            "accuracy": _rate(n_correct, n),
            "robust": _rate(n_robust, n),
            "robust_of_correct": _rate(n_robust, n_correct),
            "fooled": int(n_correct - n_robust),
            "wrong_before_noise": int(n - n_correct),
            "nonfinite_outputs": nonfinite,
            # legal (a 1000-class model on a 10-class subset) but counted: many of them suggest a mistake
            "predictions_outside_labels": outside,
            "first_failure_step": {
                "mean": float(fooled_steps.mean()) if fooled_steps.size else None,
                "median": float(np.median(fooled_steps)) if fooled_steps.size else None,
            },
        },
        "survival": {"steps": list(range(spec.max_steps + 1)), "fraction": [float(v) for v in curve],
                     "bands": survival_bands(ff, spec.max_steps, INTERVAL_CONFIDENCE)},
        "failure_probability": None if spec.is_sweep else per_image_block(outcome, spec.max_steps),
        "severity": severity_block(outcome, spec, image_shape) if spec.is_sweep else None,
        "clean_margin": margin_block(outcome),
        "per_class": per_class,
        "performance": {
            "inferences": int(outcome.inferences),
            "noisy_inferences": int(outcome.noisy_inferences),
            "seconds": float(secs),
            "inferences_per_second": float(outcome.inferences / secs) if secs > 0 else None,
            "useful_inferences": useful,
            "useful_inferences_per_second": float(useful / secs) if secs > 0 else None,
        },
        "warnings": sanity_warnings(y, outcome.clean_prediction, model=f"the model ({model.get('name', '?')})"),
        "versions": versions(),
    }


def run_files(folder: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The files of a pyrobust run present in ``folder``."""
    return [f for f in (*RUN_FILES, *extra) if (folder / f).exists()]


def clear_run_files(folder: Path, extra: tuple[str, ...] = ()) -> None:
    """Remove a previous run's files; the summary (the completion marker) goes first, so nothing half-new passes
    for complete at any moment."""
    for f in (SUMMARY_FILE, *RUN_FILES, *extra):
        (folder / f).unlink(missing_ok=True)


def result_arrays(outcome: Outcome, max_steps: int, *, sweep: bool = False) -> dict:
    """The arrays of ``results.npz``: the per-image outcome, the failure counts (runs that counted them), the clean
    margins, and each image's p̂ with its exact 95 % interval (derived, for readers of the file; pyrobust recomputes
    them on reading and refuses a file where they disagree). A severity sweep (``sweep``) has no p̂: nothing in it
    is random."""
    arrays = {name: getattr(outcome, name) for name in Outcome.ARRAYS}
    for name in Outcome.OPTIONAL:
        if getattr(outcome, name) is not None:
            arrays[name] = getattr(outcome, name)
    if sweep:
        return arrays
    arrays["failure_probability"] = failure_probability(outcome.first_failure, outcome.failures, max_steps)
    arrays["failure_low"], arrays["failure_high"] = failure_interval(outcome.first_failure, outcome.failures,
                                                                     max_steps, INTERVAL_CONFIDENCE)
    return arrays


DERIVED = ("failure_probability", "failure_low", "failure_high")


def write_results(out: Path, outcome: Outcome, summary: dict) -> None:
    """Write the per-image arrays, then the summary (the completion marker)."""
    max_steps = int(summary["noise"]["max_steps"])
    sweep = NoiseSpec.from_dict(summary["noise"]).is_sweep
    with atomic_path(out / RESULTS_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **result_arrays(outcome, max_steps, sweep=sweep))
    write_json_atomic(out / SUMMARY_FILE, summary)


def load_results(folder: str | os.PathLike) -> RunRecord:
    """Read a finished run back, checked as strictly as input: a :class:`~pyrobust.types.RunRecord` (which also
    unpacks as ``outcome, summary``)."""
    p = Path(folder)
    if not os.path.lexists(p / SUMMARY_FILE):
        unfinished = os.path.lexists(p / RESULTS_FILE)
        state = "an unfinished run (no summary.json)" if unfinished else "not a pyrobust results folder"
        raise DataError(f"{p}: {state}; run pyrobust evaluate --out {p}")
    summary_bytes = read_run_file(p / SUMMARY_FILE, what="summary", max_bytes=256 * 2**20)
    results_bytes = read_run_file(p / RESULTS_FILE, what="results file")
    try:
        summary = json.loads(summary_bytes.decode())
        with np.load(io.BytesIO(results_bytes), allow_pickle=False) as z:
            arrays = {name: z[name] for name in Outcome.ARRAYS}
            extra = {name: z[name] for name in (*Outcome.OPTIONAL, *DERIVED) if name in z.files}
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: unreadable results ({exc}); rerun the evaluation") from None
    version = summary.get("schema_version") if isinstance(summary, dict) else None
    if version not in READABLE_SCHEMAS or isinstance(version, bool):
        raise DataError(f"{p}: summary schema_version {version!r}; this pyrobust reads "
                        f"{' and '.join(map(str, READABLE_SCHEMAS))}")
    perf = summary.get("performance", {}) if isinstance(summary, dict) else {}
    optional: dict = {name: extra.get(name) for name in Outcome.OPTIONAL}
    outcome = Outcome(**arrays, **optional, inferences=_count(perf.get("inferences", 0)),
                      noisy_inferences=_count(perf.get("noisy_inferences", 0)),
                      seconds=float(perf.get("seconds", 0.0)) if isinstance(perf.get("seconds", 0.0), (int, float))
                      else 0.0)
    spec = check_record(outcome, summary, p)
    check_derived(outcome, {k: v for k, v in extra.items() if k in DERIVED}, spec.max_steps, p / RESULTS_FILE,
                  sweep=spec.is_sweep)
    return RunRecord(outcome=outcome, noise=spec, model=summary["model"], dataset=summary["dataset"],
                     summary=summary, folder=p)


def _count(v) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def check_margins(margin, n: int, where: str) -> None:
    """Clean margins read back: a float array with one entry per image."""
    if not isinstance(margin, np.ndarray) or margin.dtype.kind != "f" or margin.shape != (n,):
        raise DataError(f"{where}: 'clean_margin' is not a float array of {n} entries; the file is damaged or was "
                        "not written by pyrobust")


def check_derived(outcome: Outcome, derived: dict, max_steps: int, where, *, sweep: bool = False) -> None:
    """The p̂ and intervals stored beside the counts must be the ones the counts give (and a severity sweep has
    none)."""
    if sweep and derived:
        raise DataError(f"{where}: '{sorted(derived)[0]}' in a severity sweep, which has no failure probabilities; "
                        "the file is damaged or was altered. Rerun the evaluation")
    if not derived:
        return
    want = result_arrays(outcome, max_steps)
    for name, arr in derived.items():
        if not isinstance(arr, np.ndarray) or arr.shape != want[name].shape or \
                not np.allclose(arr.astype(np.float64, copy=False), want[name], rtol=1e-9, atol=1e-12,
                                equal_nan=True):
            raise DataError(f"{where}: '{name}' is not what the failure counts give; the file is damaged or was "
                            "altered. Rerun the evaluation")


def check_outcome_arrays(arrays: dict, max_steps: int, where: str) -> None:
    """Per-image arrays as pyrobust writes them, checked as strictly as input: shapes, types, ranges, sentinels and
    their consistency (a crafted or damaged file is refused, never reported)."""
    def bad(what: str) -> DataError:
        return DataError(f"{where}: {what}; the file is damaged or was not written by pyrobust")

    n = None
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iub":
            raise bad(f"'{name}' is not a 1-D integer array")
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise bad(f"'{name}' holds {arr.shape[0]} entries, not {n}")
    ff = arrays.get("first_failure")
    if ff is not None and ff.size:
        if ff.min() < ROBUST or ff.max() > max_steps:
            raise bad(f"first-failure steps outside [-1, {max_steps}] (max_steps)")
        fl = arrays.get("failure_label")
        if fl is not None and (np.any((ff == ROBUST) != (fl == ROBUST)) or fl.min() < NONFINITE):
            raise bad("failure labels do not match the first-failure steps")
        cp = arrays.get("clean_prediction")
        label = arrays.get("label")
        if cp is not None and cp.size and cp.min() < NONFINITE:
            raise bad("clean predictions below -2")
        if cp is not None and label is not None and "done" not in arrays and \
                np.any((ff == 0) != (cp != label)):
            raise bad("clean predictions do not match the steps (wrong before noise exactly when step 0)")
    failures = arrays.get("failures")
    if failures is not None and ff is not None and failures.size:
        if failures.min() < 0 or failures.max() > max_steps:
            raise bad(f"failure counts outside [0, {max_steps}] (max_steps)")
        if np.any((failures > 0) != (ff > 0)):
            raise bad("failure counts do not match the first-failure steps (an image fails at least once exactly "
                      "when it has a first-failure step)")
        if np.any(failures > np.where(ff > 0, max_steps - ff + 1, 0)):
            raise bad("more failures than steps from the first failure on")
    for name in ("index", "label"):
        arr = arrays.get(name)
        if arr is not None and arr.size and arr.min() < 0:
            raise bad(f"negative '{name}' values")
    index = arrays.get("index")
    if index is not None and np.unique(index).size != index.size:
        raise bad("repeated image indices")


def check_record(outcome: Outcome, summary, where: Path) -> NoiseSpec:
    """A results folder read back: the summary's settings are valid, and every count it states is the one its
    arrays give."""
    def bad(what: str) -> DataError:
        return DataError(f"{where / SUMMARY_FILE}: {what}; the folder is damaged or was not written by pyrobust")

    if not isinstance(summary, dict):
        raise bad("not a JSON object")
    try:
        spec = noise_of(summary)
        model, dataset, metrics, per_class = (summary["model"], summary["dataset"], summary["metrics"],
                                              summary["per_class"])
    except (KeyError, TypeError) as exc:
        raise bad(f"missing or malformed field {exc}") from None
    except InvalidInput as exc:
        raise bad(f"invalid noise settings ({exc})") from None
    if not isinstance(model, dict) or not isinstance(dataset, dict):
        raise bad("'model' and 'dataset' are not JSON objects")
    for what, value in (("model SHA-256", model.get("sha256") if isinstance(model, dict) else None),
                        ("dataset SHA-256", dataset.get("sha256") if isinstance(dataset, dict) else None)):
        if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise bad(f"{what} is not a SHA-256 hex digest")
    arrays = {name: getattr(outcome, name) for name in Outcome.ARRAYS}
    if outcome.failures is not None:
        arrays["failures"] = outcome.failures
    if spec.count_failures != (outcome.failures is not None):
        raise bad("the settings say failures were counted but results.npz has no counts" if spec.count_failures
                  else "results.npz has failure counts but the settings say none were counted")
    check_outcome_arrays(arrays, spec.max_steps, str(where / RESULTS_FILE))
    if outcome.clean_margin is not None:
        check_margins(outcome.clean_margin, outcome.n, str(where / RESULTS_FILE))
    n = outcome.n
    try:
        stated = (dataset["count"], metrics["images"], metrics["robust"]["count"], metrics["accuracy"]["count"])
        rows = [(r["class"], r["images"], r["correct"], r["robust"]) for r in per_class]
    except (KeyError, TypeError) as exc:
        raise bad(f"missing or malformed field {exc}") from None
    actual = (n, n, int(outcome.robust.sum()), int(outcome.correct.sum()))
    if stated != actual:
        raise bad(f"its counts {stated} are not those of results.npz {actual}")
    for k, images, correct, robust in rows:
        sel = outcome.label == k
        if (images, correct, robust) != (int(sel.sum()), int((outcome.correct & sel).sum()),
                                          int((outcome.robust & sel).sum())):
            raise bad(f"the counts of class {k!r} are not those of results.npz")
    return spec
