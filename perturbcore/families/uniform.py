"""Uniform noise in an L∞ box: every value gets ``u``, uniform in ``[-eps, eps]``.

Draws: pixel ``p``, channel ``ch`` uses uniform ``e = p * c + ch`` (base 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _fill_uniforms, _store_all, param


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    d = h * w * c
    u = np.empty(d + 1)
    _fill_uniforms(key, d, 0, u)
    for e in range(d):
        u[e] = 2.0 * u[e] - 1.0
    _store_all(src, out, params[0], 1.0, u, h * w, c, channels_first, mean, std, top, integer)

@dataclass(frozen=True)
class Uniform(Family):
    """Uniform noise in the L∞ ball of radius ``eps`` (a share of the pixel range)."""

    name = "uniform"
    summary = "every value + U(-eps, eps), clipped"
    row = _row
    # the profile's five severities (evenly spaced up to 0.1)
    severity = ("eps", (0.02, 0.04, 0.06, 0.08, 0.10), False)

    eps: float = param(0.1, lo=0, hi=1, lo_open=True, unit="of the pixel range", doc="L∞ radius")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.eps * top])
