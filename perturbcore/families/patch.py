"""Random patch occlusion: a ``size`` × ``size`` square, placed uniformly wholly inside the image, is filled with
``value`` (``fill=constant``) or with values uniform over the pixel range (``fill=random``).

Draws: the top row is ``draw(0) % (h - size + 1)``, the left column ``draw(1) % (w - size + 1)``; a random fill
value of patch pixel ``q = dy * size + dx``, channel ``ch`` is uniform ``e = q * c + ch`` at base 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perturbcore._jit import kernel
from perturbcore.families._base import Family, _offset, _store, _unit, param
from perturbcore.rng import _draw


@kernel
def _row(key, step, src, out, params, h, w, c, channels_first, mean, std, top, integer):
    size = np.int64(params[0])
    random_fill = params[1] != 0.0
    value = params[2]
    n = h * w
    y0 = np.int64(_draw(key, 0) % np.uint64(h - size + 1))
    x0 = np.int64(_draw(key, 1) % np.uint64(w - size + 1))
    for dy in range(size):
        for dx in range(size):
            p = (y0 + dy) * w + (x0 + dx)
            for ch in range(c):
                v = value
                if random_fill:
                    u = _unit(key, (dy * size + dx) * c + ch, 2)
                    v = np.floor(u * (top + 1.0)) if integer else u * top
                _store(out, _offset(p, ch, n, c, channels_first), v, ch, mean, std, top, integer)


@dataclass(frozen=True)
class Patch(Family):
    """A square occlusion of side ``size`` pixels at a uniform position."""

    name = "patch"
    summary = "a size×size square at a random position, filled with value or with random values"
    pixelwise = False
    writes_all = False
    row = _row
    # the profile's five severities (2 to 10 pixels at 32×32)
    severity = ("size", (2, 4, 6, 8, 10), True)

    size: int = param(4, lo=1, hi=4096, whole=True, unit="pixels", doc="side of the square")
    fill: str = param("constant", choices=("constant", "random"), doc="constant: value; random: uniform values")
    value: float = param(0.0, lo=0, hi=1, unit="of the pixel range", doc="the constant fill")

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([float(self.size), 1.0 if self.fill == "random" else 0.0, self.value * top])

    def check_image(self, height: int, width: int, channels: int) -> None:
        if self.size > min(height, width):
            raise ValueError(f"patch: size must be an integer in [1, {min(height, width)}] for {height}x{width} "
                             f"images; got {self.size}")
