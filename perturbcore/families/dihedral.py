"""Flips and quarter turns: each step applies one of the dihedral group's elements other than the identity, uniform:
``group=flips`` the horizontal flip, the vertical flip and the half turn; ``group=d4`` also the quarter turns, the
transpose and the anti-transpose (square images only). Exact: every pixel keeps its bits.

Draws: the element is ``draw(0) % 3`` (flips) or ``draw(0) % 7`` (d4), numbered as :data:`ELEMENTS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _offset, _store, param
from perturbcore.rng import _draw

# Output pixel (y, x) takes source pixel: 0 (x flipped), 1 (y flipped), 2 (both: the half turn), 3 (transposed),
# 4 (turned a quarter counter-clockwise, numpy.rot90), 5 (a quarter clockwise), 6 (anti-transposed).
ELEMENTS = ("hflip", "vflip", "rot180", "transpose", "rot90", "rot270", "antitranspose")


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    k = np.int64(_draw(key, 0) % np.uint64(np.int64(params[0])))
    n = h * w
    for y in range(h):
        for x in range(w):
            if k == 0:
                sy, sx = y, w - 1 - x
            elif k == 1:
                sy, sx = h - 1 - y, x
            elif k == 2:
                sy, sx = h - 1 - y, w - 1 - x
            elif k == 3:
                sy, sx = x, y
            elif k == 4:
                sy, sx = x, w - 1 - y
            elif k == 5:
                sy, sx = h - 1 - x, y
            else:
                sy, sx = w - 1 - x, h - 1 - y
            for ch in range(c):
                _store(out, _offset(y * w + x, ch, n, c, channels_first),
                       np.float64(src[_offset(sy * w + sx, ch, n, c, channels_first)]), ch, mean, std, top, integer)


@dataclass(frozen=True)
class Dihedral(Family):
    """A random flip (``flips``) or flip or quarter turn (``d4``)."""

    name = "dihedral"
    summary = "a random flip or half turn (flips), or also a quarter turn or transpose (d4)"
    pixelwise = False
    row = _row

    group: str = param("flips", choices=("flips", "d4"), doc="flips: 3 elements; d4: 7 (square images)")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([3.0 if self.group == "flips" else 7.0])

    def check_image(self, height: int, width: int, channels: int) -> None:
        if self.group == "d4" and height != width:
            raise ValueError(f"dihedral: group=d4 turns images a quarter, which needs square images; these are "
                             f"{height}x{width}: use group=flips")
