"""Speckle (multiplicative) noise: a value ``v`` becomes ``v + v * sigma * z``, ``z`` standard normal (ImageNet-C's
``speckle_noise``).

Draws: pixel ``p``, channel ``ch`` uses uniform ``e = p * c + ch`` (base 0), through the normal quantile function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _normal_quantile, _offset, _store, _unit, param


@kernel
def _row(key, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    sigma = params[0]
    n = h * w
    for p in range(n):
        for ch in range(c):
            off = _offset(p, ch, n, c, channels_first)
            v = np.float64(src[off])
            z = _normal_quantile(_unit(key, p * c + ch, 0))
            _store(out, off, v + v * sigma * z, ch, mean, std, top, integer)


@dataclass(frozen=True)
class Speckle(Family):
    """Multiplicative Gaussian noise of relative standard deviation ``sigma``."""

    name = "speckle"
    summary = "every value v → v + v·sigma·N(0, 1), clipped"
    row = _row

    sigma: float = param(0.2, lo=0, hi=5, lo_open=True, unit="relative", doc="relative standard deviation")

    def kernel_params(self, top: float) -> np.ndarray:
        return np.array([self.sigma])
