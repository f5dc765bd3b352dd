"""Several onnxruntime sessions fed in parallel on one machine, and the sharding both this and the Dask scheduler use.

The images still to do are cut into shards; each worker (here a Python thread with its own session: onnxruntime
and the serial noise kernel release the GIL) takes the next shard, runs the engine on it, and the shard's per-image
results are merged into the run's state by position. Because the noise of each (image, step) depends only on
(seed, original index, step), results are bit-identical to a single-process run whatever the shards and workers.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from pyrobust.datasets import Dataset
from pyrobust.engine import RunState, run_protocol
from pyrobust.runtime import OnnxModel
from pyrobust.types import NoiseSpec, Outcome


class _Stopped(Exception):
    """Raised inside a worker thread when the run is being interrupted."""


def make_shards(state: RunState, *, workers: int, shard_size: int | None = None,
                max_size: int = 4096) -> list[np.ndarray]:
    """Positions still to do, cut into shards: by default about four per worker, 64 to ``max_size`` images each."""
    todo = np.flatnonzero(~state.done)
    if todo.size == 0:
        return []
    size = shard_size or max(64, min(max_size, math.ceil(todo.size / (4 * workers))))
    return [todo[i: i + size] for i in range(0, todo.size, size)]


def merge(state: RunState, positions: np.ndarray, part: Outcome, lock: threading.Lock | None = None) -> None:
    """Write a shard's results into ``state``; ``done`` last, so a checkpoint taken meanwhile stays consistent."""
    if lock is not None:
        with lock:
            merge(state, positions, part)
        return
    state.clean_prediction[positions] = part.clean_prediction
    state.first_failure[positions] = part.first_failure
    state.failure_label[positions] = part.failure_label
    state.inferences += part.inferences
    state.noisy_inferences += part.noisy_inferences
    state.done[positions] = True


def run_sessions(
    model,
    dataset: Dataset,
    spec: NoiseSpec,
    *,
    sessions: int,
    threads_per_session: int,
    batch_size: int,
    chunk_size: int = 4096,
    custom_ops=None,
    progress: Callable[[int, int, int], None] | None = None,
    state: RunState | None = None,
    on_checkpoint: Callable[[RunState], None] | None = None,
    checkpoint_every: float = 30.0,
    shard_size: int | None = None,
) -> tuple[Outcome, dict]:
    """Evaluate ``dataset`` with ``sessions`` sessions of ``threads_per_session`` threads each, fed in parallel.
    Returns the outcome (dataset order) and a description of the work (sessions, shards)."""
    state = state or RunState(dataset.n)
    state.sessions += 1
    shards = make_shards(state, workers=sessions, shard_size=shard_size)
    # sessions of the model's own bytes (read once, hashed once), or of a path
    models = [model.copy(threads=threads_per_session) if isinstance(model, OnnxModel) else
              OnnxModel(model, threads=threads_per_session, custom_ops=custom_ops) for _ in range(sessions)]
    free = list(range(sessions))
    lock = threading.Lock()
    stop = threading.Event()

    t0 = time.perf_counter()
    seconds_before = state.seconds

    def work(positions: np.ndarray) -> None:
        """One shard on a free session. Its images are folded into ``state`` as they finish (after every batch),
        so the checkpoint and the progress are as fresh as with one session."""
        sub = RunState(positions.size)
        merged = np.zeros(positions.size, np.bool_)
        counted = [0, 0]

        def fold() -> None:
            with lock:
                new = sub.done & ~merged
                if new.any():
                    where = positions[new]
                    state.clean_prediction[where] = sub.clean_prediction[new]
                    state.first_failure[where] = sub.first_failure[new]
                    state.failure_label[where] = sub.failure_label[new]
                    state.done[where] = True  # last: a checkpoint taken meanwhile stays consistent
                    merged[new] = True
                state.inferences += sub.inferences - counted[0]
                state.noisy_inferences += sub.noisy_inferences - counted[1]
                counted[:] = [sub.inferences, sub.noisy_inferences]

        def after_batch(done, total, inferences) -> None:
            if stop.is_set():  # Ctrl-C: the other sessions stop within one batch
                raise _Stopped
            fold()

        with lock:
            slot = free.pop()
        try:
            run_protocol(models[slot], dataset.take(positions), spec, batch_size=batch_size, chunk_size=chunk_size,
                         progress=after_batch, state=sub)
            fold()
        finally:
            with lock:
                free.append(slot)

    last = time.perf_counter()
    with ThreadPoolExecutor(max_workers=sessions, thread_name_prefix="pyrobust-session") as pool:
        pending = {pool.submit(work, s) for s in shards}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()  # a shard's error surfaces here
                state.seconds = seconds_before + time.perf_counter() - t0
                if progress is not None:
                    progress(state.n_done, state.n, state.inferences)
                if on_checkpoint is not None and time.perf_counter() - last >= checkpoint_every:
                    with lock:
                        on_checkpoint(state)
                    last = time.perf_counter()
        except BaseException:
            stop.set()
            for f in pending:
                f.cancel()
            raise
    state.seconds = seconds_before + time.perf_counter() - t0
    return state.outcome(dataset), {"sessions": sessions, "threads_per_session": threads_per_session,
                                    "shards": len(shards)}
