"""The base of every noise family: its typed parameters, the helpers its kernel shares, and one batch driver.

A family is a frozen dataclass (its parameters, each declared with :func:`param`) plus one row kernel, in one file
of this folder. The row kernel has the signature::

    row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer)

``step`` (>= 1) is the step being perturbed: a random family ignores it (its draws are keyed by ``key``), a severity
sweep reads its level from it. ``src`` is the clean image (float32 ``(h * w * c,)``, in the model's layout and pixel
range, *not* normalised); ``out`` holds it normalised on entry (``(v - mean) / std``, as the model takes it) when
the family does not write every value, and receives the perturbed input, normalised. ``key`` is the (seed, image
index, step) stream key of :mod:`perturbcore.rng`, so every draw is ``_draw(key, counter)`` and nothing depends on
the batch, the thread or the order; ``params`` are the family's numbers in the model's pixel units
(:meth:`Family.kernel_params`); ``top`` is the pixel range (1 or 255) every value is clipped to; ``integer`` rounds
values to whole numbers (a model with an integer input). Draws are keyed by the pixel's canonical position
``p = y * w + x`` and channel, never
by its memory offset, so NCHW and NHWC models see the same perturbed image.

Values are computed in float64 in the image's own units, clipped to ``[0, top]``, rounded for an integer input,
then normalised as float32 ``(v - mean) / std``, exactly as the engine normalises its clean images; so a replayed
input (built from the clean image, normalised by numpy) is bit-identical to the one the model was asked. Pixels a
family does not change are the clean pixels, normalised.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
from numba import prange

from perturbcore._jit import kernel, parallel_kernel, run_on_threads
from perturbcore.rng import _draw, _stream_key

_INV_2_32 = 1.0 / 4294967296.0
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


@kernel
def _half(u, e):
    """Uniform ``e`` of the pair a 64-bit draw ``u`` holds (the high half for even ``e``), as :func:`_unit`: a loop
    over ``e`` in order draws once per pair (``if e & 1 == 0: u = _draw(key, base + (e >> 1))``)."""
    half = (u >> _S32) if e & 1 == 0 else (u & _LOW32)
    return (np.float64(half) + 0.5) * _INV_2_32


@kernel
def _unit(key, e, base):
    """The ``e``-th uniform of a stream, in (0, 1): counter ``base + e // 2``, its high 32 bits for even ``e`` and its
    low 32 bits for odd ``e`` (so one 64-bit draw serves two pixels); ``(u + 0.5) / 2**32`` never reaches 0 or 1."""
    u = _draw(key, base + e // 2)
    half = (u >> _S32) if e % 2 == 0 else (u & _LOW32)
    return (np.float64(half) + 0.5) * _INV_2_32


# Acklam's rational approximation of the normal quantile function (relative error below 1.15e-9 over (0, 1)).
_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
      -3.066479806614716e+01, 2.506628277459239e+00)
_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
      -1.328068155288572e+01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
      4.374664141464968e+00, 2.938163982698783e+00)
_D = (7.784695709101165e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
_P_LOW = 0.02425


@kernel
def _central(q):
    """Acklam's central rational in ``q = p - 0.5`` (|q| <= 0.5 - _P_LOW)."""
    r = q * q
    return ((((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]) * q
            / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0))


@kernel
def _normal_quantile(p):
    """The standard normal's ``p``-quantile, for p in (0, 1): one uniform gives one normal (no rejection, so the
    number of draws per pixel is fixed), and a 32-bit uniform reaches ±6.3 standard deviations."""
    if p < _P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        return ((((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5])
                / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0))
    if p > 1.0 - _P_LOW:
        q = math.sqrt(-2.0 * math.log(1.0 - p))
        return -((((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5])
                 / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0))
    return _central(p - 0.5)


@kernel
def _fill_uniforms(key, count, base, u):
    """``u[e]`` = uniform ``e`` of the stream (:func:`_unit` with ``base``) for ``e < count`` (``u`` holds at least
    ``count + 1``): one 64-bit draw per pair, in a branch-free loop LLVM vectorises."""
    for d in range((count + 1) // 2):
        r = _draw(key, base + d)
        u[2 * d] = (np.float64(r >> _S32) + 0.5) * _INV_2_32
        u[2 * d + 1] = (np.float64(r & _LOW32) + 0.5) * _INV_2_32


@kernel
def _fill_normals(key, count, u, z):
    """``z[e]`` = the normal quantile of uniform ``e`` (base 0) for ``e < count``, bit-identical to
    ``_normal_quantile(_unit(key, e, 0))``: the central rational for every value in a vectorised loop, then the tails
    (4.85 % of values) one by one."""
    _fill_uniforms(key, count, 0, u)
    for e in range(count):
        z[e] = _central(u[e] - 0.5)
    for e in range(count):
        p = u[e]
        if p < _P_LOW or p > 1.0 - _P_LOW:
            z[e] = _normal_quantile(p)


@kernel
def _store_grey(src, out, add, mul, values, n, mean, std, top, integer):
    """:func:`_store_all` for one channel: one flat loop LLVM vectorises (kept apart: inlined into the general case,
    it was not vectorised and cost 3x as much)."""
    for e in range(n):
        _store(out, e, np.float64(src[e]) * mul + add * values[e], 0, mean, std, top, integer)


@kernel
def _store_all(src, out, add, mul, values, n, c, channels_first, mean, std, top, integer):
    """Every value ``v`` of the image becomes ``v * mul + add * values[e]`` (``e = p * c + ch``, canonical order),
    stored as :func:`_store` does."""
    if c == 1:
        _store_grey(src, out, add, mul, values, n, mean, std, top, integer)
        return
    for p in range(n):
        for ch in range(c):
            e = p * c + ch
            off = ch * n + p if channels_first else e
            v = np.float64(src[off])
            _store(out, off, v * mul + add * values[e], ch, mean, std, top, integer)


@kernel
def _offset(p, ch, n_positions, channels, channels_first):
    """Memory offset of pixel position ``p``, channel ``ch``, in the model's layout."""
    return ch * n_positions + p if channels_first else p * channels + ch


@kernel
def _store(out, off, v, ch, mean, std, top, integer):
    """Write value ``v`` (image units): clipped to [0, top], rounded for an integer input, then normalised."""
    v = min(max(v, 0.0), top)
    if integer:
        v = np.rint(v)
    out[off] = (np.float32(v) - mean[ch]) / std[ch]


def param(default: Any = dataclasses.MISSING, *, lo=None, hi=None, lo_open: bool = False, whole: bool = False,
          choices: tuple[str, ...] | None = None, unit: str = "", doc: str = ""):
    """A family's parameter: a number in [lo, hi] (``lo_open``: (lo, hi]; ``whole``: an integer) or a word of
    ``choices``; ``unit`` and ``doc`` describe it in the README's table and in errors."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "whole": whole, "choices": choices, "unit": unit, "doc": doc}
    return field(default=default, metadata=meta)


def _as_number(family: str, name: str, value, meta) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{family}: {name} must be a number; got {value!r}")
    v = float(value)
    lo, hi = meta["lo"], meta["hi"]
    kind = "an integer" if meta["whole"] else "a number"
    where = f"{'(' if meta['lo_open'] else '['}{lo:g}, {hi:g}]"
    if not math.isfinite(v) or (meta["whole"] and v != int(v)) or v < lo or v > hi or (meta["lo_open"] and v <= lo):
        raise ValueError(f"{family}: {name} must be {kind} in {where}{' ' + meta['unit'] if meta['unit'] else ''}; "
                         f"got {value!r}")
    return int(v) if meta["whole"] else v


@dataclass(frozen=True)
class Family:
    """A noise family with its parameters (subclasses: one per family, each with its kernel in ``row``)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what a step does
    # random: a fresh draw every step (the first-failure protocol); sweep: step s is severity s (a ladder)
    kind: ClassVar[str] = "random"
    # True: values change, positions do not (the engine's per-pixel cost); False: pixels move (a spatial family)
    pixelwise: ClassVar[bool] = True
    # True: the kernel writes every value of ``out`` (so the clean image is not copied in first)
    writes_all: ClassVar[bool] = True
    row: ClassVar[Any]  # the row kernel (module docstring)
    # (parameter, five values, spatial): the severities a robustness profile runs; spatial values are pixels at
    # 32×32, scaled with the image's shorter side. None: the family has no severity (dihedral).
    severity: ClassVar[tuple[str, tuple[float, ...], bool] | None] = None
    _kernels: ClassVar[tuple | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if meta.get("choices") is not None:
                if value not in meta["choices"]:
                    raise ValueError(f"{self.name}: {f.name} must be one of {', '.join(meta['choices'])}; got "
                                     f"{value!r}")
            else:
                object.__setattr__(self, f.name, _as_number(self.name, f.name, value, meta))

    @classmethod
    def parameters(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    def text(self) -> str:
        """The canonical spelling, ``gaussian:sigma=0.1`` (parsed back by :func:`perturbcore.families.parse`)."""
        parts = [f"{f.name}={_word(getattr(self, f.name))}" for f in self.parameters()]
        return self.name + (":" + ",".join(parts) if parts else "")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        """The family's numbers for its kernel, float64, in the model's pixel units (``top``: 1 or 255)."""
        raise NotImplementedError

    def check_image(self, height: int, width: int, channels: int) -> None:
        """Raise ``ValueError`` naming the parameter when the family cannot apply to such images."""

    def at_severity(self, level: int, shape: tuple[int, int, int]) -> Family:
        """This family at severity ``level`` (1..5) of its profile ladder, for images of ``shape``."""
        if self.severity is None:
            return self
        name, values, spatial = self.severity
        v = values[level - 1]
        if spatial:
            v = max(1, round(v * min(shape[0], shape[1]) / 32))
        return dataclasses.replace(self, **{name: v})

    @classmethod
    def kernels(cls):
        """The (serial, parallel) batch kernels of this family, compiled on first use."""
        if cls.__dict__.get("_kernels") is None:
            cls._kernels = _batch_kernels(cls.row, not cls.writes_all)
        return cls._kernels


def _word(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return f"{v:.12g}"


@kernel
def _normalised_copy(src, dst, n, c, channels_first, mean, std):
    if channels_first:
        for ch in range(c):
            for p in range(n):
                dst[ch * n + p] = (src[ch * n + p] - mean[ch]) / std[ch]
    else:
        for p in range(n):
            for ch in range(c):
                dst[p * c + ch] = (src[p * c + ch] - mean[ch]) / std[ch]


def _batch_kernels(row, copies):
    """One batch driver per family: each row's slot at its step (step 0 is the clean image). ``copies``: the family
    writes only some values, so the clean image goes to ``out`` first, normalised (unless ``copied``: the caller
    copied it, which it does when the normalisation is the identity)."""

    def _batch(rows, row_steps, indices, source, out, params, seed, h, w, c, channels_first, mean, std, top,
               integer, copied):
        n = h * w
        for j in prange(rows.shape[0]):
            src = source[rows[j]]
            dst = out[j]
            step = row_steps[j]
            if (copies or step == 0) and not copied:
                _normalised_copy(src, dst, n, c, channels_first, mean, std)
            if step > 0:
                key = _stream_key(seed, indices[rows[j]], step)
                row(key, step, src, dst, params, h, w, c, channels_first, mean, std, top, integer)

    return kernel(_batch), parallel_kernel(_batch)


class PreparedFamily:
    """A family bound to an image geometry and the model's units, validated once (:func:`perturbcore.families.
    prepare`). :meth:`perturb` has the contract of :meth:`perturbcore.PreparedNoise.perturb` except that ``source``
    holds the clean images *not* normalised (``normalises_source`` is True): the kernel writes every value of
    ``out``, normalised."""

    normalises_source = True

    def __init__(self, family: Family, *, height, width, channels, seed, channels_first, mean, std, top, integer):
        self.family = family
        self.width = int(height) * int(width) * int(channels)
        self._args = (np.ascontiguousarray(family.kernel_params(float(top), (int(height), int(width), int(channels))),
                                           dtype=np.float64), np.uint64(seed), int(height), int(width), int(channels),
                      bool(channels_first), mean, std, float(top), bool(integer))
        # no normalisation: the clean values are copied as they are, by numpy (memcpy), before the kernel runs
        self._identity = bool(np.all(mean == 0) and np.all(std == 1))
        self._shape = (int(height), int(width), int(channels))
        self._layout = (bool(channels_first), mean, std, float(top), bool(integer))

    def _perturb_python(self, source, rows, row_steps, out) -> None:
        """The kernels' contract for a family with ``apply(image, step, top)`` instead of a row kernel."""
        h, w, c = self._shape
        channels_first, mean, std, top, integer = self._layout
        for j in range(rows.shape[0]):
            flat = source[rows[j]]
            img = (flat.reshape(c, h, w).transpose(1, 2, 0) if channels_first else flat.reshape(h, w, c))
            if row_steps[j] > 0:
                apply = cast(Any, self.family).apply
                v = np.clip(apply(img.astype(np.float64), int(row_steps[j]), top), 0.0, top)
                img = (np.rint(v) if integer else v).astype(np.float32)
            normed = (img.astype(np.float32) - mean) / std
            out[j] = (normed.transpose(2, 0, 1) if channels_first else normed).reshape(-1)

    def perturb(self, source, rows, row_steps, indices, out, *, threads: int | None = 1) -> None:
        """Write row ``j`` of ``out``: slot ``rows[j]`` of ``source`` at step ``row_steps[j]``."""
        if self.family.row is None:  # a family written in Python (jpeg): one image at a time
            self._perturb_python(source, rows, row_steps, out)
            return
        serial, parallel = type(self.family).kernels()
        if self._identity:
            np.take(source, rows, axis=0, out=out[:rows.shape[0]])
        run_on_threads(serial, parallel, (rows, row_steps, indices, source, out, *self._args, self._identity),
                       threads)
