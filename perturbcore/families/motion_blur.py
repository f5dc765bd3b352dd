"""Motion blur by severity (CIFAR-10-C's ``motion_blur`` radii and sigmas, (10, 1) → (12, 3) at 32×32, with
imagecorruptions' one-sided Gaussian trail), along ``angle`` (degrees; fixed, so the sweep is deterministic), edges
clamped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import param
from perturbcore.families._sweep import Sweep, _convolve_taps, _level_base, level_table, motion_line, taps_of


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    _convolve_taps(src, out, params, _level_base(params, step), h, w, c, channels_first, mean, std, top, integer)


@dataclass(frozen=True)
class MotionBlur(Sweep):
    """Motion blur at five severities along one direction."""

    name = "motion-blur"
    summary = "a motion blur along angle, trail radius 10 → 12 and sigma 1 → 3 pixels at 32×32 (scaled)"
    pixelwise = False
    row = _row
    ladder = ((10.0, 1.0), (10.0, 1.5), (10.0, 2.0), (10.0, 2.5), (12.0, 3.0))
    spatial = True
    level_names = ("radius", "sigma")

    angle: float = param(0.0, lo=-180, hi=180, unit="degrees", doc="direction of the motion")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return level_table([taps_of(motion_line(r, s, self.angle)) for r, s in self.levels(shape)])
