"""Random L0 noise: overwrite at most ``pixels`` pixels of an image, keyed by (seed, index, step, draw).

Layout of the draws for one (image, step): draw ``d`` (0 <= d < pixels) uses counter ``d * (C + 1)`` for its
position, uniform over the ``H * W`` pixel positions (with replacement, so at most ``pixels`` distinct pixels
change), and counters ``d * (C + 1) + 1 + c`` for the value of channel ``c``. Later draws of the same position
overwrite earlier ones. A value is uniform in ``[low, high)`` (scheme ``uniform``) or, for ``salt-pepper``, ``low``
or ``high`` with equal probability, decided by the top bit of the same draw. Step 0 is the clean image.

Images travel flat, ``(rows, H * W * C)``, already in the model's memory layout (channels last: offset
``p * C + c``; channels first: ``c * H * W + p``) and already normalised, so the kernel writes straight into the
buffer the model reads and no transpose happens per batch.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from perturbcore._jit import kernel, parallel_kernel, run_on_threads
from perturbcore.rng import _draw, _stream_key, _unit24

SCHEMES = ("uniform", "salt-pepper")
_SCHEME_CODE = {name: code for code, name in enumerate(SCHEMES)}


def _perturb(
    rows, row_steps, indices, out, pixels, n_positions, channels, channels_first,
    low, span, high, high_below, salt_pepper, integer, random_count, seed, mean, std,
):
    """Overwrite the drawn pixels of each row of ``out`` (which already holds the row's source image).

    Parameters
    ----------
    rows : int64 (m,)
        The slot of each row (``indices[rows[j]]`` is its dataset index). A slot may fill several rows at different
        steps (step packing).
    row_steps : int64 (m,)
        The step of each row; step 0 leaves the image unchanged.
    indices : int64 (slots,)
        Dataset index of each slot: with the step, the key of its random stream.
    out : float32 (>= m, D)
        Row ``j`` holds slot ``rows[j]``'s image, in the model's layout and normalisation; only iteration ``j``
        writes it. ``D = n_positions * channels``.
    mean, std : float32 (channels,)
        Normalisation applied to each new value: ``(v - mean[c]) / std[c]``.
    random_count : bool
        Draw how many pixels this step changes, uniform in 1..``pixels`` (the paper's "at most 28" read as a random
        count), from counter ``pixels * (channels + 1)``, past every pixel draw; then only the first that many draws
        are applied. Off, every step makes all ``pixels`` draws.
    integer : bool
        Integer values (a model with an integer input, e.g. uint8 pixels): uniform over the integers ``low`` ..
        ``high`` inclusive (``span = high - low + 1``), from the same draw; salt-and-pepper is ``low`` or ``high``.

    The kernel touches only the drawn pixels (scalar work): the row copy is done beforehand by ``numpy.take``
    (libc ``memcpy``). A copy loop here was auto-vectorised with 512-bit instructions on AVX-512 hosts, which slowed
    the onnxruntime inference that follows by ~45 % (``benchmarks/test_bench_engine.py`` shows the engine at
    0.9x bare onnxruntime only without it).
    """
    for j in prange(rows.shape[0]):
        step = row_steps[j]
        if step > 0:
            key = _stream_key(seed, indices[rows[j]], step)
            count = pixels
            if random_count:
                count = 1 + np.int64(_draw(key, pixels * (channels + 1)) % np.uint64(pixels))
            for d in range(count):
                base = d * (channels + 1)
                p = np.int64(_draw(key, base) % np.uint64(n_positions))
                for c in range(channels):
                    u = _draw(key, base + 1 + c)
                    if salt_pepper:
                        v = np.float32(high) if (u >> np.uint64(63)) else np.float32(low)
                    elif integer:
                        v = np.float32(low + np.floor(span * _unit24(u)))
                    else:
                        v = np.float32(low + span * _unit24(u))
                        # float64 -> float32 rounding may land on ``high``; the interval is half-open.
                        if v >= high:
                            v = high_below
                    if channels_first:
                        off = c * n_positions + p
                    else:
                        off = p * channels + c
                    out[j, off] = (v - mean[c]) / std[c]


# Two compilations of one kernel: the serial one never touches numba's threading layer, so it is safe to call from
# several Python threads at once and leaves no spinning OpenMP workers behind (see pyrobust.engine.loop).
_perturb_kernel = parallel_kernel(_perturb)
_perturb_kernel_serial = kernel(_perturb)


def _as_i64(name: str, values, n: int) -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.int64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},); got {arr.shape}")
    return arr


def check_noise_params(*, pixels: int, n_positions: int, low: float, high: float, scheme: str) -> None:
    """Raise ``ValueError`` naming the bad parameter and what is allowed."""
    if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or not 1 <= pixels <= n_positions:
        raise ValueError(
            f"pixels must be an integer in [1, {n_positions}] for images of {n_positions} pixels; got {pixels!r}"
        )
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"noise values need finite low < high; got low={low!r}, high={high!r}")
    if scheme not in _SCHEME_CODE:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")


def perturb_flat(
    source: np.ndarray,
    *,
    indices,
    steps,
    pixels: int,
    n_positions: int,
    channels: int,
    seed: int,
    low: float = 0.0,
    high: float = 1.0,
    scheme: str = "uniform",
    channels_first: bool = False,
    mean=None,
    std=None,
    rows=None,
    row_steps=None,
    out: np.ndarray | None = None,
    write_back: bool = False,
    threads: int | None = None,
    integer: bool = False,
    random_count: bool = False,
) -> np.ndarray:
    """Perturb flat images; the driver of :func:`_perturb`.

    ``source`` is float32 ``(slots, n_positions * channels)``; ``indices`` and ``steps`` give each slot's random
    key; ``rows`` (default: every slot) selects the slots to write, in order, to ``out[:len(rows)]``, and
    ``row_steps`` (default: each row's slot step) gives each row its own step, so one slot may fill several rows.
    ``write_back`` requires ``source`` to be a C-contiguous float32 array (it is updated in place) and distinct rows.
    ``threads=1`` runs the serial compilation; otherwise numba's pool with ``threads`` (default: its setting).
    ``integer``: values are integers, uniform over ``low`` .. ``high`` inclusive (both must be whole numbers).
    ``random_count``: each step changes a random number of pixels, uniform in 1..``pixels``.
    Returns ``out``.
    """
    if source.ndim != 2 or source.shape[1] != n_positions * channels:
        raise ValueError(f"source must have shape (slots, {n_positions * channels}); got {source.shape}")
    if write_back and not (source.dtype == np.float32 and source.flags.c_contiguous):
        raise ValueError("write_back needs a C-contiguous float32 source to update in place")
    src = np.ascontiguousarray(source, dtype=np.float32)
    n = src.shape[0]
    idx = _as_i64("indices", indices, n)
    stp = _as_i64("steps", steps, n)
    if stp.size and stp.min() < 0:
        raise ValueError("steps must be >= 0")
    rws = np.arange(n, dtype=np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    if rws.size and (rws.min() < 0 or rws.max() >= n):
        raise ValueError(f"rows must index slots in [0, {n})")
    if row_steps is None:
        rsteps = np.ascontiguousarray(stp[rws])
    else:
        rsteps = _as_i64("row_steps", row_steps, rws.size)
        if rsteps.size and rsteps.min() < 0:
            raise ValueError("row_steps must be >= 0")
    if write_back and np.unique(rws).size != rws.size:
        raise ValueError("write_back needs distinct rows: a random walk cannot take two steps at once")
    if out is None:
        out = np.empty((rws.size, src.shape[1]), dtype=np.float32)
    elif (out.dtype != np.float32 or not out.flags.c_contiguous or out.shape[0] < rws.size
          or out.shape[1] != src.shape[1]):
        raise ValueError(f"out must be a C-contiguous float32 array of at least ({rws.size}, {src.shape[1]})")
    noise = prepare_noise(pixels=pixels, n_positions=n_positions, channels=channels, seed=seed, low=low, high=high,
                          scheme=scheme, channels_first=channels_first, mean=mean, std=std, integer=integer,
                          random_count=random_count)
    noise.perturb(src, rws, rsteps, idx, out, threads=threads)
    m = rws.size
    if write_back:
        source[rws] = out[:m]
    return out


def perturb_images(
    images: np.ndarray, *, indices, steps, pixels: int, seed: int, low: float = 0.0, high: float = 1.0,
    scheme: str = "uniform", threads: int | None = None,
) -> np.ndarray:
    """Perturb images of shape ``(n, H, W)`` or ``(n, H, W, C)`` (float32) and return a new array of that shape."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"images must have shape (n, H, W) or (n, H, W, C); got {x.shape}")
    n, h, w = x.shape[:3]
    c = 1 if x.ndim == 3 else x.shape[3]
    out = perturb_flat(
        x.reshape(n, h * w * c), indices=indices, steps=steps, pixels=pixels, n_positions=h * w, channels=c,
        seed=seed, low=low, high=high, scheme=scheme, threads=threads,
    )
    return out.reshape(x.shape)


class PreparedNoise:
    """A noise setting validated once, for a loop that calls the kernel every batch (:func:`prepare_noise`).

    :meth:`perturb` checks nothing: the caller owns the arrays (int64 ``rows``/``row_steps``/``indices``, float32
    C-contiguous ``source`` and ``out`` of width ``n_positions * channels``), as :func:`perturb_flat` would check
    them. Results are bit-identical to :func:`perturb_flat` with the same settings.
    """

    def __init__(self, *, pixels, n_positions, channels, seed, low, high, scheme, channels_first, mean, std,
                 integer=False, random_count=False):
        high32 = np.float32(high)
        self.width = int(n_positions) * int(channels)
        span = float(high) - float(low) + (1.0 if integer else 0.0)
        self._args = (int(pixels), int(n_positions), int(channels), bool(channels_first), float(low), span, high32,
                      np.nextafter(high32, np.float32(-np.inf)), scheme == "salt-pepper", bool(integer),
                      bool(random_count), np.uint64(seed), mean, std)

    def perturb(self, source, rows, row_steps, indices, out, *, threads: int | None = 1) -> None:
        """Write row ``j`` of ``out``: slot ``rows[j]`` of ``source`` at step ``row_steps[j]``."""
        m = rows.shape[0]
        np.take(source, rows, axis=0, out=out[:m])
        run_on_threads(_perturb_kernel_serial, _perturb_kernel, (rows, row_steps, indices, out, *self._args), threads)


def prepare_noise(*, pixels: int, n_positions: int, channels: int, seed: int, low: float = 0.0, high: float = 1.0,
                  scheme: str = "uniform", channels_first: bool = False, mean=None, std=None,
                  integer: bool = False, random_count: bool = False) -> PreparedNoise:
    """Validate a noise setting once (``ValueError`` naming the bad parameter) and return its prepared kernel."""
    check_noise_params(pixels=pixels, n_positions=n_positions, low=low, high=high, scheme=scheme)
    if integer and (float(low) != int(low) or float(high) != int(high)):
        raise ValueError(f"integer noise values need whole-number bounds; got low={low!r}, high={high!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {seed!r}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1; got {channels!r}")
    mean_arr = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(channels)
    std_arr = np.ones(channels, np.float32) if std is None else np.asarray(std, np.float32).reshape(channels)
    return PreparedNoise(pixels=pixels, n_positions=n_positions, channels=channels, seed=seed, low=low, high=high,
                         scheme=scheme, channels_first=channels_first, mean=np.ascontiguousarray(mean_arr),
                         std=np.ascontiguousarray(std_arr), integer=integer, random_count=random_count)
