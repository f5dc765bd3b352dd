"""Regenerate the exact input the model saw for any (image, step) from saved results.

The noise is a pure function of (seed, original index, step, draw), so nothing but the settings needs saving. In the
random-walk mode (``cumulative``) the input at step ``s`` is rebuilt by applying steps 1..s in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyrobust.data.load import load_recorded
from pyrobust.engine.loop import model_units, perturbed_input, predict_one
from pyrobust.errors import InvalidInput, ModelError
from pyrobust.store.results import load_results
from pyrobust.types import ROBUST, NoiseSpec
from pyrobust.validate import Integer, check


@dataclass(frozen=True, repr=False)
class Replay:
    index: int
    label: int
    step: int
    recorded_failure_step: int
    recorded_label: int  # the prediction the run implies at this step: the failure label at the first failure,
    # the true label before it
    original: np.ndarray  # float32 (H, W, C)
    perturbed: np.ndarray  # float32 (H, W, C)
    prediction: int | None  # the model's prediction on ``perturbed`` now, when the model was available

    @property
    def matches(self) -> bool | None:
        if self.prediction is None:
            return None
        return self.prediction == self.recorded_label

    @property
    def changed_pixels(self) -> int:
        return int((self.perturbed != self.original).any(axis=2).sum())

    def __repr__(self) -> str:
        now = "not checked" if self.prediction is None else f"model now says {self.prediction} " + \
            ("(matches the record)" if self.matches else "(DOES NOT match the record)")
        return (f"Replay(image {self.index}, label {self.label}, step {self.step}: {self.changed_pixels} pixels "
                f"changed, recorded prediction {self.recorded_label}, {now}; .original and .perturbed are "
                f"{self.original.shape} arrays)")

    def plot(self):
        """The original beside its rebuilt input, as a matplotlib figure."""
        from pyrobust.report import plot_replay

        return plot_replay(self)


def rebuild(outcome, spec: NoiseSpec, dataset, *, index: int, step: int | None = None, model=None,
            where: str = "the run") -> Replay:
    """Image ``index``'s input at ``step`` (default: its first failure) from in-memory results: ``outcome`` and
    ``dataset`` aligned, ``model`` an :class:`~pyrobust.engine.runtime.OnnxModel` to ask again (or None)."""
    found = np.flatnonzero(outcome.index == index)
    if found.size == 0:
        raise InvalidInput(f"image {index} was not evaluated in {where} (original indices "
                           f"{int(outcome.index.min())}..{int(outcome.index.max())})")
    pos = int(found[0])
    ff = int(outcome.first_failure[pos])
    if step is None:
        if ff == ROBUST:
            raise InvalidInput(f"image {index} is robust (never fooled in {spec.max_steps} steps), so it has no "
                               "failing input; pass step=S to rebuild its input at step S")
        step = ff
    check("step", step, Integer(0, spec.max_steps))
    if ff != ROBUST and step > ff:
        raise InvalidInput(f"image {index} left play at step {ff}; steps after it were never run")
    base = model_units(dataset, slice(pos, pos + 1), spec)[0]
    raw = perturbed_input(base, index=index, step=int(step), spec=spec)
    prediction = None if model is None else predict_one(model, dataset, raw, spec)
    original, perturbed = (base, raw) if spec.scale == 1 else (base / np.float32(spec.scale),
                                                               raw / np.float32(spec.scale))
    # Before its first failure the model gave the true label at every step; at it, the recorded failure label.
    recorded = int(outcome.failure_label[pos]) if step == ff else int(outcome.label[pos])
    return Replay(index=index, label=int(outcome.label[pos]), step=int(step), recorded_failure_step=ff,
                  recorded_label=recorded, original=original, perturbed=perturbed, prediction=prediction)


def replay(results_dir: str | os.PathLike, *, index: int, step: int | None = None, model=None, data_dir=None,
           threads: int | None = None) -> Replay:
    """Rebuild image ``index``'s input at ``step`` (default: its first-failure step) and, when the model is at hand
    (``model`` or the path the run recorded), ask it again."""
    from pyrobust.engine.runtime import OnnxModel

    record = load_results(results_dir)
    outcome, summary, spec = record.outcome, record.summary, record.noise
    if index not in outcome.index:
        rebuild(outcome, spec, None, index=index, where=str(results_dir))  # raises the message
    ds = load_recorded(summary["dataset"], data_dir=data_dir)
    m = None
    model_path = model if model is not None else summary["model"].get("path")
    if model_path is not None and (model is not None or Path(model_path).is_file()):
        m = model_path if isinstance(model_path, OnnxModel) else OnnxModel(model_path, threads=threads)
        if m.sha256 != summary["model"]["sha256"]:
            raise ModelError(f"{m.path}: SHA-256 {m.sha256[:12]}… differs from the model the run evaluated "
                             f"({summary['model']['sha256'][:12]}…); pass --model with that file")
    return rebuild(outcome, spec, ds, index=index, step=step, model=m, where=str(results_dir))
