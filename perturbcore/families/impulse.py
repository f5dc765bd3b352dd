"""Impulse (salt-and-pepper) noise by density: each pixel, independently with probability ``density``, becomes
black (pepper, all channels 0) or white (salt, all channels at the top of the range), with equal probability; the
fixed-count L0 noise (``pixels=``, ``scheme=salt-pepper``) is its sibling.

Draws: pixel ``p`` uses uniform ``e = p`` (base 0): below ``density / 2`` pepper, below ``density`` salt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _fill_uniforms, _offset, _store, param


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    density = params[0]
    n = h * w
    u = np.empty(n + 1)
    _fill_uniforms(key, n, 0, u)
    for p in range(n):
        if u[p] < density:
            v = 0.0 if u[p] < 0.5 * density else top
            for ch in range(c):
                _store(out, _offset(p, ch, n, c, channels_first), v, ch, mean, std, top, integer)

@dataclass(frozen=True)
class Impulse(Family):
    """Salt-and-pepper noise on a share ``density`` of the pixels (in expectation)."""

    name = "impulse"
    summary = "each pixel, with probability density, set to black or white"
    writes_all = False
    row = _row
    # the profile's five severities (CIFAR-10-C's impulse_noise)
    severity = ("density", (0.01, 0.02, 0.03, 0.05, 0.07), False)

    density: float = param(0.05, lo=0, hi=1, lo_open=True, unit="share of pixels", doc="probability per pixel")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.density])
