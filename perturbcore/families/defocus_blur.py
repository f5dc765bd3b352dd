"""Defocus blur by severity (CIFAR-10-C's ``defocus_blur``: a disk of radius 0.3, 0.4, 0.5, 1, 1.5 pixels at
32×32 smoothed by a Gaussian of 0.4, 0.5, 0.6, 0.2, 0.1), edges clamped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._sweep import Sweep, _convolve_taps, _level_base, disk, level_table, taps_of


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    _convolve_taps(src, out, params, _level_base(params, step), h, w, c, channels_first, mean, std, top, integer)


@dataclass(frozen=True)
class DefocusBlur(Sweep):
    """Defocus (disk) blur at five severities."""

    name = "defocus-blur"
    summary = "a defocus (disk) blur, radius 0.3 → 1.5 pixels at 32×32 (scaled with the image)"
    pixelwise = False
    row = _row
    ladder = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
    spatial = True
    level_names = ("radius", "alias_blur")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return level_table([taps_of(disk(r, a)) for r, a in self.levels(shape)])

    def levels(self, shape):
        f = min(shape[0], shape[1]) / 32.0
        return [(r * f, a) for r, a in self.ladder]  # the alias blur smooths the disk's own grid: not scaled
