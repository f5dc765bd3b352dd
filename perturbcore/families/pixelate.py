"""Pixelation by severity (CIFAR-10-C's ``pixelate``: down to 0.95, 0.9, 0.85, 0.75, 0.65 of each side, then back
up). Down: each small pixel is the mean of the pixels whose centres fall inside it (Pillow's box filter); up: each
pixel takes the small pixel under its centre (Pillow's nearest neighbour), with Pillow's own float64 arithmetic, so
ties fall as they do in Pillow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import _store
from perturbcore.families._sweep import Sweep, _level_base, level_table


def _box_blocks(size: int, small: int) -> np.ndarray:
    """Which small pixel each of ``size`` pixels averages into, by Pillow's box filter (``Resample.c``: the pixels
    ``j`` with ``-0.5 < (j - centre + 0.5) / scale <= 0.5``, ``centre = (i + 0.5) * scale``, float64)."""
    scale = size / small
    block = np.full(size, -1)
    for i in range(small):
        centre = (i + 0.5) * scale
        lo = max(int(centre - 0.5 * scale + 0.5), 0)
        hi = min(int(centre + 0.5 * scale + 0.5), size)
        for j in range(lo, hi):
            t = (j - centre + 0.5) * (1.0 / scale)
            if -0.5 < t <= 0.5 and block[j] < 0:
                block[j] = i
    return block


def _nearest(size: int, small: int) -> np.ndarray:
    """Which small pixel each of ``size`` pixels shows, by Pillow's nearest neighbour (``ImagingScaleAffine`` in
    ``Geometry.c``: a position that starts at half a step and grows by ``small / size`` per pixel, in float64,
    truncated), so a pixel whose centre falls on a boundary goes where Pillow sends it."""
    step = small / size
    pos = step * 0.5
    out = np.empty(size, dtype=np.int64)
    for i in range(size):
        out[i] = min(int(pos), small - 1)
        pos += step
    return out


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    base = _level_base(params, step)
    sh = np.int64(params[base])
    sw = np.int64(params[base + 1])
    down_y, down_x = base + 2, base + 2 + h
    up_y, up_x = base + 2 + h + w, base + 2 + 2 * h + w
    n = h * w
    small = np.zeros(sh * sw * c)
    count = np.zeros(sh * sw)
    for y in range(h):
        by = np.int64(params[down_y + y])
        for x in range(w):
            b = by * sw + np.int64(params[down_x + x])
            if by < 0 or params[down_x + x] < 0:
                continue
            count[b] += 1.0
            for ch in range(c):
                small[b * c + ch] += np.float64(src[ch * n + y * w + x if channels_first else (y * w + x) * c + ch])
    for y in range(h):
        by = np.int64(params[up_y + y])
        for x in range(w):
            b = by * sw + np.int64(params[up_x + x])
            for ch in range(c):
                p = y * w + x
                v = small[b * c + ch] / count[b]
                _store(out, ch * n + p if channels_first else p * c + ch, v, ch, mean, std, top, integer)


@dataclass(frozen=True)
class Pixelate(Sweep):
    """Blocky images at five severities."""

    name = "pixelate"
    summary = "down to 0.95 → 0.65 of each side (box), then back up (nearest)"
    pixelwise = False
    row = _row
    ladder = ((0.95,), (0.9,), (0.85,), (0.75,), (0.65,))
    level_names = ("factor",)

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        h, w = shape[0], shape[1]
        rows = []
        for (f,) in self.levels(shape):
            sh, sw = max(1, round(h * f)), max(1, round(w * f))
            rows.append(np.concatenate([[sh, sw], _box_blocks(h, sh), _box_blocks(w, sw), _nearest(h, sh),
                                        _nearest(w, sw)]).astype(np.float64))
        return level_table(rows)
