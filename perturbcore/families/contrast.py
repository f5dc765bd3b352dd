"""Contrast by severity (CIFAR-10-C's ``contrast``: each channel pulled towards its own mean over the image, keeping
0.75, 0.5, 0.4, 0.3, 0.15 of the difference)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import _store
from perturbcore.families._sweep import Sweep, _level_base, level_table


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    keep = params[_level_base(params, step)]
    n = h * w
    for ch in range(c):
        total = 0.0
        for p in range(n):
            total += np.float64(src[ch * n + p if channels_first else p * c + ch])
        m = total / n
        for p in range(n):
            off = ch * n + p if channels_first else p * c + ch
            _store(out, off, (np.float64(src[off]) - m) * keep + m, ch, mean, std, top, integer)


@dataclass(frozen=True)
class Contrast(Sweep):
    """Lower contrast at five severities."""

    name = "contrast"
    summary = "lower contrast: (v - channel mean) × 0.75 → 0.15 + channel mean"
    row = _row
    ladder = ((0.75,), (0.5,), (0.4,), (0.3,), (0.15,))
    level_names = ("keep",)

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return level_table([np.array(level) for level in self.levels(shape)])
