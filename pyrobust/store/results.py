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
from pyrobust.stats import survival_curve, wilson_interval
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome, RunRecord

SCHEMA_VERSION = 2  # 2: the noise settings have their own block, apart from the run settings
READABLE_SCHEMAS = (1, 2)
RESULTS_FILE = "results.npz"
SUMMARY_FILE = "summary.json"


# Files a pyrobust run writes; an output folder holding any of them belongs to a run.
REPORT_FILES = ("survival.png", "per_class.png", "examples.png", "failure.png")  # drawn by pyrobust.report
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


def build_summary(outcome: Outcome, *, spec: NoiseSpec, model: dict, dataset: dict, settings: dict,
                  n_classes: int) -> dict:
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
    # Inferences the protocol needs: the clean pass, then steps up to the first failure (or all of them). Step
    # packing may run more (steps past a failure, scored in the same batch); they change no result.
    useful = int(n + np.where(ff > 0, ff, 0).sum() + spec.max_steps * n_robust)
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
        "survival": {"steps": list(range(spec.max_steps + 1)), "fraction": [float(v) for v in curve]},
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


def write_results(out: Path, outcome: Outcome, summary: dict) -> None:
    """Write the per-image arrays, then the summary (the completion marker)."""
    with atomic_path(out / RESULTS_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{name: getattr(outcome, name) for name in Outcome.ARRAYS})
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
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: unreadable results ({exc}); rerun the evaluation") from None
    version = summary.get("schema_version") if isinstance(summary, dict) else None
    if version not in READABLE_SCHEMAS or isinstance(version, bool):
        raise DataError(f"{p}: summary schema_version {version!r}; this pyrobust reads "
                        f"{' and '.join(map(str, READABLE_SCHEMAS))}")
    perf = summary.get("performance", {}) if isinstance(summary, dict) else {}
    outcome = Outcome(**arrays, inferences=_count(perf.get("inferences", 0)),
                      noisy_inferences=_count(perf.get("noisy_inferences", 0)),
                      seconds=float(perf.get("seconds", 0.0)) if isinstance(perf.get("seconds", 0.0), (int, float))
                      else 0.0)
    spec = check_record(outcome, summary, p)
    return RunRecord(outcome=outcome, noise=spec, model=summary["model"], dataset=summary["dataset"],
                     summary=summary, folder=p)


def _count(v) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


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
    check_outcome_arrays(arrays, spec.max_steps, str(where / RESULTS_FILE))
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
