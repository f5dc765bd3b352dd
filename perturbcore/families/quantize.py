"""Colour quantisation by severity: each value rounded to one of ``2 ** bits`` evenly spaced levels over the pixel
range, bits 6, 5, 4, 3, 2 (not in ImageNet-C; the loss a palette or a low bit depth causes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import _store
from perturbcore.families._sweep import Sweep, _level_base, level_table


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    steps = 2.0 ** params[_level_base(params, step)] - 1.0
    n = h * w
    for p in range(n):
        for ch in range(c):
            off = ch * n + p if channels_first else p * c + ch
            v = min(max(np.float64(src[off]) / top, 0.0), 1.0)
            _store(out, off, np.floor(v * steps + 0.5) / steps * top, ch, mean, std, top, integer)


@dataclass(frozen=True)
class Quantize(Sweep):
    """Fewer levels per channel at five severities."""

    name = "quantize"
    summary = "each value rounded to 2^bits levels, bits 6 → 2"
    row = _row
    ladder = ((6.0,), (5.0,), (4.0,), (3.0,), (2.0,))
    level_names = ("bits",)

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return level_table([np.array(level) for level in self.levels(shape)])
