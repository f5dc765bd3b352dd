"""RGB ↔ HSV for one pixel (matplotlib.colors' definitions: hue in [0, 1), ties for the largest channel go to blue,
then green), for the brightness and saturation sweeps."""

from __future__ import annotations

import math

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import _store


@kernel
def _rgb_to_hsv(r, g, b):
    v = max(r, g, b)
    delta = v - min(r, g, b)
    s = delta / v if v > 0.0 else 0.0
    h = 0.0
    if delta > 0.0:
        if b == v:
            h = 4.0 + (r - g) / delta
        elif g == v:
            h = 2.0 + (b - r) / delta
        else:
            h = (g - b) / delta
        h = (h / 6.0) % 1.0
    return h, s, v


@kernel
def _hsv_to_rgb(h, s, v):
    i = math.floor(h * 6.0)
    f = h * 6.0 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    k = int(i) % 6
    if s == 0.0:
        return v, v, v
    if k == 0:
        return v, t, p
    if k == 1:
        return q, v, p
    if k == 2:
        return p, v, t
    if k == 3:
        return p, q, v
    if k == 4:
        return t, p, v
    return v, p, q


@kernel
def _hsv_adjust(src, out, v_add, s_mul, s_add, n, channels_first, mean, std, top, integer):
    """Every pixel of an RGB image through HSV: value + ``v_add``, saturation × ``s_mul`` + ``s_add`` (both
    clipped to [0, 1]), then back to RGB and stored."""
    for p in range(n):
        o = (p, n + p, 2 * n + p) if channels_first else (3 * p, 3 * p + 1, 3 * p + 2)
        hh, ss, vv = _rgb_to_hsv(np.float64(src[o[0]]) / top, np.float64(src[o[1]]) / top,
                                 np.float64(src[o[2]]) / top)
        r, g, b = _hsv_to_rgb(hh, min(max(ss * s_mul + s_add, 0.0), 1.0), min(max(vv + v_add, 0.0), 1.0))
        _store(out, o[0], r * top, 0, mean, std, top, integer)
        _store(out, o[1], g * top, 1, mean, std, top, integer)
        _store(out, o[2], b * top, 2, mean, std, top, integer)
