"""One driver loop over every back end: this thread, parallel sessions, or a Dask cluster.

A back end runs the protocol on the images still to do and produces :class:`Update` values: the positions whose
results became final, with those results and the inferences run meanwhile. :func:`drive` is the only loop that
folds them into the run's :class:`~pyrobust.types.RunState`, reports progress and saves checkpoints, whichever back
end produced them. ``done`` is set last, so a checkpoint holds only final results, and because the noise of each
(image, step) depends only on (seed, original index, step), results are bit-identical whatever the back end, the
shards and the workers.

* ``single``: the loop in this thread, an update after every batch.
* ``sessions``: several onnxruntime sessions fed from Python threads (onnxruntime and the serial noise kernel
  release the GIL), one shard each at a time; each session sends its updates after every batch.
* ``dask``: shards sent to the workers of a Dask cluster (:mod:`pyrobust.engine.dask`), an update per shard."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pyrobust.data.dataset import Dataset
from pyrobust.engine.loop import Progress, iter_protocol, warm_up_kernels
from pyrobust.engine.runtime import BoundModel
from pyrobust.engine.updates import Update, drive, make_shards
from pyrobust.types import NoiseSpec, Outcome, RunState


@dataclass(frozen=True)
class Layout:
    """Where a run's images go: ``single`` (this thread), ``sessions`` (parallel sessions here) or ``dask``."""

    kind: str = "single"
    sessions: int = 1
    threads_per_session: int = 1
    scheduler: str | None = None
    shard_size: int | None = None
    choice: str = "given"  # given, cached or measured (pyrobust.engine.tuning)

    def describe(self) -> dict:
        if self.kind == "dask":
            return {"choice": "dask", "scheduler": self.scheduler}
        return {"sessions": self.sessions, "threads_per_session": self.threads_per_session, "choice": self.choice}


def execute(model: BoundModel, dataset: Dataset, spec: NoiseSpec, state: RunState | None = None, *,
            positions: np.ndarray | None = None, layout: Layout = Layout(), batch_size: int = 256,
            chunk_size: int = 4096, custom_ops=None, connection=None, progress: Progress | None = None,
            on_checkpoint: Callable[[RunState], None] | None = None,
            checkpoint_every: float = 30.0) -> tuple[Outcome, dict]:
    """Run the protocol on the images of ``dataset`` that ``state`` has not done (only those at ``positions``, when
    given) on ``layout``'s back end; ``model`` is bound to the data. Returns the outcome of every image of
    ``dataset`` (in dataset order; images never run keep the ``ROBUST`` placeholders) and what ran where.
    ``connection``: an open Dask connection for ``layout.kind == "dask"`` (:func:`pyrobust.engine.dask.connect`)."""
    state = state if state is not None else RunState(dataset.n)
    todo = np.flatnonzero(~state.done)
    if positions is not None:
        todo = np.intersect1d(todo, np.asarray(positions, np.int64))
    info: dict = {}
    warm_up_kernels()  # numba's compilation or cache load stays out of the timing
    if layout.kind == "dask":
        from pyrobust.engine.dask import dask_updates

        updates = dask_updates(model, dataset, spec, todo, connection=connection, batch_size=batch_size,
                               chunk_size=chunk_size, shard_size=layout.shard_size, info=info)
    elif layout.kind == "sessions" and layout.sessions > 1:
        updates = _session_updates(model, dataset, spec, todo, layout=layout, batch_size=batch_size,
                                   chunk_size=chunk_size, custom_ops=custom_ops, info=info)
    else:
        updates = _single_updates(model, dataset, spec, todo, batch_size=batch_size, chunk_size=chunk_size)
    drive(updates, state, progress=progress, on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every)
    return state.outcome(dataset, counted=spec.count_failures), info


def _single_updates(model, dataset, spec, todo, *, batch_size, chunk_size) -> Iterator[Update]:
    sub = RunState(dataset.n)
    sub.done[:] = True
    sub.done[todo] = False
    counted = [0, 0]
    for done in iter_protocol(model, dataset, spec, sub, batch_size=batch_size, chunk_size=chunk_size):
        yield Update.of(sub, done, done, counted)


class _Stopped(Exception):
    """Raised inside a session's thread when the run is being stopped."""


def _session_updates(model, dataset, spec, todo, *, layout: Layout, batch_size, chunk_size, custom_ops,
                     info: dict) -> Iterator[Update]:
    sessions = layout.sessions
    shards = make_shards(todo, workers=sessions, shard_size=layout.shard_size)
    info.update(sessions=sessions, threads_per_session=layout.threads_per_session, shards=len(shards))
    # sessions of the model's own bytes (read once, hashed once), each bound like the original
    models = [model.copy(threads=layout.threads_per_session) for _ in range(sessions)]
    free = list(range(sessions))
    lock = threading.Lock()
    stop = threading.Event()
    results: queue.SimpleQueue = queue.SimpleQueue()

    def work(positions: np.ndarray) -> None:
        with lock:
            slot = free.pop()
        try:
            part = dataset.take(positions)
            sub = RunState(part.n)
            counted = [0, 0]
            for done in iter_protocol(models[slot], part, spec, sub, batch_size=batch_size, chunk_size=chunk_size):
                results.put(Update.of(sub, done, positions[done], counted))
                if stop.is_set():  # the run is stopping: every session stops within one batch
                    raise _Stopped
        finally:
            with lock:
                free.append(slot)

    pool = ThreadPoolExecutor(max_workers=sessions, thread_name_prefix="pyrobust-session")
    pending = {pool.submit(work, s) for s in shards}
    try:
        while True:
            try:
                yield results.get(timeout=0.5)
                continue
            except queue.Empty:
                pass
            for f in [f for f in pending if f.done()]:
                f.result()  # a shard's error surfaces here
                pending.discard(f)
            if not pending and results.empty():
                return
    finally:
        stop.set()
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
