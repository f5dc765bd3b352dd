"""Gaussian blur by severity (CIFAR-10-C's ``gaussian_blur``: sigma 0.4, 0.6, 0.7, 0.8, 1 pixels at 32×32), separable,
truncated at 4 sigma, edges clamped (scipy.ndimage's ``gaussian_filter`` with ``mode="nearest"``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import _store
from perturbcore.families._sweep import Sweep, _level_base, gaussian_weights, level_table


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    base = _level_base(params, step)
    r = np.int64(params[base])
    n = h * w
    rows = np.empty(n * c)  # the horizontal pass, in canonical order
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                acc = 0.0
                for t in range(-r, r + 1):
                    p = y * w + min(max(x + t, 0), w - 1)
                    acc += params[base + 1 + r + t] * np.float64(src[ch * n + p if channels_first else p * c + ch])
                rows[(y * w + x) * c + ch] = acc
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                acc = 0.0
                for t in range(-r, r + 1):
                    acc += params[base + 1 + r + t] * rows[(min(max(y + t, 0), h - 1) * w + x) * c + ch]
                p = y * w + x
                _store(out, ch * n + p if channels_first else p * c + ch, acc, ch, mean, std, top, integer)


@dataclass(frozen=True)
class GaussianBlur(Sweep):
    """Gaussian blur at five severities."""

    name = "gaussian-blur"
    summary = "a Gaussian blur, sigma 0.4 → 1 pixel at 32×32 (scaled with the image)"
    pixelwise = False
    row = _row
    ladder = ((0.4,), (0.6,), (0.7,), (0.8,), (1.0,))
    spatial = True
    level_names = ("sigma",)

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        rows = []
        for (sigma,) in self.levels(shape):
            wts = gaussian_weights(sigma)
            rows.append(np.concatenate([[float(len(wts) // 2)], wts]))
        return level_table(rows)
