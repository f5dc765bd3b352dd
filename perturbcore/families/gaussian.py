"""Additive Gaussian noise: every value gets ``sigma * z``, ``z`` standard normal (ImageNet-C's ``gaussian_noise``,
drawn afresh at every step).

Draws: the value of pixel ``p``, channel ``ch`` uses uniform ``e = p * c + ch`` (:func:`~perturbcore.families._base.
_unit`, base 0), turned into a normal by its quantile function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _fill_normals, _store_all, param


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    d = h * w * c
    u = np.empty(d + 1)
    z = np.empty(d + 1)
    _fill_normals(key, d, u, z)
    _store_all(src, out, params[0], 1.0, z, h * w, c, channels_first, mean, std, top, integer)

@dataclass(frozen=True)
class Gaussian(Family):
    """Additive Gaussian noise of standard deviation ``sigma`` (a share of the pixel range)."""

    name = "gaussian"
    summary = "every value + sigma·N(0, 1), clipped"
    row = _row
    # the profile's five severities (CIFAR-10-C's gaussian_noise)
    severity = ("sigma", (0.04, 0.06, 0.08, 0.09, 0.10), False)

    sigma: float = param(0.1, lo=0, hi=1, lo_open=True, unit="of the pixel range", doc="standard deviation")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.sigma * top])
