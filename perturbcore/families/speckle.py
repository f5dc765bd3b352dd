"""Speckle (multiplicative) noise: a value ``v`` becomes ``v + v * sigma * z``, ``z`` standard normal (ImageNet-C's
``speckle_noise``).

Draws: pixel ``p``, channel ``ch`` uses uniform ``e = p * c + ch`` (base 0), through the normal quantile function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _fill_normals, _store, param


@kernel
def _speckle_grey(src, out, sigma, z, n, mean, std, top, integer):
    """One channel: a flat loop LLVM vectorises (as :func:`~perturbcore.families._base._store_grey`)."""
    for e in range(n):
        v = np.float64(src[e])
        _store(out, e, v + v * sigma * z[e], 0, mean, std, top, integer)


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    sigma = params[0]
    n = h * w
    d = n * c
    u = np.empty(d + 1)
    z = np.empty(d + 1)
    _fill_normals(key, d, u, z)
    if c == 1:
        _speckle_grey(src, out, sigma, z, n, mean, std, top, integer)
        return
    for p in range(n):
        for ch in range(c):
            e = p * c + ch
            off = ch * n + p if channels_first else e
            v = np.float64(src[off])
            _store(out, off, v + v * sigma * z[e], ch, mean, std, top, integer)

@dataclass(frozen=True)
class Speckle(Family):
    """Multiplicative Gaussian noise of relative standard deviation ``sigma``."""

    name = "speckle"
    summary = "every value v → v + v·sigma·N(0, 1), clipped"
    row = _row
    # the profile's five severities (CIFAR-10-C's speckle_noise)
    severity = ("sigma", (0.06, 0.1, 0.12, 0.16, 0.2), False)

    sigma: float = param(0.2, lo=0, hi=5, lo_open=True, unit="relative", doc="relative standard deviation")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.sigma])
