"""RGB ↔ HSV for one pixel (matplotlib.colors' definitions: hue in [0, 1), ties for the largest channel go to blue,
then green), for the brightness and saturation sweeps."""

from __future__ import annotations

import math

from perturbcore._jit import kernel


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
