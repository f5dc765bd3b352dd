"""The result format: per-image arrays in ``results.npz`` and the schema-versioned ``summary.json``.

Every file is written atomically (temporary file, flush, fsync, rename), and ``summary.json`` is written last: a
folder holding ``results.npz`` without ``summary.json`` is an unfinished run.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import zipfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from pyrobust.errors import DataError, OutputError
from pyrobust.files import read_bounded
from pyrobust.stats import survival_curve, wilson_interval
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome

SCHEMA_VERSION = 1
RESULTS_FILE = "results.npz"
SUMMARY_FILE = "summary.json"
# Files a pyrobust run writes; an output folder holding any of them belongs to a run.
RUN_FILES = (RESULTS_FILE, SUMMARY_FILE, "survival.png", "per_class.png", "examples.png", "failure.png")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def class_names(dataset_name: str, n_classes: int) -> list[str]:
    if dataset_name.startswith("fashion-mnist") and n_classes <= len(FASHION_CLASSES):
        return list(FASHION_CLASSES[:n_classes])
    return [str(k) for k in range(n_classes)]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("pyrobust", "numpy", "numba", "onnxruntime", "onnx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"count": int(k), "of": int(n), "fraction": (k / n) if n else None, "ci95": [lo, hi]}


def build_summary(outcome: Outcome, *, spec: NoiseSpec, model: dict, dataset: dict, settings: dict,
                  n_classes: int) -> dict:
    """Everything a reader needs about one evaluation, computed from the per-image arrays."""
    ff, y = outcome.first_failure, outcome.label
    n = outcome.n
    correct = ff != 0
    robust = ff == ROBUST
    n_correct, n_robust = int(correct.sum()), int(robust.sum())
    nonfinite = int((outcome.failure_label == NONFINITE).sum())
    curve = survival_curve(ff, spec.max_steps)
    fooled_steps = ff[ff > 0]
    per_class = []
    names = class_names(dataset.get("name", ""), n_classes)
    for k in range(n_classes):
        sel = y == k
        nk, ck, rk = int(sel.sum()), int((correct & sel).sum()), int((robust & sel).sum())
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
        "settings": {**spec.to_dict(), **settings},
        "metrics": {
            "images": n,
            "accuracy": _rate(n_correct, n),
            "robust": _rate(n_robust, n),
            "robust_of_correct": _rate(n_robust, n_correct),
            "fooled": int(n_correct - n_robust),
            "wrong_before_noise": int(n - n_correct),
            "nonfinite_outputs": nonfinite,
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
        "versions": versions(),
    }


# ------------------------------------------------------------------------------------------------ atomic files
@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it is flushed to disk and renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MAX_RUN_FILE_BYTES = 2 * 2**30  # results of 50 M images; anything larger in a run folder is not ours


def read_run_file(path: Path, *, what: str, max_bytes: int = MAX_RUN_FILE_BYTES) -> bytes:
    """The bytes of a file inside a run folder, read as untrusted input: never through a symbolic link, only from a
    regular file (a FIFO or a device would hang or never end), and only up to ``max_bytes``."""
    return read_bounded(path, what=what, max_bytes=max_bytes, follow_symlinks=False,
                        hint=" (more than a run writes)")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def make_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check it can be written."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: exists and is not a folder; choose another --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"{p}: cannot write there ({exc.strerror}); choose a writable --out") from None
    return p


def check_output_file(path: Path, what: str, *, create_parent: bool = True) -> None:
    """Before any work: ``path`` can be written as a file (its folder exists, or is created, and takes a file; the
    path itself is not a folder)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {p}: is a folder; give a file name")
    parent = p.parent
    try:
        if create_parent:
            parent.mkdir(parents=True, exist_ok=True)
        elif not parent.is_dir():
            raise OutputError(f"{what} {p}: its folder {parent} does not exist")
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"{what} {p}: cannot write there ({exc.strerror})") from None


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


def load_results(folder: str | os.PathLike) -> tuple[Outcome, dict]:
    """Read a finished run's per-image arrays and summary."""
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
    if summary.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{p}: summary schema_version {summary.get('schema_version')!r}; this pyrobust reads "
                        f"{SCHEMA_VERSION}")
    perf = summary.get("performance", {})
    outcome = Outcome(**arrays, inferences=perf.get("inferences", 0), noisy_inferences=perf.get("noisy_inferences", 0),
                      seconds=perf.get("seconds", 0.0))
    return outcome, summary
