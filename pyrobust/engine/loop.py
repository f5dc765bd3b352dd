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
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

import perturbcore
import perturbcore.families
from pyrobust.data.dataset import Dataset
from pyrobust.engine.runtime import BoundModel, OnnxModel
from pyrobust.errors import InvalidInput
from pyrobust.types import ROBUST, NoiseSpec, Outcome, RunState
from pyrobust.validate import Integer, check

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
    spec = spec.for_image(h, w)
    if spec.corruption is not None:
        try:
            spec.corruption.check_image(h, w, c)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    elif int(spec.pixels) > h * w:
        raise InvalidInput(f"pixels must be an integer in [1, {h * w}] for {h}x{w} images; got {spec.pixels}")
    _channel_values(spec.mean, c, "mean")
    _channel_values(spec.std, c, "std")


def prepared_noise(spec: NoiseSpec, image_shape: tuple[int, int, int], *, channels_first: bool = False,
                   normalise: bool = True):
    """The noise kernel of ``spec`` for images of ``image_shape`` in the model's units, validated once: the L0
    noise (:func:`perturbcore.prepare_noise`) or the spec's family (:func:`perturbcore.families.prepare`).
    ``normalise=False``: the input stays in the model's pixel units (replay, figures). A prepared family reads its
    sources *not* normalised (``normalises_source``); the L0 kernel reads them normalised."""
    h, w, c = image_shape
    mean = _channel_values(spec.mean, c, "mean") if normalise else None
    std = _channel_values(spec.std, c, "std") if normalise else None
    try:
        if spec.corruption is not None:
            return perturbcore.families.prepare(spec.corruption, height=h, width=w, channels=c, seed=spec.seed,
                                                channels_first=channels_first, mean=mean, std=std, top=spec.scale,
                                                integer=spec.integer)
        low, high = noise_bounds(spec)
        return perturbcore.prepare_noise(pixels=int(spec.for_image(h, w).pixels), n_positions=h * w, channels=c,
                                         seed=spec.seed, low=low, high=high, scheme=spec.scheme, integer=spec.integer,
                                         random_count=spec.pixel_count == "random", channels_first=channels_first,
                                         mean=mean, std=std)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def resolve_noise(model: OnnxModel, spec: NoiseSpec) -> NoiseSpec:
    """``spec`` as this model needs it: integer noise values for an integer input; the pixel range the model's
    pyrobust metadata states (or 255 for an integer input, else 1) unless given; the normalisation its metadata
    states unless given (a different one given is kept, with a warning)."""
    meta = model.expects
    integer = model.integer_input
    pixel_range = spec.pixel_range or meta.get("pixel_range") or (255 if integer else 1)
    if integer and pixel_range != 255:
        raise InvalidInput(f"{model.path}: the model takes integer pixels ({model.input.type}), so pixel_range must "
                           "be 0,255; drop --pixel-range 0,1")
    mean, std = spec.mean, spec.std
    if meta.get("mean") is not None:
        if mean is None:
            mean, std = meta["mean"], meta["std"]
        elif (tuple(mean), tuple(std or ())) != (meta["mean"], meta["std"]):
            warnings.warn(f"{model.path}: the model's metadata says it expects mean={list(meta['mean'])}, "
                          f"std={list(meta['std'])}; using the mean={list(mean)}, std={list(std or ())} given",
                          NormalisationWarning, stacklevel=3)
    return replace(spec, pixel_range=pixel_range, integer=integer, mean=mean, std=std)


class NormalisationWarning(UserWarning):
    """The normalisation given differs from the one the model's metadata states."""


def bind_model(model: OnnxModel | BoundModel, dataset: Dataset,
               spec: NoiseSpec) -> tuple[BoundModel, NoiseSpec]:
    """Resolve ``spec`` for the model (:func:`resolve_noise`), check it against the data and bind ``model`` to the
    data's shape, probing it on the first image, so every model or shape error surfaces before any work starts.
    Returns the bound model and the resolved spec: the one to run and record. A model bound before is bound again,
    to this data."""
    loaded = model.model if isinstance(model, BoundModel) else model
    spec = resolve_noise(loaded, spec.for_image(*dataset.image_shape[:2]))
    check_spec_for_data(spec, dataset.image_shape)
    bound = loaded.bind(dataset.image_shape, n_classes=dataset.n_classes, probe=prepare(dataset, slice(0, 1), spec))
    return bound, spec


def noise_bounds(spec: NoiseSpec) -> tuple[float, float]:
    """The noise values' bounds in the model's units: [low, high) scaled to the pixel range; for integer values the
    whole numbers round(low·R) .. round(high·R), both included."""
    r = spec.scale
    if spec.integer:
        return float(round(spec.low * r)), float(round(spec.high * r))
    return spec.low * r, spec.high * r


def iter_protocol(model: BoundModel, dataset: Dataset, spec: NoiseSpec, state: RunState, *, batch_size: int = 256,
                  chunk_size: int = 4096, pack: bool = True) -> Iterator[np.ndarray]:
    """Run the paper's protocol on the images of ``dataset`` that ``state`` has not marked done, one batch per step
    of the iteration; each step yields the positions whose results became final in that batch (``state`` holds
    them, ``done`` set). ``model`` must be bound to the data (:func:`bind_model`); the noise setting is validated
    once, here, and the kernels run unchecked in the loop.

    ``pack``: when fewer images are in play than the batch holds (a small dataset, or the last robust images of a
    large one), each image fills several rows with its next steps. Steps s..s+j of an image are independent draws
    from the original, so they can be scored together, and the first failure among them is the image's first-failure
    step: results are bit-identical to the unpacked run, only some inferences past a failure are wasted. Packing
    applies to the restart mode; a random walk is sequential by nature.

    The noise kernel runs serially: for a 28x28 batch of 256 it takes ~0.07 ms against ~5 ms of inference, while
    numba's OpenMP workers keep spinning after a parallel region and slow the next inference down
    (``benchmarks/test_bench_engine.py::test_thread_pools`` measures it).
    """
    check("batch_size", batch_size, Integer(1))
    check("chunk_size", chunk_size, Integer(1))
    if state.n != dataset.n:
        raise InvalidInput(f"the saved state holds {state.n} images but the dataset has {dataset.n}")
    if not isinstance(model, BoundModel):
        raise InvalidInput("bind the model to the data first (bind_model)")
    h, w, c = dataset.image_shape
    d = h * w * c
    noise = prepared_noise(spec, dataset.image_shape, channels_first=model.binding.channels_first)
    # a family normalises as it writes, so its slots hold the clean images in the model's units
    source = model_units if getattr(noise, "normalises_source", False) else prepare
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
    counting = spec.count_failures
    offset = spec.step_offset  # the draws of probe s are those of step s + offset

    nxt = 0  # next entry of ``todo`` to admit
    chunk_lo, chunk = 0, np.empty((0, d), np.float32)  # ``chunk`` holds todo[chunk_lo : chunk_lo + len(chunk)]
    while True:
        free = np.flatnonzero(~busy)
        while free.size and nxt < todo.size:
            if nxt >= chunk_lo + chunk.shape[0]:
                chunk_lo = nxt
                chunk = model.to_flat(source(dataset, todo[nxt: nxt + chunk_size], spec))
            k = min(free.size, chunk_lo + chunk.shape[0] - nxt)
            slots, free = free[:k], free[k:]
            pos = todo[nxt: nxt + k]
            slot_src[slots] = chunk[nxt - chunk_lo: nxt - chunk_lo + k]
            slot_index[slots] = dataset.index[pos]
            slot_label[slots] = dataset.labels[pos]
            slot_pos[slots] = pos
            slot_step[slots] = 0
            busy[slots] = True
            if counting:  # an image run again after an interruption counts from zero
                state.failures[pos] = 0
                state.first_failure[pos] = ROBUST
                state.failure_label[pos] = ROBUST
            nxt += k
        rows = np.flatnonzero(busy)
        if rows.size == 0:
            return
        row_slots, row_steps = _batch_rows(rows, slot_step, batch_size, spec.max_steps, pack)
        m = row_slots.size
        noise.perturb(slot_src, row_slots, row_steps + offset * (row_steps > 0) if offset else row_steps, slot_index,
                      buf)
        if cumulative:  # a random walk: the perturbed input is the next step's source
            slot_src[row_slots] = buf[:m]
        scores = model.run(buf[:m])
        perturbcore.predict(scores, out=preds)
        _record_margins(scores, row_slots, row_steps, slot_label, slot_pos, state.clean_margin)
        perturbcore.record_batch(
            preds, row_slots, row_steps=row_steps, slot_label=slot_label, slot_step=slot_step, slot_pos=slot_pos,
            max_steps=spec.max_steps, clean_prediction=state.clean_prediction, first_failure=state.first_failure,
            failure_label=state.failure_label, failures=state.failures if counting else None, finished=finished,
        )
        freed = rows[finished[rows]]
        busy[freed] = False
        done = slot_pos[freed]
        state.done[done] = True  # only now: results of these images are final
        state.inferences += m
        state.noisy_inferences += int(np.count_nonzero(row_steps))
        yield done


def _record_margins(scores, row_slots, row_steps, slot_label, slot_pos, out) -> None:
    """The clean margin of the images whose clean pass is in this batch (NaN for a label the model has no score
    for)."""
    clean = np.flatnonzero(row_steps == 0)
    if clean.size == 0:
        return
    slots = row_slots[clean]
    labels = slot_label[slots]
    ok = labels < scores.shape[1]
    margins = np.full(clean.size, np.nan)
    if ok.any():
        margins[ok] = perturbcore.clean_margin(scores[clean[ok]], labels[ok])
    out[slot_pos[slots]] = margins


def run_protocol(model: OnnxModel | BoundModel, dataset: Dataset, spec: NoiseSpec, *, batch_size: int = 256,
                 chunk_size: int = 4096, pack: bool = True, state: RunState | None = None) -> Outcome:
    """The protocol on every image of ``dataset`` in this thread: per-image outcomes in dataset order. Runs with
    checkpoints, progress and parallel back ends go through :func:`pyrobust.engine.backends.execute`."""
    bound, spec = bind_model(model, dataset, spec)
    state = state if state is not None else RunState(dataset.n)
    t0 = time.perf_counter()
    for _ in iter_protocol(bound, dataset, spec, state, batch_size=batch_size, chunk_size=chunk_size, pack=pack):
        pass
    state.seconds += time.perf_counter() - t0
    return state.outcome(dataset, counted=spec.count_failures)


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
    per_image = dataset.n * (4 * 4 + 8 + 1 + 8 * 2) * 2  # results, margins, done mask, index and label; copies
    return slots + chunk + per_image


def warm_up_kernels() -> None:
    """Call every kernel the loop uses once on no rows, so numba compiles (or loads from its cache) before work is
    timed."""
    none = np.empty(0, np.int64)
    src = np.zeros((1, 1), np.float32)
    perturbcore.prepare_noise(pixels=1, n_positions=1, channels=1, seed=0).perturb(src, none, none, none, src)
    perturbcore.predict(np.empty((0, 1), np.float32))
    perturbcore.clean_margin(np.empty((0, 1), np.float32), np.empty(0, np.int64))
    empty = np.empty(0, np.int32)
    perturbcore.record_batch(empty, none, row_steps=none, slot_label=none, slot_step=none, slot_pos=none,
                             max_steps=1, clean_prediction=empty, first_failure=empty, failure_label=empty,
                             finished=np.zeros(0, np.bool_))
    perturbcore.record_batch(empty, none, row_steps=none, slot_label=none, slot_step=none, slot_pos=none,
                             max_steps=1, clean_prediction=empty, first_failure=empty, failure_label=empty,
                             failures=empty, finished=np.zeros(0, np.bool_))


def scaled(x: np.ndarray, spec: NoiseSpec) -> np.ndarray:
    """Float images in [0, 1] in the model's pixel range (whole numbers for an integer input), not normalised."""
    if spec.scale != 1:
        x = x * np.float32(spec.scale)
    if spec.integer:
        x = np.rint(x)
    return x


def normalised(x: np.ndarray, spec: NoiseSpec) -> np.ndarray:
    c = x.shape[-1]
    if spec.mean is None:
        return x
    return (x - _channel_values(spec.mean, c, "mean")) / _channel_values(spec.std, c, "std")


def model_units(dataset: Dataset, positions, spec: NoiseSpec) -> np.ndarray:
    """Images at ``positions`` (a slice or an index array) as float32 (m, H, W, C) in the model's pixel range, not
    yet normalised."""
    if spec.scale == 255 and dataset.images.dtype == np.uint8:
        return dataset.images[positions].astype(np.float32)  # 0-255 exactly, no round trip through [0, 1]
    return scaled(dataset.float_images_at(positions), spec)


def prepare(dataset: Dataset, positions, spec: NoiseSpec) -> np.ndarray:
    """Images at ``positions`` as float32 (m, H, W, C) the way the model takes them: in its pixel range, then
    normalised as the kernel normalises its noise values."""
    return normalised(model_units(dataset, positions, spec), spec)


def clean_predictions(model: OnnxModel | BoundModel, dataset: Dataset, spec: NoiseSpec | None = None, *,
                      batch_size: int = 1024) -> np.ndarray:
    """The model's predictions on the clean images (int32 (n,); ``NONFINITE`` for non-finite outputs), fed as
    ``spec`` says (pixel range, normalisation; default: as the model's metadata says, else [0, 1])."""
    bound, spec = bind_model(model, dataset, spec if spec is not None else NoiseSpec())
    out = np.empty(dataset.n, np.int32)
    for lo in range(0, dataset.n, batch_size):
        hi = min(dataset.n, lo + batch_size)
        out[lo:hi] = perturbcore.predict(bound.run(bound.to_flat(prepare(dataset, slice(lo, hi), spec))))
    return out


def perturbed_image(original: np.ndarray, *, index: int, step: int, spec: NoiseSpec) -> np.ndarray:
    """The input at ``step`` (0 = clean) of the image with original index ``index``; ``original`` is float32
    (H, W, C) in [0, 1] and so is the result."""
    x = perturbed_input(scaled(np.asarray(original, np.float32), spec), index=index, step=step, spec=spec)
    return x / np.float32(spec.scale) if spec.scale != 1 else x


def perturbed_input(base: np.ndarray, *, index: int, step: int, spec: NoiseSpec, walk: bool = True) -> np.ndarray:
    """The input at ``step`` of the image with original index ``index``, in the model's units: ``base`` (H, W, C)
    is the clean image as :func:`model_units` gives it; the result is not normalised. ``walk=False``: only step
    ``step``'s noise applied to ``base`` (in the cumulative mode, ``base`` is then the walk's input at step - 1)."""
    h, w, c = base.shape
    flat = np.ascontiguousarray(base, dtype=np.float32).reshape(1, h * w * c).copy()
    noise = prepared_noise(spec, base.shape, normalise=False)
    slot, key = np.zeros(1, np.int64), np.array([index], np.int64)
    out = np.empty_like(flat)
    for s in ([step] if spec.mode == "restart" or step == 0 or not walk else range(1, step + 1)):
        noise.perturb(flat, slot, np.array([s + spec.step_offset if s else 0], np.int64), key, out)
        if spec.mode == "cumulative":
            flat[:] = out
    return out.reshape(h, w, c)


def predict_one(model: OnnxModel | BoundModel, dataset: Dataset, image: np.ndarray, spec: NoiseSpec) -> int:
    """The model's prediction for one image (H, W, C) in the model's units (:func:`perturbed_input`), normalised as
    the engine normalises; ``spec`` is the resolved spec of the run."""
    x = normalised(np.asarray(image, np.float32)[None], spec)
    loaded = model.model if isinstance(model, BoundModel) else model
    bound = loaded.bind(dataset.image_shape, n_classes=dataset.n_classes, probe=x)
    return int(perturbcore.predict(bound.run(bound.to_flat(x)))[0])
