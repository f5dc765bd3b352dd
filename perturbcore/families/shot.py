"""Shot (Poisson) noise: a value ``v`` becomes ``k / photons`` (in pixel-range units), ``k`` Poisson with mean
``photons * v`` (ImageNet-C's ``shot_noise``: ``poisson(x * c) / c``). Fewer photons, more noise.

Draws: pixel ``p``, channel ``ch`` uses uniform ``e = p * c + ch`` (base 0), turned into ``k`` by inverting the
Poisson distribution function (summed term by term, in float64), so each value costs one draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _fill_uniforms, _store, param


@kernel
def _poisson_quantile(u, mu):
    """The smallest k with P(K <= k) >= u for K ~ Poisson(mu) (mu <= 500, so exp(-mu) does not underflow)."""
    term = math.exp(-mu)
    cdf = term
    k = 0
    while cdf < u and k < 100000:
        k += 1
        term *= mu / k
        cdf += term
        if term == 0.0 and k > mu:  # the tail's terms underflowed: u lies in float64's rounding of the last ones
            break
    return k


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    photons = params[0]
    n = h * w
    u = np.empty(n * c + 1)
    _fill_uniforms(key, n * c, 0, u)
    for p in range(n):
        for ch in range(c):
            e = p * c + ch
            off = ch * n + p if channels_first else e
            v = min(max(np.float64(src[off]), 0.0), top) / top
            k = _poisson_quantile(u[e], photons * v)
            _store(out, off, k / photons * top, ch, mean, std, top, integer)

@dataclass(frozen=True)
class Shot(Family):
    """Poisson noise at ``photons`` photons for a full-range value (ImageNet-C: 60 → 3; CIFAR-10-C: 500 → 50)."""

    name = "shot"
    summary = "every value v → Poisson(photons·v) / photons, clipped"
    row = _row
    # the profile's five severities (CIFAR-10-C's shot_noise)
    severity = ("photons", (500.0, 250.0, 100.0, 75.0, 50.0), False)

    photons: float = param(60.0, lo=1, hi=500, unit="photons at full range", doc="photon count")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([self.photons])
