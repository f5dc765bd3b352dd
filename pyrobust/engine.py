"""The evaluation loop: a pool of ``batch_size`` slots, each holding one image at its current step.

Every iteration the noise kernel writes the next input of every busy slot straight into the model's input buffer,
onnxruntime scores the batch, and the tracking kernel records the outcome. A slot whose image is fooled (or survives
``max_steps``) is refilled at once with the next image, so batches stay full and fooled images cost nothing more.
Step 0 is the clean pass and runs through the same loop. Originals are converted (to float, normalised, into the
model's layout) one chunk of ``chunk_size`` images at a time, and each slot keeps its own copy of its image, so
memory is bounded by ``batch_size`` and ``chunk_size``, not by the dataset.

Because the noise of (image, step) depends only on (seed, original index, step, draw), the per-image results do not
depend on ``batch_size``, thread counts, ``chunk_size``, the order of images or which subset is evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

import perturbcore
from pyrobust.datasets import Dataset
from pyrobust.errors import InvalidInput
from pyrobust.runtime import OnnxModel
from pyrobust.types import ROBUST, NoiseSpec, Outcome

Progress = Callable[[int, int, int], None]  # (images finished, images in all, inferences run)


def _channel_values(values, channels: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float32)
    if arr.size == 1:
        return np.full(channels, arr.item(), np.float32)
    if arr.size != channels:
        raise InvalidInput(f"{name} needs 1 or {channels} values for {channels}-channel images; got {arr.size}")
    return arr


def check_spec_for_data(spec: NoiseSpec, image_shape: tuple[int, int, int]) -> None:
    h, w, c = image_shape
    if spec.pixels > h * w:
        raise InvalidInput(f"pixels must be an integer in [1, {h * w}] for {h}x{w} images; got {spec.pixels}")
    _channel_values(spec.mean, c, "mean")
    _channel_values(spec.std, c, "std")


def bind_model(model: OnnxModel, dataset: Dataset, spec: NoiseSpec) -> None:
    """Check ``spec`` against the data and bind ``model`` to the data's shape, probing it on the first image, so
    every model or shape error surfaces before any work starts."""
    check_spec_for_data(spec, dataset.image_shape)
    c = dataset.image_shape[2]
    probe = _prepare(dataset, slice(0, 1), _channel_values(spec.mean, c, "mean"), _channel_values(spec.std, c, "std"))
    model.bind(dataset.image_shape, n_classes=dataset.n_classes, probe=probe)


class RunState:
    """The per-image results of a run as it goes, plus which images are finished.

    The engine marks an image ``done`` only after its results are written, so a state saved at any moment holds
    only final results; an image in flight when a run stops is simply evaluated again on resume, and because its
    noise depends only on (seed, index, step) it gets exactly the same result.
    """

    def __init__(self, n: int) -> None:
        self.clean_prediction = np.full(n, ROBUST, np.int32)
        self.first_failure = np.full(n, ROBUST, np.int32)
        self.failure_label = np.full(n, ROBUST, np.int32)
        self.done = np.zeros(n, np.bool_)
        self.inferences = 0
        self.noisy_inferences = 0
        self.seconds = 0.0
        self.sessions = 0

    ARRAYS = ("clean_prediction", "first_failure", "failure_label", "done")

    @property
    def n(self) -> int:
        return int(self.done.shape[0])

    @property
    def n_done(self) -> int:
        return int(np.count_nonzero(self.done))

    def outcome(self, dataset: Dataset) -> Outcome:
        return Outcome(index=dataset.index.copy(), label=dataset.labels.copy(),
                       clean_prediction=self.clean_prediction.copy(), first_failure=self.first_failure.copy(),
                       failure_label=self.failure_label.copy(), inferences=self.inferences,
                       noisy_inferences=self.noisy_inferences, seconds=self.seconds)


def run_protocol(
    model: OnnxModel,
    dataset: Dataset,
    spec: NoiseSpec,
    *,
    batch_size: int = 256,
    chunk_size: int = 4096,
    kernel_threads: int = 1,
    pack: bool = True,
    progress: Progress | None = None,
    state: RunState | None = None,
    on_checkpoint: Callable[[RunState], None] | None = None,
    checkpoint_every: float = 30.0,
) -> Outcome:
    """Run the paper's protocol on every image of ``dataset``; return per-image outcomes in dataset order.

    onnxruntime's threads are the model session's. The noise kernel runs on ``kernel_threads`` numba threads, 1 by
    default: for a 28x28 batch of 256 it takes ~0.07 ms serially against ~5 ms of inference, while numba's OpenMP
    workers keep spinning after a parallel region and slow the next inference down
    (``benchmarks/test_bench_engine.py::test_thread_pools`` measures it).

    ``pack``: when fewer images are in play than the batch holds (a small dataset, or the last robust images of a
    large one), each image fills several rows with its next steps. Steps s..s+j of an image are independent draws
    from the original, so they can be scored together, and the first failure among them is the image's first-failure
    step: results are bit-identical to the unpacked run, only some inferences past a failure are wasted. Packing
    applies to the restart mode; a random walk is sequential by nature.

    ``state`` continues an earlier run: images it marks done are skipped. ``on_checkpoint(state)`` is called at
    most every ``checkpoint_every`` seconds with a consistent state (and the state object is consistent whenever
    the run stops, Ctrl-C included).
    """
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be >= 1; got {batch_size}")
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be >= 1; got {chunk_size}")
    if kernel_threads < 1:
        raise InvalidInput(f"kernel_threads must be >= 1; got {kernel_threads}")
    bind_model(model, dataset, spec)
    h, w, c = dataset.image_shape
    mean = _channel_values(spec.mean, c, "mean")
    std = _channel_values(spec.std, c, "std")
    n, n_pos = dataset.n, h * w
    d = n_pos * c
    if state is None:
        state = RunState(n)
    elif state.n != n:
        raise InvalidInput(f"the saved state holds {state.n} images but the dataset has {n}")
    state.sessions += 1
    todo = np.flatnonzero(~state.done)

    slot_src = np.zeros((batch_size, d), np.float32)
    slot_index = np.zeros(batch_size, np.int64)
    slot_step = np.zeros(batch_size, np.int64)
    slot_label = np.zeros(batch_size, np.int64)
    slot_pos = np.zeros(batch_size, np.int64)
    busy = np.zeros(batch_size, np.bool_)
    buf = np.empty((batch_size, d), np.float32)
    preds = np.empty(batch_size, np.int32)
    finished = np.zeros(batch_size, np.bool_)
    cumulative = spec.mode == "cumulative"
    pack = pack and not cumulative

    nxt = 0  # next entry of ``todo`` to admit
    chunk_lo, chunk = 0, np.empty((0, d), np.float32)  # ``chunk`` holds todo[chunk_lo : chunk_lo + len(chunk)]
    _warm_up_kernels(slot_src, slot_index, slot_step, buf, n_pos, c)  # JIT/cache load stays out of the timing
    t0 = last_checkpoint = time.perf_counter()
    seconds_before = state.seconds
    while True:
        free = np.flatnonzero(~busy)
        while free.size and nxt < todo.size:
            if nxt >= chunk_lo + chunk.shape[0]:
                chunk_lo = nxt
                chunk = model.to_flat(_prepare(dataset, todo[nxt: nxt + chunk_size], mean, std))
            k = min(free.size, chunk_lo + chunk.shape[0] - nxt)
            slots, free = free[:k], free[k:]
            pos = todo[nxt: nxt + k]
            slot_src[slots] = chunk[nxt - chunk_lo: nxt - chunk_lo + k]
            slot_index[slots] = dataset.index[pos]
            slot_label[slots] = dataset.labels[pos]
            slot_pos[slots] = pos
            slot_step[slots] = 0
            busy[slots] = True
            nxt += k
        rows = np.flatnonzero(busy)
        if rows.size == 0:
            break
        row_slots, row_steps = _batch_rows(rows, slot_step, batch_size, spec.max_steps, pack)
        m = row_slots.size
        perturbcore.perturb_flat(
            slot_src, rows=row_slots, row_steps=row_steps, indices=slot_index, steps=slot_step, out=buf,
            pixels=spec.pixels, n_positions=n_pos, channels=c, seed=spec.seed, low=spec.low, high=spec.high,
            scheme=spec.scheme, channels_first=model.binding.channels_first, mean=mean, std=std,
            write_back=cumulative, threads=kernel_threads,
        )
        noisy = int(np.count_nonzero(row_steps))
        scores = model.run(buf[:m])
        perturbcore.predict(scores, out=preds)
        perturbcore.record_batch(
            preds, row_slots, row_steps=row_steps, slot_label=slot_label, slot_step=slot_step, slot_pos=slot_pos,
            max_steps=spec.max_steps, clean_prediction=state.clean_prediction, first_failure=state.first_failure,
            failure_label=state.failure_label, finished=finished,
        )
        freed = rows[finished[rows]]
        busy[freed] = False
        state.done[slot_pos[freed]] = True  # only now: results of these images are final
        state.inferences += m
        state.noisy_inferences += noisy
        now = time.perf_counter()
        state.seconds = seconds_before + (now - t0)
        if progress is not None:
            progress(state.n_done, n, state.inferences)
        if on_checkpoint is not None and now - last_checkpoint >= checkpoint_every:
            on_checkpoint(state)
            last_checkpoint = time.perf_counter()
    state.seconds = seconds_before + (time.perf_counter() - t0)
    return state.outcome(dataset)


def _batch_rows(rows, slot_step, batch_size: int, max_steps: int, pack: bool):
    """The (slot, step) rows of the next batch: one per busy slot, or, when packing and the batch is not full,
    consecutive steps of each image spread over the whole batch (never past ``max_steps``)."""
    steps = slot_step[rows]
    if not pack or rows.size >= batch_size:
        return rows, np.ascontiguousarray(steps)
    k, extra = divmod(batch_size, rows.size)
    per = np.minimum(k + (np.arange(rows.size) < extra), max_steps - steps + 1)
    starts = np.cumsum(per) - per
    row_steps = np.repeat(steps, per) + (np.arange(int(per.sum())) - np.repeat(starts, per))
    return np.repeat(rows, per), row_steps


def working_memory_bytes(dataset: Dataset, *, batch_size: int, chunk_size: int) -> int:
    """Memory the engine allocates beside the dataset: slot buffers, one converted chunk, per-image results."""
    h, w, c = dataset.image_shape
    row = h * w * c * 4
    slots = 2 * batch_size * row
    chunk = 2 * min(chunk_size, dataset.n) * row  # the float conversion and its copy in the model's layout
    per_image = dataset.n * (4 * 3 + 1 + 8 * 2) * 2  # results, done mask, index and label copies; outcome copies
    return slots + chunk + per_image


def _warm_up_kernels(src, index, step, buf, n_positions, channels) -> None:
    """Call every kernel once on no rows, so numba compiles (or loads from its cache) before work is timed."""
    none = np.empty(0, np.int64)
    for threads in (1, None):  # the serial kernel, and the parallel one should a caller ask for it
        perturbcore.perturb_flat(src, rows=none, indices=index, steps=step, out=buf, pixels=1,
                                 n_positions=n_positions, channels=channels, seed=0, threads=threads)
    perturbcore.predict(np.empty((0, 1), np.float32))
    empty = np.empty(0, np.int32)
    perturbcore.record_batch(empty, none, row_steps=none, slot_label=none, slot_step=none, slot_pos=none,
                             max_steps=1, clean_prediction=empty, first_failure=empty, failure_label=empty,
                             finished=np.zeros(0, np.bool_))


def _prepare(dataset: Dataset, positions, mean, std) -> np.ndarray:
    """Images at ``positions`` (a slice or an index array) as float32 (m, H, W, C), normalised as the kernel
    normalises its noise values."""
    x = dataset.float_images_at(positions)
    if mean is not None:
        x = (x - mean) / std
    return x


def clean_predictions(model: OnnxModel, dataset: Dataset, *, batch_size: int = 1024,
                      mean=None, std=None) -> np.ndarray:
    """The model's predictions on the clean images (int32 (n,); ``NONFINITE`` for non-finite outputs)."""
    c = dataset.image_shape[2]
    mean, std = _channel_values(mean, c, "mean"), _channel_values(std, c, "std")
    model.bind(dataset.image_shape, n_classes=dataset.n_classes, probe=_prepare(dataset, slice(0, 1), mean, std))
    out = np.empty(dataset.n, np.int32)
    for lo in range(0, dataset.n, batch_size):
        hi = min(dataset.n, lo + batch_size)
        out[lo:hi] = perturbcore.predict(model.run(model.to_flat(_prepare(dataset, slice(lo, hi), mean, std))))
    return out
