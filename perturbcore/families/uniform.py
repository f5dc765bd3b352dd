"""Uniform noise in an L∞ box: every value gets ``u``, uniform in ``[-eps, eps]``.

Draws: pixel ``p``, channel ``ch`` uses uniform ``e = p * c + ch`` (base 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _offset, _store, _unit, param


@kernel
def _row(key, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    eps = params[0]
    n = h * w
    for p in range(n):
        for ch in range(c):
            off = _offset(p, ch, n, c, channels_first)
            u = _unit(key, p * c + ch, 0)
            _store(out, off, np.float64(src[off]) + eps * (2.0 * u - 1.0), ch, mean, std, top, integer)


@dataclass(frozen=True)
class Uniform(Family):
    """Uniform noise in the L∞ ball of radius ``eps`` (a share of the pixel range)."""

    name = "uniform"
    summary = "every value + U(-eps, eps), clipped"
    row = _row

    eps: float = param(0.1, lo=0, hi=1, lo_open=True, unit="of the pixel range", doc="L∞ radius")

    def kernel_params(self, top: float) -> np.ndarray:
        return np.array([self.eps * top])
