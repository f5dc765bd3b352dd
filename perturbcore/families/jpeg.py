"""JPEG compression by severity (CIFAR-10-C's ``jpeg_compression``: quality 80, 65, 58, 50, 40), by Pillow's encoder
and decoder (``pip install pyrobust[images]``). Values go through 8 bits, as a JPEG file's do; the result is exact
for one Pillow build (its libjpeg), and may differ in the last bit between builds. Pillow runs in Python, one image
at a time: the one family without a numba kernel."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from perturbcore.families._sweep import Sweep


@dataclass(frozen=True)
class Jpeg(Sweep):
    """JPEG at five qualities."""

    name = "jpeg"
    summary = "JPEG compression at quality 80 → 40 (Pillow)"
    pixelwise = False
    row = None
    ladder = ((80.0,), (65.0,), (58.0,), (50.0,), (40.0,))
    level_names = ("quality",)

    def kernel_params(self, top: float, shape: tuple[int, int, int]) -> np.ndarray:
        return np.array([q for (q,) in self.levels(shape)])

    def check_image(self, height: int, width: int, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"jpeg encodes grey or RGB images; these have {channels} channels")
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise ValueError("jpeg needs Pillow: pip install 'pyrobust[images]'") from None

    def apply(self, image: np.ndarray, step: int, top: float) -> np.ndarray:
        """Image (h, w, c) in [0, top] → the same after a JPEG round trip at level ``step``."""
        from PIL import Image

        quality = int(self.levels(image.shape)[min(max(step, 1), len(self.ladder)) - 1][0])
        pixels = np.rint(np.clip(image / top, 0.0, 1.0) * 255.0).astype(np.uint8)
        pic = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        buf = io.BytesIO()
        pic.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as back:
            decoded = np.asarray(back.convert(pic.mode), dtype=np.float64)
        return (decoded.reshape(image.shape) / 255.0) * top
