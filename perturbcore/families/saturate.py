"""Saturation by severity (CIFAR-10-C's ``saturate``: HSV's saturation times 0.3, 0.1, 1.5, 2, 2.5 plus 0, 0, 0,
0.1, 0.2, clipped to [0, 1]); RGB images only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import _store
from perturbcore.families._colour import _hsv_to_rgb, _rgb_to_hsv
from perturbcore.families._sweep import Sweep, _level_base, level_table


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    base = _level_base(params, step)
    mul, add = params[base], params[base + 1]
    n = h * w
    for p in range(n):
        o = (p, n + p, 2 * n + p) if channels_first else (3 * p, 3 * p + 1, 3 * p + 2)
        hh, ss, vv = _rgb_to_hsv(np.float64(src[o[0]]) / top, np.float64(src[o[1]]) / top,
                                 np.float64(src[o[2]]) / top)
        r, g, b = _hsv_to_rgb(hh, min(max(ss * mul + add, 0.0), 1.0), vv)
        _store(out, o[0], r * top, 0, mean, std, top, integer)
        _store(out, o[1], g * top, 1, mean, std, top, integer)
        _store(out, o[2], b * top, 2, mean, std, top, integer)


@dataclass(frozen=True)
class Saturate(Sweep):
    """Desaturated then oversaturated colours at five severities."""

    name = "saturate"
    summary = "HSV saturation × 0.3, 0.1, 1.5, 2, 2.5 (+0, 0, 0, 0.1, 0.2): RGB only"
    row = _row
    ladder = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))
    level_names = ("mul", "add")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return level_table([np.array(level) for level in self.levels(shape)])

    def check_image(self, height: int, width: int, channels: int) -> None:
        if channels != 3:
            raise ValueError(f"saturate changes colours: it needs RGB images; these have {channels} channel(s)")
