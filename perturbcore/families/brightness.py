"""Brightness by severity (CIFAR-10-C's ``brightness``: +0.05, 0.1, 0.15, 0.2, 0.3 on HSV's value, clipped to
[0, 1]; a grey image's value is the pixel itself)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import _store
from perturbcore.families._colour import _hsv_adjust
from perturbcore.families._sweep import Sweep, _level_base, level_table


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    add = params[_level_base(params, step)]
    n = h * w
    if c == 3:
        _hsv_adjust(src, out, add, 1.0, 0.0, n, channels_first, mean, std, top, integer)
        return
    for p in range(n):  # grey: HSV's value is the pixel
        _store(out, p, (min(max(np.float64(src[p]) / top + add, 0.0), 1.0)) * top, 0, mean, std, top, integer)


@dataclass(frozen=True)
class Brightness(Sweep):
    """Brighter images at five severities."""

    name = "brightness"
    summary = "brighter: +0.05 → +0.3 on HSV's value"
    row = _row
    ladder = ((0.05,), (0.1,), (0.15,), (0.2,), (0.3,))
    level_names = ("add",)

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return level_table([np.array(level) for level in self.levels(shape)])

    def check_image(self, height: int, width: int, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"brightness works on grey or RGB images; these have {channels} channels")
