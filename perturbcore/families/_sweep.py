"""The base of the deterministic corruptions (blurs, brightness, contrast, saturation, pixelation, JPEG,
quantisation): nothing is drawn, so each step is a *severity* instead of a fresh draw. Step ``s`` (1..5) applies
level ``s`` of the family's ladder to the original image, and an image's first-failure step is its **first failing
severity** (``-1``: it survives all five levels). The whole engine (records, replay, sessions, Dask, failure
counts) applies unchanged, with ``max_steps`` set to the ladder's length.

Ladders are CIFAR-10-C's (Hendrycks and Dietterich, 2019), made for 32×32 images; the spatial ones (blur radii,
motion length, nothing else) scale linearly with the image's shorter side over 32, so a 28×28 image gets 7/8 of them
and a 224×224 one 7 times them. Values are in [0, 1] units of the pixel range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _store

LEVELS = 5


@dataclass(frozen=True)
class Sweep(Family):
    """A deterministic corruption run as a ladder of severities (subclasses set ``ladder`` and ``spatial``)."""

    kind: ClassVar[str] = "sweep"
    # one tuple of numbers per severity, at 32×32
    ladder: ClassVar[tuple[tuple[float, ...], ...]]
    # True: the numbers are lengths in pixels, scaled with the image's shorter side
    spatial: ClassVar[bool] = False
    # what each number of a level means, for the level's description
    level_names: ClassVar[tuple[str, ...]]

    def levels(self, shape: tuple[int, int, int]) -> list[tuple[float, ...]]:
        """The ladder for images of ``shape`` (scaled when spatial)."""
        f = min(shape[0], shape[1]) / 32.0 if self.spatial else 1.0
        return [tuple(v * f for v in level) for level in self.ladder]

    def describe_level(self, step: int, shape: tuple[int, int, int]) -> str:
        level = self.levels(shape)[step - 1]
        return ", ".join(f"{k}={v:.4g}" for k, v in zip(self.level_names, level, strict=True))


def level_table(rows: list[np.ndarray]) -> np.ndarray:
    """The kernel's params for a ladder whose levels are arrays of different lengths: ``[levels, stride, level 1
    padded to stride, level 2, ...]``; a kernel reads level ``s`` at ``2 + (s - 1) * stride``."""
    stride = max(len(r) for r in rows)
    out = np.zeros(2 + stride * len(rows))
    out[0], out[1] = len(rows), stride
    for i, r in enumerate(rows):
        out[2 + i * stride: 2 + i * stride + len(r)] = r
    return out


@kernel
def _level_base(params, step):
    """Where level ``step`` starts in a :func:`level_table`."""
    s = min(max(step, 1), np.int64(params[0]))
    return 2 + (s - 1) * np.int64(params[1])


def gaussian_weights(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian of standard deviation ``sigma`` over ``[-r, r]``, ``r = int(4 * sigma + 0.5)``
    (scipy.ndimage's truncation)."""
    r = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def taps_of(weights2d: np.ndarray) -> np.ndarray:
    """A 2-D kernel (odd sides, centred) as the sparse taps ``[n, dy0, dx0, w0, dy1, ...]`` of its nonzero weights."""
    ky, kx = weights2d.shape
    ys, xs = np.nonzero(weights2d)
    out = [float(len(ys))]
    for y, x in zip(ys, xs, strict=True):
        out += [float(y - ky // 2), float(x - kx // 2), float(weights2d[y, x])]
    return np.array(out)


@kernel
def _convolve_taps(src, out, params, base, h, w, c, channels_first, mean, std, top, integer):
    """``out`` = ``src`` correlated with the taps at ``params[base:]`` (``[n, dy, dx, w, ...]``), edges clamped
    (the nearest edge pixel stands in for one outside); each value clipped, rounded and normalised by ``_store``."""
    n_taps = np.int64(params[base])
    n = h * w
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                acc = 0.0
                for t in range(n_taps):
                    yy = min(max(y + np.int64(params[base + 1 + 3 * t]), 0), h - 1)
                    xx = min(max(x + np.int64(params[base + 2 + 3 * t]), 0), w - 1)
                    p = yy * w + xx
                    acc += params[base + 3 + 3 * t] * np.float64(src[ch * n + p if channels_first else p * c + ch])
                p = y * w + x
                _store(out, ch * n + p if channels_first else p * c + ch, acc, ch, mean, std, top, integer)


def disk(radius: float, alias_blur: float) -> np.ndarray:
    """ImageNet-C's defocus kernel: the pixels within ``radius`` of the centre, normalised, then smoothed by a 3×3
    Gaussian of ``alias_blur`` (5×5 past radius 8), and normalised again."""
    half = 8 if radius <= 8 else int(math.ceil(radius))
    grid = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(grid, grid)
    d = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    d /= d.sum()
    k = 1 if radius <= 8 else 2
    g = np.exp(-0.5 * (np.arange(-k, k + 1) / alias_blur) ** 2)
    g /= g.sum()
    padded = np.pad(d, k)
    rows = sum(g[i] * padded[:, i: i + d.shape[1]] for i in range(2 * k + 1))
    smooth = sum(g[i] * rows[i: i + d.shape[0], :] for i in range(2 * k + 1))
    smooth = np.where(smooth > 1e-12, smooth, 0.0)
    return smooth / smooth.sum()


def motion_line(radius: float, sigma: float, angle: float) -> np.ndarray:
    """imagecorruptions' motion kernel: a one-sided Gaussian trail of ``2 * radius + 1`` taps at ``angle`` degrees
    (0: the picture smears to the left, each pixel taking the ones to its right... as a camera moving right)."""
    width = int(2 * round(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    t = math.radians(angle)
    dys = np.round(i * math.sin(t)).astype(int)
    dxs = np.round(i * math.cos(t)).astype(int)
    side = 2 * max(np.abs(dys).max(), np.abs(dxs).max()) + 1
    k = np.zeros((side, side))
    for dy, dx, wt in zip(dys, dxs, weights, strict=True):
        k[side // 2 + dy, side // 2 + dx] += wt
    return k
