"""Saturation by severity (CIFAR-10-C's ``saturate``: HSV's saturation times 0.3, 0.1, 1.5, 2, 2.5 plus 0, 0, 0,
0.1, 0.2, clipped to [0, 1]); RGB images only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._colour import _hsv_adjust
from perturbcore.families._sweep import Sweep, _level_base, level_table


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    base = _level_base(params, step)
    mul, add = params[base], params[base + 1]
    _hsv_adjust(src, out, 0.0, mul, add, h * w, channels_first, mean, std, top, integer)


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
