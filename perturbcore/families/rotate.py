"""Small random rotations: the image turns about its centre by an angle uniform in ``[-degrees, degrees]``,
resampled bilinearly; source positions outside the image take ``value``.

Draws: the angle is ``degrees * (2 * u - 1)``, ``u`` the uniform ``e = 0`` (base 0). Output pixel ``(y, x)`` samples
the source at ``(cy + (y - cy) cos t + (x - cx) sin t, cx - (y - cy) sin t + (x - cx) cos t)`` with ``(cy, cx) =
((h - 1) / 2, (w - 1) / 2)``: the picture turns counter-clockwise for a positive angle. Interpolation is in float64
on the image's units, then clipped and rounded like every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _offset, _store, _unit, param


@kernel
def _sample(src, y, x, ch, h, w, c, channels_first, value):
    if 0 <= y < h and 0 <= x < w:
        return np.float64(src[_offset(y * w + x, ch, h * w, c, channels_first)])
    return value


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    degrees = params[0]
    value = params[1]
    t = degrees * (2.0 * _unit(key, 0, 0) - 1.0) * math.pi / 180.0
    cos_t = math.cos(t)
    sin_t = math.sin(t)
    cy = (h - 1) / 2.0
    cx = (w - 1) / 2.0
    n = h * w
    for y in range(h):
        for x in range(w):
            sy = cy + (y - cy) * cos_t + (x - cx) * sin_t
            sx = cx - (y - cy) * sin_t + (x - cx) * cos_t
            y0 = np.int64(math.floor(sy))
            x0 = np.int64(math.floor(sx))
            fy = sy - y0
            fx = sx - x0
            for ch in range(c):
                v00 = _sample(src, y0, x0, ch, h, w, c, channels_first, value)
                v01 = _sample(src, y0, x0 + 1, ch, h, w, c, channels_first, value)
                v10 = _sample(src, y0 + 1, x0, ch, h, w, c, channels_first, value)
                v11 = _sample(src, y0 + 1, x0 + 1, ch, h, w, c, channels_first, value)
                v = (1.0 - fy) * ((1.0 - fx) * v00 + fx * v01) + fy * ((1.0 - fx) * v10 + fx * v11)
                _store(out, _offset(y * w + x, ch, n, c, channels_first), v, ch, mean, std, top, integer)


@dataclass(frozen=True)
class Rotate(Family):
    """A random rotation by up to ``degrees`` either way, bilinear."""

    name = "rotate"
    summary = "the image turned by an angle uniform in ±degrees about its centre, bilinear"
    pixelwise = False
    row = _row
    # the profile's five severities (5 to 30 degrees)
    severity = ("degrees", (5.0, 10.0, 15.0, 20.0, 30.0), False)

    degrees: float = param(10.0, lo=0, hi=180, lo_open=True, unit="degrees", doc="largest angle either way")
    value: float = param(0.0, lo=0, hi=1, unit="of the pixel range", doc="the value outside the image")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.degrees, self.value * top])
