"""What every back end produces and the one loop that consumes it: an :class:`Update` (images whose results
became final), :func:`drive` (folds updates into the run's state, reports progress, saves checkpoints) and
:func:`make_shards` (the shards the parallel back ends hand out). Shared by :mod:`pyrobust.engine.backends` and
:mod:`pyrobust.engine.dask`, which never import each other at module level."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pyrobust.engine.loop import Progress
from pyrobust.types import RunState


@dataclass(frozen=True)
class Update:
    """Images whose results became final (``positions`` into the run's dataset) and the inferences run since the
    back end's previous update."""

    positions: np.ndarray
    clean_prediction: np.ndarray
    first_failure: np.ndarray
    failure_label: np.ndarray
    inferences: int
    noisy_inferences: int
    failures: np.ndarray | None = None  # with count_failures
    clean_margin: np.ndarray | None = None

    @classmethod
    def of(cls, sub: RunState, local: np.ndarray, positions: np.ndarray, counted: list[int]) -> Update:
        """The results at ``local`` of a back end's own state ``sub`` (``positions``: where they go in the run)."""
        u = cls(positions, sub.clean_prediction[local], sub.first_failure[local], sub.failure_label[local],
                sub.inferences - counted[0], sub.noisy_inferences - counted[1], sub.failures[local],
                sub.clean_margin[local])
        counted[:] = [sub.inferences, sub.noisy_inferences]
        return u


def drive(updates: Iterator[Update], state: RunState, *, progress: Progress | None = None,
          on_checkpoint: Callable[[RunState], None] | None = None, checkpoint_every: float = 30.0) -> None:
    """Fold ``updates`` into ``state`` as they come: progress after each, a checkpoint at most every
    ``checkpoint_every`` seconds. ``state`` is consistent whenever this stops, Ctrl-C included."""
    state.sessions += 1
    t0 = last = time.perf_counter()
    seconds_before = state.seconds
    try:
        for u in updates:
            state.clean_prediction[u.positions] = u.clean_prediction
            state.first_failure[u.positions] = u.first_failure
            state.failure_label[u.positions] = u.failure_label
            if u.failures is not None:
                state.failures[u.positions] = u.failures
            if u.clean_margin is not None:
                state.clean_margin[u.positions] = u.clean_margin
            state.done[u.positions] = True  # last: only final results are ever marked done
            state.inferences += u.inferences
            state.noisy_inferences += u.noisy_inferences
            now = time.perf_counter()
            state.seconds = seconds_before + (now - t0)
            if progress is not None:
                progress(state.n_done, state.n, state.inferences)
            if on_checkpoint is not None and now - last >= checkpoint_every:
                on_checkpoint(state)
                last = time.perf_counter()
    finally:
        state.seconds = seconds_before + (time.perf_counter() - t0)
        close = getattr(updates, "close", None)
        if close is not None:  # stop the back end now (its sessions or shards), not when the generator is collected
            close()


def make_shards(todo: np.ndarray, *, workers: int, shard_size: int | None = None,
                max_size: int = 4096) -> list[np.ndarray]:
    """``todo`` (positions) cut into shards: by default about four per worker, 64 to ``max_size`` images each."""
    if todo.size == 0:
        return []
    size = shard_size or max(64, min(max_size, math.ceil(todo.size / (4 * workers))))
    return [todo[i: i + size] for i in range(0, todo.size, size)]
