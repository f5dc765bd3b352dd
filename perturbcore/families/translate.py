"""Random translations by whole pixels: the image moves by ``(dy, dx)``, each in ``[-shift, shift]``, uniform over
the ``(2 * shift + 1) ** 2 - 1`` shifts other than none (the unshifted image is the clean one, already asked);
pixels moved in from outside take ``value``. The shift is exact: every pixel keeps its bits.

Draws: ``g = draw(0) % ((2 * shift + 1) ** 2 - 1)``, skipping the centre of the grid of shifts: ``dy = g' // (2 *
shift + 1) - shift``, ``dx = g' % (2 * shift + 1) - shift``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _offset, _store, param
from perturbcore.rng import _draw


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    shift = np.int64(params[0])
    value = params[1]
    side = 2 * shift + 1
    g = np.int64(_draw(key, 0) % np.uint64(side * side - 1))
    if g >= shift * side + shift:
        g += 1
    dy = g // side - shift
    dx = g % side - shift
    n = h * w
    for y in range(h):
        for x in range(w):
            sy = y - dy
            sx = x - dx
            p = y * w + x
            inside = 0 <= sy < h and 0 <= sx < w
            for ch in range(c):
                off = _offset(p, ch, n, c, channels_first)
                v = np.float64(src[_offset(sy * w + sx, ch, n, c, channels_first)]) if inside else value
                _store(out, off, v, ch, mean, std, top, integer)


@dataclass(frozen=True)
class Translate(Family):
    """A random shift by up to ``shift`` pixels in each direction."""

    name = "translate"
    summary = "the image shifted by whole pixels, up to shift in each direction, never by none"
    pixelwise = False
    row = _row
    # the profile's five severities (1 to 6 pixels at 32×32)
    severity = ("shift", (1, 2, 3, 4, 6), True)

    shift: int = param(2, lo=1, hi=4096, whole=True, unit="pixels", doc="largest shift in each direction")
    value: float = param(0.0, lo=0, hi=1, unit="of the pixel range", doc="the value moved in from outside")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([float(self.shift), self.value * top])

    def check_image(self, height: int, width: int, channels: int) -> None:
        if self.shift >= max(height, width):
            raise ValueError(f"translate: shift must be an integer in [1, {max(height, width) - 1}] for "
                             f"{height}x{width} images; got {self.shift}")
