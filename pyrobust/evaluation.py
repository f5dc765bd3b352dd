"""``evaluate``: load a model and a dataset, run the protocol, write results and the report.

With an output folder the run is checkpointed as it goes, holds a lock on the folder, and can be resumed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyrobust.checkpoint import CHECKPOINT_FILE, RunLock, fingerprint, load_checkpoint, save_checkpoint
from pyrobust.datasets import Dataset, from_arrays, load_dataset
from pyrobust.engine import Progress, RunState, bind_model, check_spec_for_data, run_protocol, working_memory_bytes
from pyrobust.errors import DataError, Interrupted, InvalidInput, ModelError, OutputError, PyRobustError
from pyrobust.limits import available_memory_bytes, memory_budget  # noqa: F401 - part of this module's API
from pyrobust.parallel import run_sessions
from pyrobust.report import write_report
from pyrobust.results import (
    SUMMARY_FILE,
    build_summary,
    clear_run_files,
    load_results,
    make_out_dir,
    read_run_file,
    run_files,
    write_results,
)
from pyrobust.runtime import OnnxModel, check_threads, default_threads
from pyrobust.sequential import precision_bounds, random_order
from pyrobust.stats import look_schedule
from pyrobust.tuning import BATCH_SIZES
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome

PRECISION_CONFIDENCE = 0.95


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
    model: OnnxModel | None = field(default=None, repr=False, compare=False)

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
    def labels(self) -> np.ndarray:
        return self.outcome.label

    @property
    def noise(self) -> NoiseSpec:
        return NoiseSpec.from_dict(self.summary["settings"])

    def _data(self) -> Dataset:
        if self.dataset is not None:
            return self.dataset
        from pyrobust.datasets import load_recorded

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
        from pyrobust.report import plot_survival

        return plot_survival(self.summary)

    def plot_per_class(self):
        from pyrobust.report import plot_per_class

        return plot_per_class(self.summary)

    def plot_examples(self):
        from pyrobust.report import plot_examples
        from pyrobust.results import class_names

        data = self._data()
        return plot_examples(self.outcome, data, class_names(data.name, len(self.summary["per_class"])))

    def plot_failure(self, index: int | None = None):
        """Image ``index`` (default: the one fooled earliest) beside its first failing input and the pixels
        changed."""
        from pyrobust.report import plot_failure
        from pyrobust.results import class_names

        data = self._data()
        position = None
        if index is not None:
            found = np.flatnonzero(self.outcome.index == index)
            if found.size == 0 or self.outcome.first_failure[found[0]] <= 0:
                raise InvalidInput(f"image {index} has no failing input here (not evaluated, robust, or wrong before "
                                   "any noise); pick one with ev.first_failure > 0")
            position = int(found[0])
        return plot_failure(self.outcome, data, self.noise, class_names(data.name, len(self.summary["per_class"])),
                            position=position)

    def to_dataframe(self):
        """Per-image results as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            from pyrobust.errors import MissingDependency

            raise MissingDependency("to_dataframe needs pandas: pip install pandas") from None
        o = self.outcome
        return pd.DataFrame({"index": o.index, "label": o.label, "clean_prediction": o.clean_prediction,
                             "first_failure": o.first_failure, "failure_label": o.failure_label,
                             "correct": o.correct, "robust": o.robust})

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
    pixels: int = 28,
    max_steps: int = 250,
    low: float = 0.0,
    high: float = 1.0,
    scheme: str = "uniform",
    mode: str = "restart",
    seed: int = 0,
    mean=None,
    std=None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    start: int | None = None,
    stop: int | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
    batch_size: int | str = "auto",
    chunk_size: int = 4096,
    threads: int | None = None,
    sessions: int | str = "auto",
    scheduler: str | None = None,
    shard_size: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: float = 30.0,
    max_memory_mb: float | None = None,
    custom_ops: str | os.PathLike | None = None,
    precision: float | None = None,
    retune: bool = False,
    report: bool = True,
    progress: Progress | None = None,
    status=None,
) -> Evaluation:
    """Measure how robust ``model`` is to random L0 noise on ``dataset``.

    ``model`` is an ONNX file, a loaded :class:`~pyrobust.runtime.OnnxModel`, or a ``torch.nn.Module`` taking
    N×C×H×W float images in [0, 1] (after ``mean``/``std`` when given), which is exported to ONNX for the run (it
    is put in eval mode) with the same torch/onnxruntime parity check as ``pyrobust train``. ``dataset`` is a spec
    such as ``"mnist:test"`` (see :func:`pyrobust.datasets.load_dataset`), a
    :class:`~pyrobust.datasets.Dataset`, or image arrays with ``labels`` (or an ``(x, y)`` pair): N×H×W or
    N×H×W×C, uint8 in 0–255 or float in [0, 1] (:func:`pyrobust.datasets.from_arrays`).
    With ``out``, writes ``results.npz``, ``summary.json`` and (``report``) the four PNG figures there, saving a
    checkpoint every ``checkpoint_every`` seconds; ``resume`` continues an interrupted run in ``out`` and gives
    bit-identical per-image results. Every input is checked before any work starts or any file is written;
    ``retune`` measures the batch size and layout again instead of using the cached choice.

    ``batch_size`` and ``sessions`` (parallel onnxruntime sessions sharing ``threads`` cores) are measured for the
    model and machine when ``"auto"`` (cached; see :mod:`pyrobust.tuning`). ``scheduler`` (``"local:N"`` or
    ``"tcp://host:port"``) runs the images on a Dask cluster in shards of ``shard_size``. None of these change the
    per-image results.

    ``precision`` (e.g. 0.01): evaluate the images in a seeded random order, at look sizes fixed in advance, and stop
    once the 95 % intervals of both the robust fraction and the accuracy are no wider than ``± precision``. The
    intervals are exact (Clopper-Pearson) at level 1 - 0.05/K for K planned looks (Bonferroni over the looks), so
    they hold at 95 % jointly over every look, whichever look stops the run; the summary's ``precision`` block
    records them, the number of images used and why the run stopped. Results cover the images evaluated.

    ``progress(done, total, inferences)`` is called as images finish; ``status(text)`` says what happens before the
    first one (loading, measuring the batch size).
    """
    status = status or (lambda text: None)
    if precision is not None and (isinstance(precision, bool) or not isinstance(precision, (int, float))
                                  or not 0 < precision < 0.5):
        raise InvalidInput(f"precision must be a half-width in (0, 0.5), e.g. 0.01 for ±1 point; got {precision!r}")
    spec = NoiseSpec(pixels=pixels, max_steps=max_steps, low=low, high=high, scheme=scheme, mode=mode, seed=seed,
                     mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None)
    for name, v in (("batch_size", batch_size), ("chunk_size", chunk_size), ("sessions", sessions),
                    ("shard_size", shard_size)):
        if v == "auto" and name in ("batch_size", "sessions") or v is None and name == "shard_size":
            continue
        if v is None or isinstance(v, (bool, str)) or int(v) != v or v < 1:
            raise InvalidInput(f"{name} must be an integer >= 1{' or auto' if name != 'chunk_size' else ''}; "
                               f"got {v!r}")
    threads = check_threads(threads)  # an integer >= 1, at most the CPUs available (with a warning)
    if not checkpoint_every > 0:
        raise InvalidInput(f"checkpoint_every must be > 0 seconds; got {checkpoint_every}")
    if resume and overwrite:
        raise InvalidInput("resume=True continues a run and overwrite=True replaces it: pass one of them")
    budget = memory_budget(max_memory_mb)
    if scheduler is not None:
        from pyrobust.distributed import check_scheduler

        check_scheduler(scheduler)
    status("loading the data")
    if isinstance(dataset, tuple) and len(dataset) == 2 and labels is None:
        dataset, labels = dataset
    if isinstance(dataset, np.ndarray) or labels is not None:
        if labels is None:
            raise InvalidInput("image arrays need their labels: evaluate(model, x, y)")
        if not isinstance(dataset, np.ndarray) and not hasattr(dataset, "__array__"):
            raise InvalidInput("labels go with image arrays (evaluate(model, x, y)); a dataset spec or Dataset "
                               "carries its own labels")
        dataset = from_arrays(dataset, labels)
    if isinstance(dataset, Dataset):
        ds = dataset.select(start=start, stop=stop, limit=limit, sample=sample, sample_seed=sample_seed)
        ds_spec = ds.spec
    else:
        ds_spec = dataset
        ds = load_dataset(dataset, data_dir=data_dir, start=start, stop=stop, limit=limit, sample=sample,
                          sample_seed=sample_seed, max_bytes=budget)
    check_spec_for_data(spec, ds.image_shape)
    # Each parallel session keeps its own slot and chunk buffers: count the most sessions this run may use.
    most_sessions = int(sessions) if sessions != "auto" else (threads or default_threads()) if scheduler is None else 1
    need = ds.memory_bytes + most_sessions * working_memory_bytes(
        ds, batch_size=1024 if batch_size == "auto" else int(batch_size), chunk_size=int(chunk_size))
    if budget is not None and need > budget:
        raise DataError(f"{ds.spec}: evaluating {ds.n} images needs about {need / 2**20:.0f} MiB "
                        f"({ds.memory_bytes / 2**20:.0f} MiB of images in memory), more than the "
                        f"{budget / 2**20:.0f} MiB allowed (--max-memory); use a smaller --chunk-size, fewer "
                        "--sessions or a --range")
    if isinstance(model, OnnxModel) and sessions == "auto":
        sessions = 1  # the caller's own session is the one that runs
    status("loading the model")
    exported = None
    if _is_torch_module(model):
        exported = _export_module(model, ds, spec)
        m = OnnxModel(exported.path, threads=threads)
    else:
        m = model if isinstance(model, OnnxModel) else OnnxModel(model, threads=threads, custom_ops=custom_ops)
    bind_model(m, ds, spec)  # every model and shape error surfaces before any output is touched
    max_batch = None
    if budget is not None:
        # onnxruntime's own working memory grows with the batch: estimated per image, and checked for the batch size
        # given, or used to bound the sizes "auto" may choose from
        per_image = m.memory_per_image()
        copies = 1 if scheduler is not None else most_sessions
        fits = [b for b in (BATCH_SIZES if batch_size == "auto" else (int(batch_size),))
                if need + per_image * b * copies <= budget]
        if not fits:
            smallest = min(BATCH_SIZES) if batch_size == "auto" else int(batch_size)
            model_need = int(per_image * smallest * copies)
            raise DataError(f"{ds.spec}: evaluating with batches of {smallest} needs about "
                            f"{(need + model_need) / 2**20:.0f} MiB ({model_need / 2**20:.0f} MiB of it the model's "
                            f"working memory, about {per_image / 2**10:.0f} KiB an image), more than the "
                            f"{budget / 2**20:.0f} MiB allowed (--max-memory); use a smaller --batch-size or fewer "
                            "--sessions")
        max_batch = max(fits)
    if batch_size == "auto" or sessions == "auto":
        status("choosing the batch size and session layout (measured once per model and machine, then cached)")
    plan = _plan(m, ds, batch_size=batch_size, sessions=sessions, scheduler=scheduler, custom_ops=custom_ops,
                 retune=retune, max_batch=max_batch)
    connection = None
    if scheduler is not None:  # reach the cluster before any output is written
        from pyrobust.distributed import connect

        connection = connect(scheduler)
    try:

        def summarise(outcome: Outcome, state: RunState | None) -> dict:
            return build_summary(
                outcome, spec=spec, n_classes=max(ds.n_classes, 1),
                model={"path": None if exported else str(Path(m.path).resolve()),
                       "name": exported.name if exported else Path(m.path).stem, "sha256": m.sha256,
                       "external_data": m.external_data,
                       "input": m.input.name, "input_shape": m.input_shape, "layout": m.binding.layout,
                       "fixed_batch": m.binding.fixed_batch},
                dataset={"spec": ds_spec, "name": ds.name, "split": ds.split, "source": ds.source,
                         "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
                         "sha256": ds.sha256, "start": start, "stop": stop, "limit": limit, "sample": sample,
                         "sample_seed": sample_seed,
                         "first_index": int(ds.index[0]), "last_index": int(ds.index[-1])},
                settings={"batch_size": plan["batch_size"], "batch_size_choice": plan["batch_size_choice"],
                          "chunk_size": int(chunk_size), "threads": m.threads, "kernel_threads": 1,
                          "ort_spinning": m.spinning, "parallel": {**plan["parallel"], **work.get("info", {})},
                          "resumed_sessions": state.sessions if state is not None else 1},
            )

        work: dict = {}

        def execute(ds: Dataset, state: RunState | None, on_checkpoint) -> Outcome:
            kw = dict(progress=progress, state=state, on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every)
            par = plan["parallel"]
            if scheduler is not None:
                from pyrobust.distributed import run_distributed

                # run_distributed closes the connection it is given; later calls (precision looks) connect again
                conn, work["connection"] = work.get("connection", connection), None
                outcome, work["info"] = run_distributed(m, ds, spec, scheduler=scheduler, batch_size=plan["batch_size"],
                                                        chunk_size=int(chunk_size), shard_size=shard_size,
                                                        connection=conn, **kw)
                return outcome
            if par["sessions"] > 1:
                outcome, work["info"] = run_sessions(m, ds, spec, sessions=par["sessions"],
                                                     threads_per_session=par["threads_per_session"],
                                                     batch_size=plan["batch_size"], chunk_size=int(chunk_size),
                                                     custom_ops=custom_ops, shard_size=shard_size, **kw)
                return outcome
            return run_protocol(m, ds, spec, batch_size=plan["batch_size"], chunk_size=int(chunk_size), **kw)

        def run_all(state: RunState | None, on_checkpoint) -> tuple[Outcome, Dataset, dict | None]:
            if precision is None:
                outcome = execute(ds, state, on_checkpoint)
                _refuse_all_nonfinite(outcome, m.path)
                return outcome, ds, None
            return _run_to_precision(ds, precision, spec.seed, execute, state, on_checkpoint, m.path)

        def finish(outcome: Outcome, used: Dataset, prec: dict | None, state: RunState | None) -> dict:
            summary = summarise(outcome, state)
            if plan["batch_size_choice"] in ("cached", "measured") and scheduler is None:
                from pyrobust.tuning import check_run_rate

                slow = check_run_rate(m, plan["batch_size"], outcome.inferences / max(outcome.seconds, 1e-9),
                                      outcome.seconds)
                if slow:
                    warnings.warn(slow, SlowRunWarning, stacklevel=3)
            if used is not ds:
                summary["dataset"].update(first_index=int(used.index.min()), last_index=int(used.index.max()))
            if prec is not None:
                summary["precision"] = prec
            return summary

        fp = fingerprint(model_sha256=m.sha256, dataset_sha256=ds.sha256, count=ds.n, spec=spec.to_dict())
        if out is None:
            outcome, used, prec = run_all(None, None)
            result = Evaluation(outcome=outcome, summary=finish(outcome, used, prec, None), out=None, dataset=used,
                                model=m)
            _warn_nonfinite(result.summary)
            return result

        out_dir = make_out_dir(out)
        with RunLock(out_dir):
            state = _start_state(out_dir, fp, overwrite=overwrite, resume=resume)
            if isinstance(state, Evaluation):
                return state
            resumed = state is not None
            state = state or RunState(ds.n)
            save_checkpoint(out_dir, state, fp)
            try:
                outcome, used, prec = run_all(state, lambda st: save_checkpoint(out_dir, st, fp))
            except KeyboardInterrupt:
                save_checkpoint(out_dir, state, fp)
                raise Interrupted(f"interrupted after {state.n_done} of {state.n} images; checkpoint saved in "
                                  f"{out_dir}: run the same command with resume=True to continue") from None
            except NonFiniteModel:
                (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # a run of a model that gives only NaN is void
                raise
            except PyRobustError as exc:
                # Failed after the folder was set up: never leave a checkpoint that silently blocks the next run.
                if state.n_done == 0 and not resumed:
                    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
                    raise
                save_checkpoint(out_dir, state, fp)
                raise type(exc)(f"{exc}; the {state.n_done} of {state.n} images finished before it are saved in "
                                f"{out_dir}: fix the cause and run it again with resume=True") from None
            summary = finish(outcome, used, prec, state)
            _warn_nonfinite(summary)
            # Only now, with the new run complete, does an earlier run's output go (summary first, so the folder is
            # never a mix that passes for complete); the checkpoint stays until the new results are written.
            clear_run_files(out_dir)
            write_results(out_dir, outcome, summary)
            (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
            if report:  # after the results: a reporting step never costs finished work
                try:
                    write_report(out_dir, outcome, summary, used)
                except KeyboardInterrupt:
                    raise Interrupted(f"interrupted while drawing the figures; the results are saved in {out_dir} "
                                      "(summary.json, results.npz)") from None
        return Evaluation(outcome=outcome, summary=summary, out=out_dir, resumed=resumed, dataset=used, model=m)

    finally:
        if exported is not None:
            exported.cleanup()
        if connection is not None:  # closed by the run already, unless something failed before it started
            from pyrobust.distributed import disconnect

            disconnect(connection)

def _plan(m: OnnxModel, ds: Dataset, *, batch_size, sessions, scheduler, custom_ops, retune: bool = False,
          max_batch: int | None = None) -> dict:
    """Batch size and session layout: given, or measured for this model and machine (cached)."""
    from pyrobust.tuning import auto_batch_size, auto_layout

    if batch_size == "auto":
        size, how = auto_batch_size(m, retune=retune, max_size=max_batch)
    else:
        size, how = int(batch_size), "given"
    if scheduler is not None:
        parallel = {"choice": "dask"}
    elif sessions == "auto":
        s, per, choice = auto_layout(m, threads=m.threads, batch_size=size, image_shape=ds.image_shape,
                                     n_classes=ds.n_classes, custom_ops=custom_ops, retune=retune)
        parallel = {"sessions": s, "threads_per_session": per, "choice": choice}
    else:
        s = int(sessions)
        if s > m.threads:
            raise InvalidInput(f"sessions ({s}) cannot exceed threads ({m.threads}); give --threads too")
        parallel = {"sessions": s, "threads_per_session": max(1, m.threads // s), "choice": "given"}
    return {"batch_size": size, "batch_size_choice": how, "parallel": parallel}


def holds_only_runs_of(folder: str | os.PathLike, model: str | os.PathLike, *, dataset: str) -> bool:
    """True when ``folder`` holds no run, or only a run (finished or not) of ``model`` on ``dataset``: what
    ``pyrobust demo`` may replace without being told to."""
    import hashlib
    import json

    from pyrobust.checkpoint import checkpoint_fingerprint

    out = Path(folder)
    if not out.is_dir():
        return True
    sha = hashlib.sha256(Path(model).read_bytes()).hexdigest()
    if os.path.lexists(out / CHECKPOINT_FILE):
        try:
            if checkpoint_fingerprint(out).get("model_sha256") != sha:
                return False
        except DataError:
            return False
    if os.path.lexists(out / SUMMARY_FILE):
        try:
            summary = json.loads(read_run_file(out / SUMMARY_FILE, what="summary", max_bytes=256 * 2**20))
            return summary["model"]["sha256"] == sha and summary["dataset"]["spec"] == dataset
        except (DataError, ValueError, KeyError, TypeError):
            return False
    return not run_files(out) or os.path.lexists(out / CHECKPOINT_FILE)


def _start_state(out_dir: Path, fp: dict, *, overwrite: bool, resume: bool) -> RunState | Evaluation | None:
    """Decide what to do with what ``out_dir`` already holds: the state to resume from (a checkpoint comes first:
    an interrupted ``overwrite`` run leaves one beside the earlier run's results), a finished run (resume of a
    complete run), or None for a fresh start. Nothing is deleted here: with ``overwrite`` the earlier run's files
    are replaced only when the new run has finished."""
    complete = os.path.lexists(out_dir / SUMMARY_FILE)
    unfinished = os.path.lexists(out_dir / CHECKPOINT_FILE)
    present = run_files(out_dir, (CHECKPOINT_FILE,))
    if resume and unfinished:
        return load_checkpoint(out_dir, fp)
    if resume and complete:
        outcome, summary = load_results(out_dir)
        count = (summary.get("precision") or {}).get("images_total", summary["dataset"]["count"])
        saved = fingerprint(model_sha256=summary["model"]["sha256"], dataset_sha256=summary["dataset"]["sha256"],
                            count=count, spec=NoiseSpec.from_dict(summary["settings"]).to_dict())
        if saved != fp:
            raise InvalidInput(f"{out_dir} holds a finished run of another model, data or settings; pass "
                               "overwrite=True to replace it or choose another output folder")
        return Evaluation(outcome=outcome, summary=summary, out=out_dir, resumed=True, already_complete=True)
    if present and not overwrite and not resume:
        if unfinished:
            what = "an unfinished run (checkpoint.npz)" + (" beside an earlier run's results" if complete else "")
            hint = "pass resume=True to continue it, overwrite=True to start over,"
        else:
            what, hint = "a run's results", "pass overwrite=True to replace them"
        others = [f for f in present if f != CHECKPOINT_FILE]
        listed = f" ({', '.join(others)})" if others and not unfinished else ""
        raise OutputError(f"{out_dir}: already holds {what}{listed}; {hint} or choose another output folder")
    return None


def _warn_nonfinite(summary: dict) -> None:
    nonfinite = summary["metrics"]["nonfinite_outputs"]
    if nonfinite:
        warnings.warn(f"{nonfinite} image(s) got NaN or infinite model outputs; they count as failures with "
                      "label -2 (non-finite)", NonFiniteOutputWarning, stacklevel=3)


class NonFiniteModel(ModelError):
    """Every output of the model is NaN or infinite: nothing can be measured (exit code 3)."""


def _refuse_all_nonfinite(outcome: Outcome, path) -> None:
    if outcome.n and bool((outcome.clean_prediction == NONFINITE).all()):
        raise NonFiniteModel(f"{path}: every output of the model is NaN or infinite ({outcome.n} clean images), so "
                             "there is nothing to measure; check the model's export and the input range and "
                             "normalisation it expects")


def _run_to_precision(ds: Dataset, precision: float, seed: int, execute, state: RunState | None, on_checkpoint,
                      model_path) -> tuple[Outcome, Dataset, dict]:
    """Evaluate ``ds`` look by look in a seeded random order until both 95 % intervals are within ``precision``.

    Each look runs only its new images (any back end, through ``execute``) and merges them into ``state``, which
    covers the whole dataset, so a checkpoint saved during a look holds every finished image and a resumed run
    skips them: the order and the looks are fixed by the seed and the dataset size.
    """
    state = state if state is not None else RunState(ds.n)
    order = random_order(seed, ds.n)
    looks = look_schedule(ds.n)
    alpha_side = precision_alpha_side(len(looks))
    reached, n = False, 0
    widths: dict = {}
    for n in looks:
        pos = np.sort(order[:n])
        todo = pos[~state.done[pos]]
        if todo.size:
            sub = RunState(todo.size)
            before = (state.inferences, state.noisy_inferences, state.seconds)

            def merge(part: RunState, todo=todo, before=before) -> None:
                done = part.done
                for name in ("clean_prediction", "first_failure", "failure_label"):
                    getattr(state, name)[todo[done]] = getattr(part, name)[done]
                state.done[todo[done]] = True
                state.inferences = before[0] + part.inferences
                state.noisy_inferences = before[1] + part.noisy_inferences
                state.seconds = before[2] + part.seconds

            try:
                execute(ds.take(todo), sub, None if on_checkpoint is None else
                        (lambda part, merge=merge: (merge(part), on_checkpoint(state))))
            finally:
                merge(sub)  # what finished before an interruption is kept for the checkpoint
            if on_checkpoint is not None:
                on_checkpoint(state)
        _refuse_all_nonfinite(Outcome(index=ds.index[pos], label=ds.labels[pos],
                                      clean_prediction=state.clean_prediction[pos],
                                      first_failure=state.first_failure[pos], failure_label=state.failure_label[pos]),
                              model_path)
        ff = state.first_failure[pos]
        widths = {}
        for name, hits in (("robust", int(np.count_nonzero(ff == ROBUST))), ("accuracy", int(np.count_nonzero(ff)))):
            p, lo, hi, half = (float(v) for v in precision_bounds(hits, n, alpha_side))
            widths[name] = {"fraction": p, "interval": [lo, hi], "half_width": half}
        if all(w["half_width"] <= precision for w in widths.values()):
            reached = True
            break
    used = ds.take(pos)
    outcome = Outcome(index=used.index.copy(), label=used.labels.copy(),
                      clean_prediction=state.clean_prediction[pos].copy(),
                      first_failure=state.first_failure[pos].copy(),
                      failure_label=state.failure_label[pos].copy(), inferences=state.inferences,
                      noisy_inferences=state.noisy_inferences, seconds=state.seconds)
    worst = max(w["half_width"] for w in widths.values())
    reason = (f"both intervals within ±{precision:.2%} after {n} of {ds.n} images" if reached and n < ds.n else
              f"both intervals within ±{precision:.2%} only with every image" if reached else
              f"the data ran out: ±{worst:.2%} with all {ds.n} images, short of ±{precision:.2%}")
    prec = {"target": precision, "confidence": PRECISION_CONFIDENCE, "method": "clopper-pearson, bonferroni over looks",
            "looks_planned": looks, "confidence_per_look": 1 - 2 * alpha_side, "order_seed": seed,
            "reached": reached, "stopped_early": n < ds.n, "images_evaluated": int(n), "images_total": ds.n,
            "reason": reason, **widths}
    return outcome, used, prec


def _is_torch_module(obj) -> bool:
    return any(c.__module__.startswith("torch.nn") and c.__name__ == "Module" for c in type(obj).__mro__)


@dataclass
class _Exported:
    path: Path
    name: str
    tmp: object

    def cleanup(self) -> None:
        self.tmp.cleanup()


def _export_module(module, ds: Dataset, spec: NoiseSpec) -> _Exported:
    """Export a torch module to ONNX in a private temporary folder, checked for parity with torch on the first
    images as the engine feeds them (normalised when ``mean``/``std`` are given)."""
    import tempfile

    from pyrobust.engine import _channel_values, _prepare
    from pyrobust.training import check_parity, export_onnx

    module.eval()
    tmp = tempfile.TemporaryDirectory(prefix="pyrobust-module-")
    path = Path(tmp.name) / "module.onnx"
    c = ds.image_shape[2]
    try:
        export_onnx(module, ds.image_shape, path, metadata={"pyrobust.source": f"torch module {type(module).__name__}"})
        sample = _prepare(ds, slice(0, min(ds.n, 64)), _channel_values(spec.mean, c, "mean"),
                          _channel_values(spec.std, c, "std"))
        check_parity(module, path, np.ascontiguousarray(sample.transpose(0, 3, 1, 2), dtype=np.float32))
    except BaseException:
        tmp.cleanup()
        raise
    return _Exported(path, f"{type(module).__name__} (torch module)", tmp)

