"""Plan a run once, then execute it: validate every option, check the memory budget, load and bind the model, choose
the batch size and the back end, and reach the Dask cluster, all before any output is written or any work starts.

``evaluate``, ``gate`` and ``reproduce`` all go through :func:`plan_run` and :meth:`RunPlan.execute`, so every
run option means the same thing, and is available, everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import cast

import numpy as np

from perturbcore.families import Family
from pyrobust.data.dataset import DataSelection, Dataset, from_arrays
from pyrobust.data.load import load_selected
from pyrobust.engine.backends import Layout, execute
from pyrobust.engine.loop import Progress, bind_model, check_spec_for_data, working_memory_bytes
from pyrobust.engine.runtime import BoundModel, OnnxModel
from pyrobust.errors import DataError, InvalidInput
from pyrobust.machine import THREADS, check_threads, memory_budget
from pyrobust.types import NoiseSpec, Outcome, RunState, fingerprint
from pyrobust.validate import Constraint, Integer, Number, check_fields, declare

OPTION_CONSTRAINTS: dict[str, Constraint] = {
    "batch_size": Integer(1, words=("auto",)),
    "chunk_size": Integer(1),
    "sessions": Integer(1, words=("auto",)),
    "shard_size": Integer(1, none=True),
    "threads": THREADS,
    "checkpoint_every": Number(0, lo_open=True, unit="seconds"),
}


@dataclass(frozen=True)
class RunOptions:
    """How a run uses the machine; none of these changes a per-image result.

    ``batch_size`` and ``sessions`` (parallel onnxruntime sessions sharing ``threads`` cores) are measured for the
    model and machine when ``"auto"`` (cached; ``retune`` measures again). ``scheduler`` (``"local:N"`` or
    ``"tcp://host:port"``) runs the images on a Dask cluster in shards of ``shard_size``. ``max_memory_mb`` bounds
    the data and buffers (default: 80 % of the available memory). ``custom_ops``: a custom-op library for
    onnxruntime. ``checkpoint_every``: seconds between checkpoints of a run with an output folder."""

    batch_size: int | str = "auto"
    chunk_size: int = 4096
    threads: int | None = None
    sessions: int | str = "auto"
    scheduler: str | None = None
    shard_size: int | None = None
    max_memory_mb: float | None = None
    custom_ops: str | os.PathLike | None = None
    retune: bool = False
    checkpoint_every: float = 30.0

    def __post_init__(self) -> None:
        check_fields(self, OPTION_CONSTRAINTS)
        memory_budget(self.max_memory_mb)
        if self.scheduler is not None:
            from pyrobust.engine.dask import check_scheduler

            check_scheduler(self.scheduler)

    @property
    def budget(self) -> int | None:
        return memory_budget(self.max_memory_mb)


declare("RunOptions", OPTION_CONSTRAINTS, RunOptions)
NOISE_FIELDS = tuple(f.name for f in fields(NoiseSpec))
OPTION_FIELDS = tuple(f.name for f in fields(RunOptions))


SELECTION_FIELDS = tuple(f.name for f in fields(DataSelection))


def split_settings(settings: dict, *, noise: NoiseSpec | str | Family | None = None, options: RunOptions | None = None,
                   data: DataSelection | None = None) -> tuple[NoiseSpec, RunOptions, DataSelection]:
    """The records a run takes, from the records given and keyword settings beside them (``pixels=``,
    ``batch_size=``, ``limit=``, ...), which replace their values: a :class:`NoiseSpec`, :class:`RunOptions` and
    a :class:`DataSelection`. An unknown name is refused with the names that exist. ``noise`` may also be a noise
    family, written (``"gaussian:sigma=0.1"``) or built (``Gaussian(sigma=0.1)``): the paper's settings otherwise."""
    if isinstance(noise, (str, Family)):
        noise = NoiseSpec(corruption=cast(Family, noise))  # NoiseSpec parses text
    unknown = sorted(set(settings) - set(NOISE_FIELDS) - set(OPTION_FIELDS) - set(SELECTION_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown setting(s) {', '.join(unknown)}; noise settings are {', '.join(NOISE_FIELDS)}, "
                           f"run options {', '.join(OPTION_FIELDS)} and data selections "
                           f"{', '.join(SELECTION_FIELDS)}")
    for name, record, kind in (("noise", noise, NoiseSpec), ("options", options, RunOptions),
                               ("data", data, DataSelection)):
        if record is not None and not isinstance(record, kind):
            raise InvalidInput(f"{name} must be a {kind.__name__}; got {type(record).__name__}")
    given = {k: v for k, v in settings.items() if k in NOISE_FIELDS}
    for k in ("mean", "std"):
        if given.get(k) is not None and not isinstance(given[k], (int, float)):
            given[k] = tuple(given[k])
        elif isinstance(given.get(k), (int, float)):
            given[k] = (given[k],)

    def merged(record, kind, names):
        values = {k: v for k, v in settings.items() if k in names}
        return replace(record, **values) if record is not None else kind(**values)

    spec = replace(noise, **given) if noise is not None else NoiseSpec(**given)
    return spec, merged(options, RunOptions, OPTION_FIELDS), merged(data, DataSelection, SELECTION_FIELDS)


def load_data(dataset, labels=None, *, selection: DataSelection | None = None,
              max_bytes: int | None = None) -> tuple[Dataset, str]:
    """The images to evaluate and the spec that names them: ``dataset`` is a spec (``"mnist:test"``), a
    :class:`Dataset`, image arrays with ``labels``, or an ``(x, y)`` pair; ``selection`` takes part of it."""
    sel = selection if selection is not None else DataSelection()
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
        ds = dataset.select(start=sel.start, stop=sel.stop, limit=sel.limit, sample=sel.sample,
                            sample_seed=sel.sample_seed)
        return ds, ds.spec
    if not isinstance(dataset, str):
        raise InvalidInput(f"dataset must be a spec such as 'mnist:test', a Dataset or image arrays; got "
                           f"{type(dataset).__name__}")
    return load_selected(dataset, sel, max_bytes=max_bytes), dataset


@dataclass
class RunPlan:
    """A bound model, its data, the noise and how the run is spread: ready to execute, any number of times (on the
    whole dataset or on positions of it). Close it (or use it as a context manager) to release the cluster."""

    model: BoundModel
    dataset: Dataset
    noise: NoiseSpec
    options: RunOptions
    batch_size: int
    batch_size_choice: str  # given, cached or measured
    layout: Layout
    connection: object | None = None
    _own_connection: bool = False

    def execute(self, state: RunState | None = None, *, positions: np.ndarray | None = None,
                progress: Progress | None = None, on_checkpoint=None) -> tuple[Outcome, dict]:
        """The protocol on the images ``state`` has not done (only at ``positions`` when given); returns the
        outcome of the whole dataset and what ran where."""
        return execute(self.model, self.dataset, self.noise, state, positions=positions, layout=self.layout,
                       batch_size=self.batch_size, chunk_size=int(self.options.chunk_size),
                       custom_ops=self.options.custom_ops, connection=self.connection, progress=progress,
                       on_checkpoint=on_checkpoint, checkpoint_every=float(self.options.checkpoint_every))

    def settings(self, info: dict, state: RunState | None = None) -> dict:
        """The run settings a summary records (the noise is recorded apart)."""
        return {"batch_size": self.batch_size, "batch_size_choice": self.batch_size_choice,
                "chunk_size": int(self.options.chunk_size), "threads": self.model.threads,
                "ort_spinning": self.model.spinning, "parallel": {**self.layout.describe(), **info},
                "resumed_sessions": state.sessions if state is not None else 1}

    def fingerprint(self) -> dict:
        return fingerprint(model_sha256=self.model.sha256, dataset_sha256=self.dataset.sha256, count=self.dataset.n,
                           spec=self.noise.to_dict())

    def close(self) -> None:
        if self.connection is not None and self._own_connection:
            from pyrobust.engine.dask import disconnect

            disconnect(self.connection)
        self.connection = None

    def __enter__(self) -> RunPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plan_run(model, dataset: Dataset, noise: NoiseSpec, options: RunOptions, *, status=None,
             connection=None, output: str | None = None) -> RunPlan:
    """Everything a run needs, checked before any work: ``model`` is an ONNX file or a loaded
    :class:`~pyrobust.engine.runtime.OnnxModel` or :class:`~pyrobust.engine.runtime.BoundModel` (bound again to
    this data; it then runs as the only session unless ``sessions`` is given); ``output`` names the output that
    holds the class scores (default: the one that unambiguously does).
    Memory: the data, the engine's buffers for every session, and onnxruntime's working memory per image must fit
    the budget; the batch sizes ``auto`` may pick are bounded by it."""
    status = status or (lambda text: None)
    if isinstance(model, BoundModel):
        model = model.model  # bound again below, to this data
    threads = check_threads(options.threads)  # at most the CPUs available (with a warning)
    budget = options.budget
    check_spec_for_data(noise, dataset.image_shape)
    sessions, batch_size, scheduler = options.sessions, options.batch_size, options.scheduler
    if isinstance(model, OnnxModel) and sessions == "auto":
        sessions = 1  # the caller's own session is the one that runs
    most_sessions = int(sessions) if sessions != "auto" else threads if scheduler is None else 1
    need = dataset.memory_bytes + most_sessions * working_memory_bytes(
        dataset, batch_size=1024 if batch_size == "auto" else int(batch_size), chunk_size=int(options.chunk_size))
    if budget is not None and need > budget:
        raise DataError(f"{dataset.spec}: evaluating {dataset.n} images needs about {need / 2**20:.0f} MiB "
                        f"({dataset.memory_bytes / 2**20:.0f} MiB of images in memory), more than the "
                        f"{budget / 2**20:.0f} MiB allowed (--max-memory); use a smaller --chunk-size, fewer "
                        "--sessions or a --range")
    status("loading the model")
    m = model if isinstance(model, OnnxModel) else OnnxModel(Path(model), threads=threads,
                                                             custom_ops=options.custom_ops, output=output)
    bound, noise = bind_model(m, dataset, noise)  # every model and shape error surfaces before any output is touched
    max_batch = _batch_bound(bound, dataset, need, budget, batch_size, 1 if scheduler is not None else most_sessions)
    if batch_size == "auto" or sessions == "auto":
        status("choosing the batch size and session layout (measured once per model and machine, then cached)")
    from pyrobust.engine.tuning import auto_batch_size, auto_layout

    if batch_size == "auto":
        size, how = auto_batch_size(bound, retune=options.retune, max_size=max_batch)
    else:
        size, how = int(batch_size), "given"
    if scheduler is not None:
        layout = Layout("dask", scheduler=scheduler, shard_size=options.shard_size, choice="dask")
    elif sessions == "auto":
        s, per, choice = auto_layout(bound, threads=bound.threads, batch_size=size, image_shape=dataset.image_shape,
                                     n_classes=dataset.n_classes, custom_ops=options.custom_ops,
                                     retune=options.retune)
        layout = Layout("sessions" if s > 1 else "single", s, per, shard_size=options.shard_size, choice=choice)
    else:
        s = int(sessions)
        if s > bound.threads:
            raise InvalidInput(f"sessions ({s}) cannot exceed threads ({bound.threads}); give --threads too")
        layout = Layout("sessions" if s > 1 else "single", s, max(1, bound.threads // s), shard_size=options.shard_size)
    plan = RunPlan(bound, dataset, noise, options, size, how, layout)
    if scheduler is not None:  # reach the cluster before any output is written
        from pyrobust.engine.dask import connect

        plan.connection, plan._own_connection = (connection, False) if connection is not None else \
            (connect(scheduler), True)
    return plan


def _batch_bound(m: BoundModel, dataset: Dataset, need: int, budget: int | None, batch_size, copies: int) -> int | None:
    """The largest batch whose onnxruntime working memory (estimated per image) fits beside ``need``."""
    if budget is None:
        return None
    from pyrobust.engine.tuning import BATCH_SIZES

    per_image = m.memory_per_image()
    candidates = BATCH_SIZES if batch_size == "auto" else (int(batch_size),)
    fits = [b for b in candidates if need + per_image * b * copies <= budget]
    if not fits:
        smallest = min(candidates)
        model_need = int(per_image * smallest * copies)
        raise DataError(f"{dataset.spec}: evaluating with batches of {smallest} needs about "
                        f"{(need + model_need) / 2**20:.0f} MiB ({model_need / 2**20:.0f} MiB of it the model's "
                        f"working memory, about {per_image / 2**10:.0f} KiB an image), more than the "
                        f"{budget / 2**20:.0f} MiB allowed (--max-memory); use a smaller --batch-size or fewer "
                        "--sessions")
    return max(fits)
