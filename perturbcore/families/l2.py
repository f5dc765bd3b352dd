"""Noise of a fixed L2 norm (``shape=sphere``) or uniform in the L2 ball (``shape=ball``), over the whole image.

Draws: a direction from ``d = h * w * c`` normals (uniform ``e = p * c + ch``, base 0, through the normal quantile
function), normalised to unit length; for the ball a radius ``eps * u ** (1 / d)`` with ``u`` the uniform at counter
``d`` (base ``(d + 1) // 2 + 1``, past every normal). The norm is taken before clipping: clipped values move less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _fill_normals, _store_all, _unit, param


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    eps = params[0]
    ball = params[1] != 0.0
    d = h * w * c
    u = np.empty(d + 1)
    z = np.empty(d + 1)
    _fill_normals(key, d, u, z)
    total = 0.0
    for e in range(d):
        total += z[e] * z[e]
    radius = eps
    if ball:
        radius = eps * _unit(key, 0, (d + 1) // 2 + 1) ** (1.0 / d)
    scale = radius / math.sqrt(total) if total > 0.0 else 0.0
    _store_all(src, out, scale, 1.0, z, h * w, c, channels_first, mean, std, top, integer)

@dataclass(frozen=True)
class L2(Family):
    """A random direction with L2 norm ``eps`` (sphere) or up to ``eps`` (ball), in pixel-range units."""

    name = "l2"
    summary = "a random direction of L2 norm eps (sphere) or within eps (ball), clipped"
    row = _row
    # the profile's five severities (doubling from 0.25)
    severity = ("eps", (0.25, 0.5, 1.0, 2.0, 4.0), False)

    eps: float = param(1.0, lo=0, hi=1000, lo_open=True, unit="L2 norm in pixel-range units", doc="radius")
    shape: str = param("sphere", choices=("sphere", "ball"), doc="on the sphere or uniform in the ball")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.eps * top, 1.0 if self.shape == "ball" else 0.0])
