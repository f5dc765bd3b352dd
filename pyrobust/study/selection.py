"""Selecting training images by robustness: keep the robust ones (never fooled), a fixed number per class.

Sampling is reproducible: class ``k`` draws from its own generator seeded with ``(seed, k)``, so one class's choice
does not depend on the others. The subset is written as a plain ``.npz`` (``x``, ``y`` and ``source_index``, the
images' original indices in the evaluated dataset, so every image can be traced back) with a ``selection.json``
beside it: per class how many were asked, available and taken, and where they came from.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import Dataset
from pyrobust.data.load import load_recorded
from pyrobust.errors import InvalidInput
from pyrobust.files import (
    check_output_file,
    make_out_dir,
    refuse_inputs_as_outputs,
    write_bytes_atomic,
    write_json_atomic,
)
from pyrobust.store.results import load_results
from pyrobust.types import ROBUST, Outcome
from pyrobust.validate import Choice, Integer, check, declare

MAX_PER_CLASS = 1_000_000  # images kept per class; sampling with replacement could otherwise ask for any number
SHORTFALLS = ("all", "replace", "fill")


@dataclass(frozen=True)
class Selection:
    positions: np.ndarray  # int64: positions in the evaluated dataset, class by class
    table: list[dict]  # per class: class, asked, available, taken, filled, replaced
    per_class: int
    seed: int
    shortfall: str

    @property
    def n(self) -> int:
        return int(self.positions.size)

    @property
    def short_classes(self) -> list[int]:
        return [r["class"] for r in self.table if r["taken"] < r["asked"]]


def _check(per_class=1, seed=0, shortfall="all") -> None:
    for name, value in (("per_class", per_class), ("seed", seed), ("shortfall", shortfall)):
        check(name, value, SELECTION_CONSTRAINTS[name])


PER_CLASS = Integer(1, MAX_PER_CLASS)
SELECTION_CONSTRAINTS = declare("select_robust", {"per_class": PER_CLASS, "seed": Integer(0),
                                                  "shortfall": Choice(SHORTFALLS)}, _check)


def select_robust(outcome: Outcome, *, per_class: int, seed: int = 0, shortfall: str = "all",
                  n_classes: int | None = None) -> Selection:
    """Up to ``per_class`` robust images of each class, sampled without replacement.

    When a class has fewer robust images than asked: ``all`` takes them all; ``replace`` samples ``per_class`` of
    them with replacement; ``fill`` takes them all and adds the most robust non-robust images of the class (highest
    first-failure step; ties by original index) that were classified correctly before noise.
    """
    _check(per_class, seed, shortfall)
    k_max = n_classes if n_classes is not None else int(outcome.label.max()) + 1
    picks, table = [], []
    for k in range(k_max):
        of_class = np.flatnonzero(outcome.label == k)
        robust = of_class[outcome.first_failure[of_class] == ROBUST]
        rng = np.random.default_rng([seed, k])
        row = {"class": k, "asked": int(per_class), "available": int(robust.size), "taken": 0, "filled": 0,
               "replaced": False}
        if robust.size >= per_class:
            take = np.sort(rng.choice(robust, size=per_class, replace=False))
        elif shortfall == "replace" and robust.size:
            take = np.sort(rng.choice(robust, size=per_class, replace=True))
            row["replaced"] = True
        elif shortfall == "fill":
            fooled = of_class[outcome.first_failure[of_class] > 0]
            order = np.lexsort((outcome.index[fooled], -outcome.first_failure[fooled]))
            extra = fooled[order][: per_class - robust.size]
            take = np.concatenate([robust, extra])
            row["filled"] = int(extra.size)
        else:
            take = robust
        row["taken"] = int(take.size)
        picks.append(take.astype(np.int64))
        table.append(row)
    positions = np.concatenate(picks) if picks else np.empty(0, np.int64)
    return Selection(positions=positions, table=table, per_class=int(per_class), seed=int(seed), shortfall=shortfall)


def random_subset(labels: np.ndarray, counts: dict[int, int], *, seed: int) -> np.ndarray:
    """Positions of a random class-balanced subset: ``counts[k]`` images of class ``k`` (without replacement),
    whatever their robustness; the control for robust selection."""
    picks = []
    for k, c in sorted(counts.items()):
        of_class = np.flatnonzero(labels == k)
        if c > of_class.size:
            raise InvalidInput(f"class {k} has {of_class.size} images; cannot sample {c}")
        picks.append(np.sort(np.random.default_rng([seed, k, 1]).choice(of_class, size=c, replace=False)))
    return np.concatenate(picks) if picks else np.empty(0, np.int64)


def subset_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Where a subset goes (``.npz`` and its JSON), checked writable (folders created): call before the work."""
    out = Path(out)
    if out.suffix == ".npz":
        check_output_file(out, "output")
        return out, out.with_suffix(".json")
    folder = make_out_dir(out)
    return folder / "subset.npz", folder / "selection.json"


def write_subset(out: str | os.PathLike, dataset: Dataset, positions: np.ndarray, meta: dict) -> tuple[Path, Path]:
    """Write the images at ``positions`` as ``.npz`` (``x``, ``y``, ``source_index``) and ``selection.json``.
    ``out`` is a ``.npz`` file (the JSON goes beside it, same stem) or a folder (``subset.npz`` in it)."""
    npz, meta_path = subset_paths(out)
    x = dataset.images[positions]
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x[..., 0] if x.shape[3] == 1 else x, y=dataset.labels[positions],
                        source_index=dataset.index[positions])
    write_bytes_atomic(npz, buf.getvalue())
    write_json_atomic(meta_path, {**meta, "images": int(positions.size), "file": npz.name})
    return npz, meta_path


def select_from_results(results_dir: str | os.PathLike, *, per_class: int, seed: int = 0, shortfall: str = "all",
                        out: str | os.PathLike, data_dir=None, allow_test_split: bool = False
                        ) -> tuple[Selection, Path]:
    """``pyrobust select``: robust images of an evaluated (training) set, written to ``out``. An evaluation of a
    test split is refused unless ``allow_test_split``: training on the images a model is then tested on makes its
    test results meaningless."""
    _check(per_class, seed, shortfall)
    targets = subset_paths(out)  # writable, checked before any work
    record = load_results(results_dir)
    outcome, summary = record
    if summary["dataset"].get("split") == "test" and not allow_test_split:
        raise InvalidInput(f"{results_dir} evaluated a test split ({summary['dataset'].get('spec')}); selecting "
                           "training images from it puts test images into training. Evaluate the training split, or "
                           "pass allow_test_split=True if that is really what you want")
    ds = load_recorded(summary["dataset"], data_dir=data_dir)
    # the images come from a file the results name: the subset must not be written over it (or over the results)
    results_files = [("the results", Path(results_dir) / name) for name in ("results.npz", "summary.json")]
    refuse_inputs_as_outputs([("out", p) for p in targets],
                             [("the dataset", Path(ds.source)), *results_files])
    sel = select_robust(outcome, per_class=per_class, seed=seed, shortfall=shortfall,
                        n_classes=len(summary["per_class"]))
    meta = {"kind": "robust", "per_class": sel.per_class, "seed": sel.seed, "shortfall": sel.shortfall,
            "table": sel.table, "source": {"results": str(Path(results_dir).resolve()),
                                           "dataset": summary["dataset"], "model": summary["model"],
                                           "noise": record.noise.to_dict(), "settings": summary["settings"]}}
    npz, _ = write_subset(out, ds, sel.positions, meta)
    return sel, npz


def read_selection(npz: str | os.PathLike) -> dict:
    """The ``selection.json`` written beside a subset."""
    p = Path(npz)
    meta = p.with_suffix(".json") if p.with_suffix(".json").exists() else p.parent / "selection.json"
    return json.loads(meta.read_text())
