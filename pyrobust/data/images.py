"""Image data users have: a folder of image files per class (``folder:PATH``) and CIFAR-10's binary batches.

``folder:PATH`` follows torchvision's ImageFolder convention: ``PATH/<class name>/<image>`` with classes sorted by
name (label k is the k-th folder) and files sorted by name within a class; an image's original index is its
position in that listing, so a subset (``--limit``, ``--range``, ``--sample``) keeps each image's noise. Images are
decoded with Pillow (``pyrobust[images]``) one at a time into one preallocated array whose size is checked against
the memory budget first, and only the selected images are decoded. Each file's bytes are read once: the bytes
hashed are the bytes decoded. All grayscale images give one channel; otherwise every image is converted to RGB.

CIFAR-10 (``cifar10:train`` / ``cifar10:test``) is read from the dataset's own binary format
(``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin``: a label byte, then 1024 red, 1024 green and 1024
blue bytes per 32×32 image), never from its Python pickles.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import Dataset, search_roots, select_positions
from pyrobust.errors import DataError, MissingDependency
from pyrobust.files import read_bounded

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_IMAGE_FILE_BYTES = 256 * 2**20
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FILES = {"train": tuple(f"data_batch_{k}.bin" for k in range(1, 6)), "test": ("test_batch.bin",)}
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependency("image folders need Pillow: pip install 'pyrobust[images]'") from None
    return Image


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label), ...]) in the ImageFolder order. A class folder or image that is a symbolic
    link may point only inside ``root``: one leading out of the dataset is refused, not followed."""
    if not root.is_dir():
        raise DataError(f"folder:{root}: no such folder; give folder:PATH with one sub-folder of images per class")
    base = root.resolve()
    classes = []
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        if d.name.startswith(".") or not d.is_dir():
            continue
        if d.is_symlink() and not _inside(d, base):
            raise DataError(f"folder:{root}: class folder {d.name!r} is a symbolic link to {d.resolve()}, outside the "
                            "dataset; pyrobust reads only files inside the dataset folder: copy the images in")
        classes.append(d.name)
    if not classes:
        raise DataError(f"folder:{root}: has no class sub-folders; the layout is PATH/<class name>/<image files>")
    files = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir(), key=lambda p: p.name):
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file():
                if not _inside(f, base):
                    raise DataError(f"folder:{root}: {name}/{f.name} is a symbolic link to {f.resolve()}, outside "
                                    "the dataset; pyrobust reads only files inside the dataset folder: copy it in")
                files.append((f, label))
    if not files:
        raise DataError(f"folder:{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return classes, files


_DEEP_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel: scaled, never clipped


def _to_uint8(img, f: Path, gray: bool, size: tuple[int, int]) -> np.ndarray:
    """An image's pixels as uint8 (H, W, C). 16-bit images (``I;16``, ``I``) are scaled from 0..65535, float
    images (``F``) from [0, 1]; either is refused when its values fall outside that range, rather than clipped or
    crushed to 0/1 as Pillow's 8-bit conversion would."""
    from PIL import Image

    if img.mode in _DEEP_GRAY:
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if img.mode == "F":
            if not (np.isfinite(arr).all() and lo >= 0 and hi <= 1):
                raise DataError(f"{f}: a float image with values in [{lo:g}, {hi:g}]; pyrobust reads float images in "
                                "[0, 1]: scale it (x / x.max()) or save it as 8 or 16 bits")
            scaled = arr * 255.0
        else:
            if lo < 0 or hi > 65535:
                raise DataError(f"{f}: a {img.mode} image with values in [{lo:g}, {hi:g}], outside 16 bits; save it "
                                "as 8 or 16 bits per pixel")
            scaled = arr * (255.0 / 65535.0)
        if not gray:
            scaled = np.repeat(scaled[..., None], 3, axis=2)
        if scaled.shape[1::-1] != size:
            planes = scaled.reshape(scaled.shape[0], scaled.shape[1], -1)
            scaled = np.stack([np.asarray(Image.fromarray(planes[..., k].astype(np.float32), mode="F")
                                          .resize(size, Image.Resampling.BILINEAR)) for k in range(planes.shape[2])],
                              axis=2)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    img = img.convert("L" if gray else "RGB")
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_image_folder(root: str | os.PathLike, *, resize: tuple[int, int] | None = None, start=None, stop=None,
                      limit=None, sample=None, sample_seed: int = 0, max_bytes: int | None = None) -> Dataset:
    """The images of ``root`` (see the module docstring), uint8 N×H×W×C; ``resize`` (height, width) resamples every
    image (bilinear), else all must share one size."""
    Image = _pillow()
    path = Path(root)
    classes, files = list_image_folder(path)
    pos = select_positions(len(files), start=start, stop=stop, limit=limit, sample=sample, sample_seed=sample_seed,
                           what=f"folder:{path}")
    chosen = [files[int(i)] for i in pos]
    headers = []
    for f, _ in chosen:  # headers only: sizes and modes, before any pixel is decoded
        try:
            with Image.open(f) as img:
                headers.append((img.size, img.mode))
        except Exception as exc:
            raise DataError(f"{f}: not an image Pillow can read ({type(exc).__name__}); remove it from {path}") \
                from None
    sizes = {size for size, _ in headers}
    if resize is None and len(sizes) > 1:
        raise DataError(f"folder:{path}: the images have {len(sizes)} different sizes (e.g. "
                        f"{', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:3])}, width x height); pass --resize "
                        "HxW to bring them to one")
    h, w = resize if resize is not None else next(iter(sizes))[::-1]
    gray = all(mode in ("L", "1", *_DEEP_GRAY) for _, mode in headers)
    c = 1 if gray else 3
    need = len(chosen) * h * w * c
    if max_bytes is not None and need > max_bytes:
        raise DataError(f"folder:{path}: {len(chosen)} images of {h}x{w}x{c} need {need / 2**20:,.0f} MiB, more than "
                        f"the {max_bytes / 2**20:,.0f} MiB allowed (--max-memory); use --limit, --sample, a smaller "
                        "--resize or a larger --max-memory")
    images = np.empty((len(chosen), h, w, c), np.uint8)
    digest = hashlib.sha256()
    for i, (f, _) in enumerate(chosen):
        data = read_bounded(f, what="image file", max_bytes=MAX_IMAGE_FILE_BYTES)
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
        try:
            with Image.open(io.BytesIO(data)) as img:
                arr = _to_uint8(img, f, gray, (w, h))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{f}: cannot be decoded ({type(exc).__name__}: {exc}); remove or fix it") from None
        images[i] = arr.reshape(h, w, c)
    labels = np.array([label for _, label in chosen], np.int64)
    return Dataset(f"folder:{path}", None, images, labels, pos, f"{path} (files SHA-256 {digest.hexdigest()})",
                   tuple(classes))


def find_cifar10(split: str, data_dir=None) -> list[Path]:
    looked = []
    for root in search_roots(data_dir):
        for folder in (root / "cifar10", root / "cifar10" / "cifar-10-batches-bin", root / "cifar-10-batches-bin"):
            paths = [folder / name for name in CIFAR10_FILES[split]]
            if all(p.is_file() for p in paths):
                return paths
            looked.append(str(folder))
    raise DataError(f"dataset cifar10:{split} not found; looked in {', '.join(looked)}. Get it with: pyrobust data "
                    f"fetch cifar10 (or put {', '.join(CIFAR10_FILES[split])} in DIR/cifar10/ and pass --data-dir DIR)")


def load_cifar10(split: str, *, data_dir=None, max_bytes: int | None = None) -> Dataset:
    paths = find_cifar10(split, data_dir)
    total = sum(p.stat().st_size for p in paths)
    n = total // _CIFAR_RECORD
    if max_bytes is not None and n * (_CIFAR_RECORD - 1) > max_bytes:
        raise DataError(f"cifar10:{split}: {n} images need {n * 3072 / 2**20:,.0f} MiB, more than the "
                        f"{max_bytes / 2**20:,.0f} MiB allowed (--max-memory)")
    parts, labels = [], []
    for p in paths:
        raw = np.frombuffer(read_bounded(p, what="CIFAR-10 batch", max_bytes=64 * 2**20), np.uint8)
        if raw.size == 0 or raw.size % _CIFAR_RECORD:
            raise DataError(f"{p}: {raw.size} bytes is not a whole number of CIFAR-10 records ({_CIFAR_RECORD} "
                            "bytes each); the file is damaged (pyrobust data fetch cifar10 gets it again)")
        records = raw.reshape(-1, _CIFAR_RECORD)
        if records[:, 0].max() > 9:
            raise DataError(f"{p}: labels above 9; not a CIFAR-10 batch")
        labels.append(records[:, 0].astype(np.int64))
        parts.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    images = np.ascontiguousarray(np.concatenate(parts))
    y = np.concatenate(labels)
    return Dataset("cifar10", split, images, y, np.arange(y.size, dtype=np.int64), str(paths[0].parent),
                   CIFAR10_CLASSES)
