"""Pixel dropout: each pixel, independently with probability ``rate``, is set to ``value`` in every channel (black
by default), as a dead sensor pixel or a dropped packet would.

Draws: pixel ``p`` uses uniform ``e = p`` (base 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _fill_uniforms, _offset, _store, param


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    rate = params[0]
    value = params[1]
    n = h * w
    u = np.empty(n + 1)
    _fill_uniforms(key, n, 0, u)
    for p in range(n):
        if u[p] < rate:
            for ch in range(c):
                _store(out, _offset(p, ch, n, c, channels_first), value, ch, mean, std, top, integer)

@dataclass(frozen=True)
class Dropout(Family):
    """A share ``rate`` of the pixels (in expectation) set to ``value``."""

    name = "dropout"
    summary = "each pixel, with probability rate, set to value"
    writes_all = False
    row = _row
    # the profile's five severities (from 1 % to 20 % of pixels)
    severity = ("rate", (0.01, 0.02, 0.05, 0.1, 0.2), False)

    rate: float = param(0.05, lo=0, hi=1, lo_open=True, unit="share of pixels", doc="probability per pixel")
    value: float = param(0.0, lo=0, hi=1, unit="of the pixel range", doc="the value a dropped pixel takes")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.rate, self.value * top])
