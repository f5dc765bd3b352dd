"""Measured choices: the batch size and the session layout (sessions × threads) that run a model fastest here.

Both are measured on the model itself with random inputs of its shape, a fraction of a second per candidate, and
cached per model (SHA-256), input shape, thread count and machine (CPU model, cores, onnxruntime version) in
``$XDG_CACHE_HOME/pyrobust/tuning.json`` (``~/.cache/...``). Results never depend on these choices: per-image
outcomes are bit-identical for every batch size and layout; only the speed does.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from pyrobust.engine.runtime import BoundModel, OnnxModel
from pyrobust.errors import PyRobustError
from pyrobust.files import read_bounded, write_json_atomic
from pyrobust.machine import default_threads, versions

BATCH_SIZES = (32, 64, 128, 256, 512, 1024)
NEAR_BEST = 0.95  # the smallest size within 5 % of the best wins: less padding at the tail, less memory


CACHE_MAX_BYTES = 8 * 2**20  # a few hundred bytes per model and machine; anything larger is not ours


def cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "pyrobust" / "tuning.json"


def machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    v = versions()  # a new onnxruntime, numba or numpy can change the best choice: measure again
    libs = ",".join(f"{k}={v.get(k)}" for k in ("pyrobust", "onnxruntime", "numba", "numpy"))
    return f"{cpu}|cores={os.cpu_count()}|usable={default_threads()}|{libs}"


class TuningCacheWarning(UserWarning):
    """The tuning cache could not be used (corrupt or unexpected contents); it is measured and written anew."""


def _load() -> dict:
    """The cache, as {section: {key: entry}}; a corrupt or crafted file is ignored (with a warning) and rewritten on
    the next store, never an error: it only holds speed choices."""
    path = cache_path()
    if not os.path.lexists(path):
        return {}
    try:
        # a FIFO or /dev/zero planted as the cache is refused, never waited on or read without end
        data = json.loads(read_bounded(path, what="tuning cache", max_bytes=CACHE_MAX_BYTES, follow_symlinks=False))
    except (PyRobustError, OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        warnings.warn(f"{path}: not a pyrobust tuning cache; ignoring it (it is rewritten after the next "
                      "measurement)", TuningCacheWarning, stacklevel=3)
        return {}
    return data


def _cached(section: str, key: str, fields: tuple[str, ...], limit: int) -> tuple[int, ...] | None:
    """A cached entry's integer fields, each in [1, limit]; None (measure again) when missing or malformed."""
    hit = _load().get(section, {}).get(key)
    if hit is None:
        return None
    try:
        values = tuple(hit[f] for f in fields)
        if all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in values):
            return values
    except (TypeError, KeyError):
        pass
    warnings.warn(f"{cache_path()}: a malformed {section} entry; measuring again", TuningCacheWarning, stacklevel=3)
    return None


def _store(section: str, key: str, value) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningCacheWarning)  # already said when it was read
        data = _load()
    data.setdefault(section, {})[key] = value
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_path(), data)
    except OSError:
        pass  # an unwritable cache only costs a new measurement next time


def _random_batch(model: BoundModel, size: int) -> np.ndarray:
    d = int(np.prod(model.binding.input_shape))
    return np.random.default_rng(0).random((size, d), dtype=np.float32)


def _rate(model: BoundModel, x: np.ndarray, seconds: float) -> float:
    model.run(x)  # warm-up: first runs allocate
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < seconds:
        model.run(x)
        runs += 1
    return runs * x.shape[0] / (time.perf_counter() - t0)


def measure_batch_sizes(model: BoundModel, sizes=BATCH_SIZES, seconds: float = 0.12,
                        rounds: int = 2) -> dict[int, float]:
    """Inferences per second of ``model`` (bound) at each batch size: the best of ``rounds`` rounds that visit
    every size in turn, so a burst of load elsewhere on the machine cannot decide the choice alone."""
    batches = {int(s): _random_batch(model, s) for s in sizes}
    best = dict.fromkeys(batches, 0.0)
    for _ in range(rounds):
        for size, x in batches.items():
            best[size] = max(best[size], _rate(model, x, seconds))
    return best


def _batch_key(model: BoundModel) -> str:
    return f"{model.sha256}|{model.binding.input_shape}|threads={model.threads}|{machine_key()}"


def auto_batch_size(model: BoundModel, *, log=None, retune: bool = False,
                    max_size: int | None = None) -> tuple[int, str]:
    """The batch size for ``model`` (bound): (size, "cached" or "measured"); ``retune`` ignores the cache;
    ``max_size`` bounds the candidates (memory)."""
    key = _batch_key(model) + (f"|max={max_size}" if max_size is not None and max_size < max(BATCH_SIZES) else "")
    hit = None if retune else _cached("batch_size", key, ("batch_size",), 1 << 16)
    if hit:
        return hit[0], "cached"
    rates = measure_batch_sizes(model, sizes=[s for s in BATCH_SIZES if max_size is None or s <= max_size])
    best = max(rates.values())
    size = min(s for s, r in rates.items() if r >= NEAR_BEST * best)
    _store("batch_size", key, {"batch_size": size, "rates": {str(k): v for k, v in rates.items()}})
    if log:
        log(f"batch size {size} (measured: " + ", ".join(f"{k}: {v:,.0f}/s" for k, v in rates.items()) + ")")
    return size, "measured"


def layouts(threads: int) -> list[tuple[int, int]]:
    """Candidate (sessions, threads per session) splits of ``threads`` cores."""
    out = {(1, threads), (threads, 1)}
    s = 2
    while s < threads:
        if threads % s == 0:
            out.add((s, threads // s))
        s *= 2
    return sorted(out)


def _feed(model: BoundModel, x: np.ndarray, stop: float, counts: list[int], i: int) -> None:
    """The engine's work per batch: the noise kernel (serial) into the model's buffer, inference, argmax. Timing
    bare inference instead misses the Python and kernel time that parallel sessions overlap (on 2 cores, 1×2 and
    2×1 run bare inference alike, but the engine runs 2×1 ~1.4× faster)."""
    import perturbcore

    n, d = x.shape
    rows = np.arange(n, dtype=np.int64)
    steps = np.ones(n, dtype=np.int64)
    out = np.empty_like(x)
    preds = np.empty(n, np.int32)
    while time.perf_counter() < stop:
        # the noise over all d values as one channel: the same work as the model's real layout
        perturbcore.perturb_flat(x, rows=rows, indices=rows, steps=steps, out=out, pixels=min(28, d),
                                 n_positions=d, channels=1, seed=0, threads=1)
        perturbcore.predict(model.run(out), out=preds)
        counts[i] += n


def measure_layouts(path, *, threads: int, batch_size: int, seconds: float = 0.5, custom_ops=None,
                    image_shape=None, n_classes: int = 1) -> dict[str, float]:
    """Inferences per second of each layout: ``sessions`` sessions with ``threads/sessions`` threads each, all fed
    at once from their own Python threads (onnxruntime releases the GIL while it runs)."""
    rates = {}
    import perturbcore

    x0 = np.zeros((1, 4), np.float32)  # load the kernels (numba cache) before anything is timed
    perturbcore.perturb_flat(x0, indices=[0], steps=[1], pixels=1, n_positions=4, channels=1, seed=0, threads=1)
    perturbcore.predict(x0)
    for sessions, per in layouts(threads):
        models = [path.copy(threads=per) if isinstance(path, BoundModel) else
                  OnnxModel(path, threads=per, custom_ops=custom_ops).bind(image_shape, n_classes=n_classes)
                  for _ in range(sessions)]
        x = _random_batch(models[0], batch_size)
        for m in models:
            m.run(x)
        counts = [0] * sessions
        stop = time.perf_counter() + seconds
        t0 = time.perf_counter()
        workers = [threading.Thread(target=_feed, args=(m, x, stop, counts, i)) for i, m in enumerate(models)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates[f"{sessions}x{per}"] = sum(counts) / (time.perf_counter() - t0)
    return rates


def auto_layout(model: BoundModel, *, threads: int, batch_size: int, image_shape, n_classes: int,
                custom_ops=None, log=None, retune: bool = False) -> tuple[int, int, str]:
    """(sessions, threads per session, "cached"/"measured"/"single") for ``threads`` cores."""
    if threads <= 1:
        return 1, 1, "single"
    key = f"{model.sha256}|{model.binding.input_shape}|threads={threads}|batch={batch_size}|{machine_key()}"
    hit = None if retune else _cached("layout", key, ("sessions", "threads_per_session"), threads)
    if hit:
        return hit[0], hit[1], "cached"
    rates = measure_layouts(model, threads=threads, batch_size=batch_size, custom_ops=custom_ops,
                            image_shape=image_shape, n_classes=n_classes)
    best = max(rates, key=lambda k: rates[k])
    sessions, per = (int(v) for v in best.split("x"))
    _store("layout", key, {"sessions": sessions, "threads_per_session": per, "rates": rates})
    if log:
        log(f"layout {best} (sessions × threads; measured: " + ", ".join(f"{k}: {v:,.0f}/s" for k, v in
                                                                          rates.items()) + ")")
    return sessions, per, "measured"


SLOW_RUN = 0.5  # a run this much slower than the cached measurement says the measurement is stale


def check_run_rate(model: BoundModel, batch_size: int, achieved: float, seconds: float) -> str | None:
    """After a run of at least 5 s: when it ran at under half the rate cached for its batch size (measured under
    load, or the machine changed), drop the cached choices so the next run measures again, and say so."""
    if seconds < 5 or achieved <= 0:
        return None
    entry = _load().get("batch_size", {}).get(_batch_key(model))
    try:
        cached = float(entry["rates"][str(batch_size)])
    except (TypeError, KeyError, ValueError):
        return None
    if achieved >= SLOW_RUN * cached:
        return None
    data = _load()
    data.get("batch_size", {}).pop(_batch_key(model), None)
    for key in [k for k in data.get("layout", {}) if k.startswith(model.sha256)]:
        data["layout"].pop(key)

    try:
        write_json_atomic(cache_path(), data)
    except OSError:
        return None
    return (f"this run scored {achieved:,.0f} inferences/s, under half the {cached:,.0f}/s measured when batch size "
            f"{batch_size} was chosen; the cached choice is dropped and will be measured again on the next run")

