"""Regenerate the exact input the model saw for any (image, step) from saved results.

The noise is a pure function of (seed, original index, step, draw), so nothing but the settings needs saving. In the
random-walk mode (``cumulative``) the input at step ``s`` is rebuilt by applying steps 1..s in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perturbcore import predict
from pyrobust.data.load import load_recorded
from pyrobust.engine.loop import model_units, normalised, perturbed_input, predict_one
from pyrobust.engine.runtime import BoundModel
from pyrobust.errors import DataError, InvalidInput, ModelError
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
    failure: int | None = None  # this is the image's failure-th failing step (a replay by failure number)

    @property
    def matches(self) -> bool | None:
        if self.prediction is None:
            return None
        if self.failure is not None and self.failure > 1:  # the run counted this failure, not its label
            return self.prediction != self.label
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


def failing_steps(model, dataset, pos: int, spec: NoiseSpec, *, index: int, batch: int = 256) -> np.ndarray:
    """Every step 1..max_steps at which the model is wrong on image ``pos`` of ``dataset`` (original index
    ``index``), asked again in batches: the steps a failure-counting run counted."""
    base = model_units(dataset, slice(pos, pos + 1), spec)[0]
    label = int(dataset.labels[pos])
    loaded = model.model if isinstance(model, BoundModel) else model
    bound = None
    wrong = []
    walk = base  # the random walk's current input (cumulative mode)
    for lo in range(1, spec.max_steps + 1, batch):
        steps = range(lo, min(spec.max_steps, lo + batch - 1) + 1)
        if spec.mode == "restart":
            x = np.stack([perturbed_input(base, index=index, step=s, spec=spec) for s in steps])
        else:
            rows = []
            for s in steps:
                walk = perturbed_input(walk, index=index, step=s, spec=spec, walk=False)
                rows.append(walk)
            x = np.stack(rows)
        x = normalised(x, spec)
        if bound is None:
            bound = loaded.bind(dataset.image_shape, n_classes=dataset.n_classes, probe=x[:1])
        pred = predict(bound.run(bound.to_flat(x)))
        wrong += [s for s, p in zip(steps, pred, strict=True) if int(p) != label]
    return np.asarray(wrong, np.int64)


def rebuild(outcome, spec: NoiseSpec, dataset, *, index: int, step: int | None = None, model=None,
            where: str = "the run", failure: int | None = None) -> Replay:
    """Image ``index``'s input at ``step`` (default: its first failure) from in-memory results: ``outcome`` and
    ``dataset`` aligned, ``model`` an :class:`~pyrobust.engine.runtime.OnnxModel` to ask again (or None).
    ``failure=K`` instead: its K-th failing step (a run that counted failures; the model finds the steps again and
    their number must be the recorded count)."""
    found = np.flatnonzero(outcome.index == index)
    if found.size == 0:
        raise InvalidInput(f"image {index} was not evaluated in {where} (original indices "
                           f"{int(outcome.index.min())}..{int(outcome.index.max())})")
    pos = int(found[0])
    ff = int(outcome.first_failure[pos])
    if failure is not None:
        if step is not None:
            raise InvalidInput("give a step or a failure number, not both")
        step = _failure_step(outcome, spec, dataset, pos, index, failure, model, where)
    elif step is None:
        if ff == ROBUST:
            raise InvalidInput(f"image {index} is robust (never fooled in {spec.max_steps} steps), so it has no "
                               "failing input; pass step=S to rebuild its input at step S")
        step = ff
    check("step", step, Integer(0, spec.max_steps))
    if ff != ROBUST and step > ff and not (spec.count_failures and ff > 0):
        raise InvalidInput(f"image {index} left play at step {ff}; steps after it were never run")
    base = model_units(dataset, slice(pos, pos + 1), spec)[0]
    raw = perturbed_input(base, index=index, step=int(step), spec=spec)
    prediction = None if model is None else predict_one(model, dataset, raw, spec)
    original, perturbed = (base, raw) if spec.scale == 1 else (base / np.float32(spec.scale),
                                                               raw / np.float32(spec.scale))
    # Before its first failure the model gave the true label at every step; at it, the recorded failure label.
    # After it, a counting run recorded only how many steps failed (``failure`` says this one did).
    recorded = int(outcome.failure_label[pos]) if step == ff else int(outcome.label[pos])
    if failure is not None and failure > 1:
        recorded = NOT_THE_LABEL
    return Replay(index=index, label=int(outcome.label[pos]), step=int(step), recorded_failure_step=ff,
                  recorded_label=recorded, original=original, perturbed=perturbed, prediction=prediction,
                  failure=failure)


NOT_THE_LABEL = -3  # the recorded prediction of a later failure: any class but the label


def _failure_step(outcome, spec: NoiseSpec, dataset, pos: int, index: int, failure, model, where: str) -> int:
    ff = int(outcome.first_failure[pos])
    counted = outcome.failures is not None
    recorded = int(outcome.failures[pos]) if counted else (1 if ff > 0 else 0)
    check("failure", failure, Integer(1))
    if recorded == 0:
        state = "wrong before any noise" if ff == 0 else f"never fooled in {spec.max_steps} steps"
        raise InvalidInput(f"image {index} has no failing step ({state})")
    if failure > recorded:
        raise InvalidInput(f"image {index} failed at {recorded} step(s) in {where}; pick a failure in 1..{recorded}"
                           + ("" if counted else " (this run stopped at the first failure: evaluate with "
                                                 "--count-failures to count them all)"))
    if failure == 1:
        return ff
    if model is None:
        raise ModelError(f"finding image {index}'s failing step {failure} asks the model again, and the run's model "
                         "file was not found; pass --model FILE")
    steps = failing_steps(model, dataset, pos, spec, index=index)
    if steps.size != recorded or int(steps[0]) != ff:
        raise DataError(f"image {index}: the model now fails at {steps.size} step(s) (first {steps[:1].tolist()}), "
                        f"but {where} recorded {recorded} (first {ff}); the results were altered or are not this "
                        "model's. Evaluate again")
    return int(steps[failure - 1])


def replay(results_dir: str | os.PathLike, *, index: int, step: int | None = None, model=None, data_dir=None,
           threads: int | None = None, failure: int | None = None) -> Replay:
    """Rebuild image ``index``'s input at ``step`` (default: its first-failure step), or at its ``failure``-th
    failing step (a run with failure counts), and, when the model is at hand (``model`` or the path the run
    recorded), ask it again."""
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
    return rebuild(outcome, spec, ds, index=index, step=step, model=m, where=str(results_dir), failure=failure)
