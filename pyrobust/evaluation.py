"""``evaluate``: load a model and a dataset, run the protocol, write results and the report.

With an output folder the run is checkpointed as it goes, holds a lock on the folder, and can be resumed.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np

from perturbcore.families import Family
from pyrobust.data.dataset import DataSelection, Dataset, class_names
from pyrobust.engine.loop import Progress, prepare
from pyrobust.engine.plan import RunOptions, RunPlan, load_data, plan_run, split_settings
from pyrobust.engine.runtime import BoundModel, OnnxModel
from pyrobust.errors import Interrupted, InvalidInput, MissingDependency, NonFiniteModel
from pyrobust.files import make_out_dir
from pyrobust.machine import check_threads
from pyrobust.report import (
    plot_examples,
    plot_failure,
    plot_failure_probability,
    plot_per_class,
    plot_survival,
    write_report,
)
from pyrobust.sequential import precision_bounds, random_order
from pyrobust.stats import failure_interval, failure_probability, look_schedule
from pyrobust.store.results import build_summary, noise_of
from pyrobust.store.rundir import Complete, Resume, RunLock, checkpointed, decide_start, finish_run
from pyrobust.types import NONFINITE, PAPER_MAX_STEPS, ROBUST, FailureTarget, NoiseSpec, Outcome, RunState
from pyrobust.validate import Number, check

PRECISION_CONFIDENCE = 0.95
CONFIDENCE = Number(0, 1, lo_open=True, hi_open=True, kind="a confidence", hint="(e.g. 0.95)")


def precision_alpha_side(looks: int) -> float:
    """Error on each side of each look's interval: Bonferroni over the planned looks of a 95 % interval."""
    return (1 - PRECISION_CONFIDENCE) / looks / 2


class SlowRunWarning(UserWarning):
    """A run was far slower than the measurement its batch size was chosen from; the choice is measured again."""


class NonFiniteOutputWarning(UserWarning):
    """The model returned NaN or infinity for some inputs; those images count as failures with their own status."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: per-image ``outcome``, the ``summary`` (as in summary.json) and where it was written.

    In a notebook: ``ev.robust_fraction``, ``ev.accuracy``, ``ev.first_failure`` (per image: -1 robust, 0 wrong
    before noise, s fooled at step s), ``ev.failing_inputs(i)`` (image i's original and first failing input as
    arrays, asked of the model again), ``ev.plot_survival()`` and friends (matplotlib figures),
    ``ev.to_dataframe()`` (with pandas)."""

    outcome: Outcome
    summary: dict
    out: Path | None
    resumed: bool = False  # continued from a checkpoint, or found already complete
    already_complete: bool = False  # ``resume`` found a finished run and did nothing
    dataset: Dataset | None = field(default=None, repr=False, compare=False)  # the images, aligned with outcome
    model: BoundModel | None = field(default=None, repr=False, compare=False)

    @property
    def robust_fraction(self) -> float:
        return float(self.summary["metrics"]["robust"]["fraction"])

    @property
    def accuracy(self) -> float:
        return float(self.summary["metrics"]["accuracy"]["fraction"])

    @property
    def first_failure(self) -> np.ndarray:
        return self.outcome.first_failure

    @property
    def robust(self) -> np.ndarray:
        return self.outcome.robust

    @property
    def index(self) -> np.ndarray:
        return self.outcome.index

    @property
    def robust_of_correct(self) -> float | None:
        """Robust images as a share of the correctly classified ones (``robust_fraction`` is of all images)."""
        v = self.summary["metrics"]["robust_of_correct"]["fraction"]
        return None if v is None else float(v)

    @property
    def failures(self) -> np.ndarray | None:
        """Per image: failing steps among its ``max_steps`` probes (runs with ``count_failures=True``; else None)."""
        return self.outcome.failures

    @property
    def clean_margin(self) -> np.ndarray | None:
        """Per image: its clean score for the label minus the best other score (NaN: not recorded)."""
        return self.outcome.clean_margin

    @property
    def failure_probability(self) -> np.ndarray:
        """Per image: the estimated per-step failure probability p̂ under this noise (NaN for an image wrong before
        any noise): failures / probes with failure counts, else 1 / first-failure step and 0 for a robust image
        (:func:`pyrobust.stats.failure_probability`)."""
        self._refuse_sweep("failure_probability")
        return failure_probability(self.outcome.first_failure, self.outcome.failures, self.noise.max_steps)

    def failure_interval(self, confidence: float = 0.95, *, side: str = "two",
                         familywise: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per image: exact bounds on its failure probability (:func:`pyrobust.stats.failure_interval`), two-sided
        or the one-sided ``side="upper"`` bound. ``familywise``: the level holds for every image of this set at
        once (Bonferroni over the images that were perturbed)."""
        self._refuse_sweep("failure_interval")
        check("confidence", confidence, CONFIDENCE)
        if side not in ("two", "upper"):
            raise InvalidInput(f"side must be 'two' or 'upper'; got {side!r}")
        level = confidence
        if familywise:
            level = 1 - (1 - confidence) / max(1, int(self.outcome.correct.sum()))
        return failure_interval(self.outcome.first_failure, self.outcome.failures, self.noise.max_steps, level,
                                side=side)

    @property
    def labels(self) -> np.ndarray:
        return self.outcome.label

    @property
    def noise(self) -> NoiseSpec:
        return noise_of(self.summary)

    def _data(self) -> Dataset:
        if self.dataset is not None:
            return self.dataset
        from pyrobust.data.load import load_recorded

        return load_recorded(self.summary["dataset"])

    def failing_inputs(self, index: int, step: int | None = None):
        """Image ``index`` (its original index, as in ``ev.index``) and its input at ``step`` (default: its first
        failure), rebuilt exactly and asked of the model again: a :class:`~pyrobust.replay.Replay` with
        ``.original`` and ``.perturbed`` (float32 H×W×C arrays in [0, 1]), ``.prediction`` and ``.matches``."""
        from pyrobust.replay import rebuild

        return rebuild(self.outcome, self.noise, self._data(), index=int(index), step=step, model=self.model,
                       where="this evaluation")

    def plot_survival(self):
        """The survival curve (the paper's Figures 3 and 5), as a matplotlib figure."""
        return plot_survival(self.summary)

    def plot_per_class(self):
        return plot_per_class(self.summary)

    def _refuse_sweep(self, what: str) -> None:
        if self.noise.is_sweep:
            raise InvalidInput(f"{what}: {self.noise.noise_name} is a severity sweep, deterministic, so an image has "
                               "no per-step failure probability; its first_failure is its first failing severity")

    def plot_failure_probability(self):
        """The per-image failure probabilities, and the most fragile images with their exact intervals."""
        return plot_failure_probability(self.outcome, self.summary)

    def survival_bands(self, confidence: float = 0.95) -> dict:
        """The survival curve's pointwise (Clopper-Pearson) and simultaneous (DKW) bands at ``confidence``."""
        from pyrobust.stats import survival_bands

        check("confidence", confidence, CONFIDENCE)
        return survival_bands(self.outcome.first_failure, self.noise.max_steps, confidence)

    def plot_examples(self):
        data = self._data()
        return plot_examples(self.outcome, data, class_names(data.name, len(self.summary["per_class"]), data.classes))

    def plot_failure(self, index: int | None = None):
        """Image ``index`` (default: the one fooled earliest) beside its first failing input and the pixels
        changed."""
        data = self._data()
        position = None
        if index is not None:
            found = np.flatnonzero(self.outcome.index == index)
            if found.size == 0 or self.outcome.first_failure[found[0]] <= 0:
                raise InvalidInput(f"image {index} has no failing input here (not evaluated, robust, or wrong before "
                                   "any noise); pick one with ev.first_failure > 0")
            position = int(found[0])
        names = class_names(data.name, len(self.summary["per_class"]), data.classes)
        return plot_failure(self.outcome, data, self.noise, names, position=position)

    def to_dataframe(self):
        """Per-image results as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise MissingDependency("to_dataframe needs pandas: pip install pandas") from None
        o = self.outcome
        columns = {"index": o.index, "label": o.label, "clean_prediction": o.clean_prediction,
                   "first_failure": o.first_failure, "failure_label": o.failure_label,
                   "correct": o.correct, "robust": o.robust}
        if o.failures is not None:
            columns["failures"] = o.failures
        if not self.noise.is_sweep:
            lo, hi = self.failure_interval()
            _, upper = self.failure_interval(side="upper")
            columns.update(p_hat=self.failure_probability, p_low=lo, p_high=hi, p_upper95=upper)
        if o.clean_margin is not None:
            columns["clean_margin"] = o.clean_margin
        return pd.DataFrame(columns)

    def __repr__(self) -> str:
        m = self.summary["metrics"]
        where = f", written to {self.out}" if self.out is not None else ""
        return (f"Evaluation({self.summary['model']['name']} on {self.summary['dataset']['spec']}: {m['images']} "
                f"images, accuracy {m['accuracy']['fraction']:.2%}, robust {m['robust']['fraction']:.2%}{where})")


def evaluate(
    model,
    dataset,
    labels=None,
    *,
    noise: NoiseSpec | str | Family | None = None,
    data: DataSelection | None = None,
    options: RunOptions | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    precision: float | None = None,
    target: FailureTarget | None = None,
    output: str | None = None,
    report: bool = True,
    progress: Progress | None = None,
    status=None,
    **settings,
) -> Evaluation:
    """Measure how robust ``model`` is to random L0 noise on ``dataset``.

    ``model`` is an ONNX file, a loaded :class:`~pyrobust.engine.runtime.OnnxModel`, or a ``torch.nn.Module``
    taking N×C×H×W float images in [0, 1] (after ``mean``/``std`` when given), which is exported to ONNX for the run
    (it is put in eval mode) with the same torch/onnxruntime parity check as ``pyrobust train``. ``dataset`` is a
    spec such as ``"mnist:test"`` (see :func:`pyrobust.load_dataset`), a :class:`~pyrobust.Dataset`, or image
    arrays with ``labels`` (or an ``(x, y)`` pair): N×H×W or N×H×W×C, uint8 in 0–255 or float in [0, 1]
    (:func:`pyrobust.from_arrays`). ``data`` (a :class:`~pyrobust.data.dataset.DataSelection`) selects a part of it
    and says where named datasets live; its fields can be given here too (``data_dir=``, ``start=``/``stop=``,
    ``limit=``, ``sample=``/``sample_seed=``, ``resize=`` such as ``"224x224"`` for a ``folder:PATH`` dataset).

    The noise is ``noise`` (a :class:`~pyrobust.types.NoiseSpec`, default the paper's), with any of its fields
    given here too (``pixels=10``, ``max_steps=``, ``low=``, ``high=``, ``scheme=``, ``mode=``, ``seed=``,
    ``mean=``, ``std=``). ``options`` (:class:`~pyrobust.engine.plan.RunOptions`) says how the run uses the machine,
    its fields given here too (``batch_size``, ``threads``, ``sessions``, ``scheduler``, ``max_memory_mb``,
    ``custom_ops``, ``retune``, ...); none of them changes a per-image result. ``output`` names the model output
    that holds the class scores, needed only when several could (scikit-learn's ZipMap of probabilities is read as
    scores; integer label outputs never are). Every input is checked before any work starts or any file is written.

    With ``out``, writes ``results.npz``, ``summary.json`` and (``report``) the four PNG figures there, saving a
    checkpoint every ``checkpoint_every`` seconds; ``resume`` continues an interrupted run in ``out`` and gives
    bit-identical per-image results.

    ``precision`` (e.g. 0.01): evaluate the images in a seeded random order, at look sizes fixed in advance, and stop
    once the 95 % intervals of both the robust fraction and the accuracy are no wider than ``± precision``. The
    intervals are exact (Clopper-Pearson) at level 1 - 0.05/K for K planned looks (Bonferroni over the looks), so
    they hold at 95 % jointly over every look, whichever look stops the run; the summary's ``precision`` block
    records them, the number of images used and why the run stopped. Results cover the images evaluated.

    ``count_failures=True`` (a noise field) keeps probing each correctly classified image through all ``max_steps``
    steps and counts its failing steps: ``ev.failures``, and exact Clopper-Pearson intervals on each image's failure
    probability (``ev.failure_probability``, ``ev.failure_interval()``); without it the intervals come from the
    first-failure step (exact geometric). ``target`` (a :class:`~pyrobust.types.FailureTarget`, e.g.
    ``FailureTarget(0.01)``) sets ``max_steps`` to the budget at which an image never fooled has p <= 1 % at
    95 % (299 steps; ``familywise=True``: for every image of the set at once), recorded in the summary's ``budget``.

    ``progress(done, total, inferences)`` is called as images finish; ``status(text)`` says what happens before the
    first one (loading, measuring the batch size).
    """
    status = status or (lambda text: None)
    if isinstance(noise, (str, Family)):  # a noise family, written or built: the paper's settings otherwise
        noise = NoiseSpec(corruption=cast(Family, noise))  # NoiseSpec parses text
    if target is not None and ("max_steps" in settings or (noise is not None and noise.max_steps != PAPER_MAX_STEPS)):
        raise InvalidInput("give max_steps or a failure-probability target (which sets max_steps), not both")
    spec, options, selection = split_settings(settings, noise=noise, options=options, data=data)
    _check_precision(precision)
    if resume and overwrite:
        raise InvalidInput("resume=True continues a run and overwrite=True replaces it: pass one of them")
    status("loading the data")
    ds, ds_spec = load_data(dataset, labels, selection=selection, max_bytes=options.budget)
    recorded = selection.record(ds_spec, ds)
    budget = None
    if target is not None:
        budget = target.record(ds.n)
        spec = replace(spec, max_steps=budget["max_steps"])
        status(f"step budget {budget['max_steps']}: {budget['claim']}")
    with _session(model, ds, spec, options, status) as (m, model_info), \
            plan_run(m, ds, spec, options, status=status, output=output) as plan:
        def run(state: RunState | None, save) -> Evaluation:
            outcome, used, prec, info = _run(plan, precision, state, save, progress)
            summary = _summary(plan, outcome, used, prec, info, state, model_info, recorded)
            if budget is not None:
                summary["budget"] = budget
            return Evaluation(outcome=outcome, summary=summary, out=None, dataset=used, model=plan.model)

        if out is None:
            return _warned(run(None, None))
        out_dir = make_out_dir(out)
        with RunLock(out_dir):
            start_from = decide_start(out_dir, plan.fingerprint(), overwrite=overwrite, resume=resume)
            if isinstance(start_from, Complete):
                return Evaluation(outcome=start_from.record.outcome, summary=start_from.record.summary, out=out_dir,
                                  resumed=True, already_complete=True)
            resumed = isinstance(start_from, Resume)
            state = start_from.state if isinstance(start_from, Resume) else RunState(ds.n)
            with checkpointed(out_dir, state, plan.fingerprint(), resumed=resumed) as save:
                result = _warned(run(state, save))
            finish_run(out_dir, result.outcome, result.summary)
            if report:  # after the results: a reporting step never costs finished work
                _draw_report(out_dir, result)
        return replace(result, out=out_dir, resumed=resumed)


PRECISION = Number(0, 0.5, lo_open=True, hi_open=True, none=True, kind="a half-width", hint=", e.g. 0.01 for ±1 point")


def _check_precision(precision) -> None:
    check("precision", precision, PRECISION)


@contextmanager
def _session(model, ds: Dataset, spec: NoiseSpec, options: RunOptions, status):
    """The model to plan with (a torch module is exported to a private temporary file for the run) and what the
    summary says about it."""
    status("loading the model")
    if not _is_torch_module(model):
        yield model, None
        return
    exported = _export_module(model, ds, spec)
    try:
        yield OnnxModel(exported.path, threads=check_threads(options.threads)), {"path": None, "name": exported.name}
    finally:
        exported.cleanup()


def _run(plan: RunPlan, precision: float | None, state: RunState | None, save, progress):
    """(outcome, images used, precision block or None, what ran where)."""
    if precision is None:
        outcome, info = plan.execute(state, progress=progress, on_checkpoint=save)
        _refuse_all_nonfinite(outcome, plan.model.path)
        return outcome, plan.dataset, None, info
    return _run_to_precision(plan, precision, state, save, progress)


def _summary(plan: RunPlan, outcome: Outcome, used: Dataset, prec: dict | None, info: dict,
             state: RunState | None, model_info: dict | None, selection: dict) -> dict:
    m, ds = plan.model, plan.dataset
    if plan.batch_size_choice in ("cached", "measured") and plan.layout.kind != "dask":
        from pyrobust.engine.tuning import check_run_rate

        slow = check_run_rate(m, plan.batch_size, outcome.inferences / max(outcome.seconds, 1e-9), outcome.seconds)
        if slow:
            warnings.warn(slow, SlowRunWarning, stacklevel=4)
    summary = build_summary(
        outcome, spec=plan.noise, n_classes=max(ds.n_classes, 1), image_shape=ds.image_shape,
        model={"path": str(Path(m.path).resolve()), "name": Path(m.path).stem, **(model_info or {}),
               "sha256": m.sha256, "external_data": m.external_data, "input": m.input.name,
               "input_shape": m.input_shape, "input_type": m.input.type, "output": m.output.name,
               "output_type": m.output.type, "layout": m.binding.layout, "fixed_batch": m.binding.fixed_batch},
        dataset={**selection, "name": ds.name, "split": ds.split, "source": ds.source, "sha256": ds.sha256,
                 "first_index": int(used.index.min()), "last_index": int(used.index.max())},
        settings=plan.settings(info, state))
    if prec is not None:
        summary["precision"] = prec
    return summary


class ResultLooksWrongWarning(UserWarning):
    """The results look like a mistake (chance-level accuracy, predictions outside the label range)."""


def _warned(result: Evaluation) -> Evaluation:
    _warn_nonfinite(result.summary)
    for text in result.summary.get("warnings", []):
        warnings.warn(text, ResultLooksWrongWarning, stacklevel=3)
    return result


def _draw_report(out_dir: Path, result: Evaluation) -> None:
    try:
        write_report(out_dir, result.outcome, result.summary, result._data())
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while drawing the figures; the results are saved in {out_dir} "
                          "(summary.json, results.npz)") from None


def _run_to_precision(plan: RunPlan, precision: float, state: RunState | None, save,
                      progress) -> tuple[Outcome, Dataset, dict, dict]:
    """Evaluate look by look in a seeded random order until both 95 % intervals are within ``precision``.

    Each look runs only its new images and folds them into ``state``, which covers the whole dataset, so a
    checkpoint saved during a look holds every finished image and a resumed run skips them: the order and the
    looks are fixed by the seed and the dataset size.
    """
    ds = plan.dataset
    state = state if state is not None else RunState(ds.n)
    order = random_order(plan.noise.seed, ds.n)
    looks = look_schedule(ds.n)
    alpha_side = precision_alpha_side(len(looks))
    reached, n = False, 0
    info: dict = {}
    widths: dict = {}
    for n in looks:
        pos = np.sort(order[:n])
        if not state.done[pos].all():
            _, info = plan.execute(state, positions=pos, progress=progress, on_checkpoint=save)
            if save is not None:
                save()
        ff = state.first_failure[pos]
        _refuse_all_nonfinite(Outcome(index=ds.index[pos], label=ds.labels[pos],
                                      clean_prediction=state.clean_prediction[pos], first_failure=ff,
                                      failure_label=state.failure_label[pos]), plan.model.path)
        widths = {}
        for name, hits in (("robust", int(np.count_nonzero(ff == ROBUST))), ("accuracy", int(np.count_nonzero(ff)))):
            p, lo, hi, half = (float(v) for v in precision_bounds(hits, n, alpha_side))
            widths[name] = {"fraction": p, "interval": [lo, hi], "half_width": half}
        if all(w["half_width"] <= precision for w in widths.values()):
            reached = True
            break
    used = ds.take(pos)
    outcome = state.outcome(ds, counted=plan.noise.count_failures).take(pos)
    worst = max(w["half_width"] for w in widths.values())
    reason = (f"both intervals within ±{precision:.2%} after {n} of {ds.n} images" if reached and n < ds.n else
              f"both intervals within ±{precision:.2%} only with every image" if reached else
              f"the data ran out: ±{worst:.2%} with all {ds.n} images, short of ±{precision:.2%}")
    prec = {"target": precision, "confidence": PRECISION_CONFIDENCE, "method": "clopper-pearson, bonferroni over looks",
            "looks_planned": looks, "confidence_per_look": 1 - 2 * alpha_side, "order_seed": plan.noise.seed,
            "reached": reached, "stopped_early": n < ds.n, "images_evaluated": int(n), "images_total": ds.n,
            "reason": reason, **widths}
    return outcome, used, prec, info


def _warn_nonfinite(summary: dict) -> None:
    nonfinite = summary["metrics"]["nonfinite_outputs"]
    if nonfinite:
        warnings.warn(f"{nonfinite} image(s) got NaN or infinite model outputs; they count as failures with "
                      "label -2 (non-finite)", NonFiniteOutputWarning, stacklevel=3)


__all__ = ["Evaluation", "NonFiniteModel", "evaluate"]


def _refuse_all_nonfinite(outcome: Outcome, path) -> None:
    if outcome.n and bool((outcome.clean_prediction == NONFINITE).all()):
        raise NonFiniteModel(f"{path}: every output of the model is NaN or infinite ({outcome.n} clean images), so "
                             "there is nothing to measure; check the model's export and the input range and "
                             "normalisation it expects")


def _is_torch_module(obj) -> bool:
    return any(c.__module__.startswith("torch.nn") and c.__name__ == "Module" for c in type(obj).__mro__)


@dataclass
class _Exported:
    path: Path
    name: str
    tmp: tempfile.TemporaryDirectory

    def cleanup(self) -> None:
        self.tmp.cleanup()


def _export_module(module, ds: Dataset, spec: NoiseSpec) -> _Exported:
    """Export a torch module to ONNX in a private temporary folder, checked for parity with torch on the first
    images as the engine feeds them (normalised when ``mean``/``std`` are given)."""
    from pyrobust.training import check_parity, expectation_metadata, export_onnx

    module.eval()
    tmp = tempfile.TemporaryDirectory(prefix="pyrobust-module-")
    path = Path(tmp.name) / "module.onnx"
    try:
        export_onnx(module, ds.image_shape, path, metadata={"pyrobust.source": f"torch module {type(module).__name__}",
                                                            **expectation_metadata(spec)})
        sample = prepare(ds, slice(0, min(ds.n, 64)), spec)
        check_parity(module, path, np.ascontiguousarray(sample.transpose(0, 3, 1, 2), dtype=np.float32))
    except BaseException:
        tmp.cleanup()
        raise
    return _Exported(path, f"{type(module).__name__} (torch module)", tmp)

