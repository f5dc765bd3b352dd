"""The :class:`Dataset` type and what every reader shares: checks of image and label arrays, the selection of a
part of a dataset (range, limit, seeded sample), class names, and where datasets are looked for.

A :class:`Dataset` keeps each image's *original* index in its source: that index keys the random noise, so a
subset (``limit``, an index range) gives every image exactly the noise it gets in a full run."""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pyrobust.errors import DataError, InvalidInput
from pyrobust.validate import Integer, check, check_fields, declare


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images ``(n, H, W, C)`` (uint8 0..255 or float32 in [0, 1]), integer labels and original indices."""

    name: str
    split: str | None
    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    source: str
    classes: tuple[str, ...] | None = None  # class names by label, where the data names them (image folders)

    def __post_init__(self) -> None:
        x, y, idx = self.images, self.labels, self.index
        if x.ndim != 4:
            raise DataError(f"{self.source}: images must have shape (n, H, W, C); got {x.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{self.source}: the dataset is empty (no images)")
        if y.shape != (x.shape[0],) or idx.shape != (x.shape[0],):
            raise DataError(
                f"{self.source}: {x.shape[0]} images but {y.shape[0] if y.ndim == 1 else y.shape} labels; "
                "every image needs exactly one label"
            )
        if y.min() < 0:
            raise DataError(f"{self.source}: labels must be >= 0; found {int(y.min())}")
        if x.dtype == np.float32 and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise DataError(f"{self.source}: float images must be finite and in [0, 1]; scale them (x / 255) first")

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def n_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def spec(self) -> str:
        return self.name if self.split is None else f"{self.name}:{self.split}"

    def float_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images ``start:stop`` as float32 in [0, 1], shape ``(m, H, W, C)``."""
        x = self.images[start:stop]
        if x.dtype == np.uint8:
            return x.astype(np.float32) / np.float32(255.0)
        return np.asarray(x, dtype=np.float32)

    def float_images_at(self, positions: np.ndarray) -> np.ndarray:
        """Images at ``positions`` as float32 in [0, 1], shape ``(m, H, W, C)``."""
        x = self.images[positions]
        if x.dtype == np.uint8:
            return x.astype(np.float32) / np.float32(255.0)
        return np.asarray(x, dtype=np.float32)

    @property
    def memory_bytes(self) -> int:
        """Bytes of images held in memory (0 for a memory-mapped file, which the OS pages in and out)."""
        base = self.images
        while isinstance(base, np.ndarray) and not isinstance(base, np.memmap) and base.base is not None:
            base = base.base
        return 0 if isinstance(base, (np.memmap, mmap.mmap)) else int(self.images.nbytes)

    @cached_property
    def sha256(self) -> str:
        """Digest of exactly what is evaluated: image bytes and shape, labels, original indices."""
        h = hashlib.sha256()
        h.update(str((self.images.dtype.str, self.images.shape)).encode())
        for lo in range(0, self.n, 4096):  # in chunks: a memory-mapped dataset is never read whole into memory
            h.update(np.ascontiguousarray(self.images[lo: lo + 4096]).tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        h.update(self.index.astype("<i8").tobytes())
        return h.hexdigest()

    def take(self, positions: np.ndarray) -> Dataset:
        """The images at ``positions`` (an index array), with their labels and original indices."""
        return Dataset(self.name, self.split, self.images[positions], self.labels[positions], self.index[positions],
                       self.source, self.classes)

    def select(self, *, start: int | None = None, stop: int | None = None, limit: int | None = None,
               sample: int | None = None, sample_seed: int = 0) -> Dataset:
        """Positions ``start:stop``, then the first ``limit`` of them, then ``sample`` of those drawn at random
        (seeded by ``sample_seed``, kept in dataset order); original indices are kept."""
        pos = select_positions(self.n, start=start, stop=stop, limit=limit, sample=sample, sample_seed=sample_seed,
                               what=self.spec)
        if pos.size == self.n:
            return self
        if pos.size and pos[-1] - pos[0] + 1 == pos.size:  # a contiguous range: a view, no copy
            lo, hi = int(pos[0]), int(pos[-1]) + 1
            return Dataset(self.name, self.split, self.images[lo:hi], self.labels[lo:hi], self.index[lo:hi],
                           self.source, self.classes)
        return self.take(pos)


def parse_resize(text: str | None) -> tuple[int, int] | None:
    """``"224x224"`` -> (224, 224) (height, width)."""
    if text is None:
        return None
    h, sep, w = str(text).lower().partition("x")
    try:
        size = (int(h), int(w))
    except ValueError:
        size = (0, 0)
    if not sep or not all(1 <= v <= 8192 for v in size):
        raise InvalidInput(f"resize takes HEIGHTxWIDTH in pixels, each 1 to 8192 (e.g. 224x224); got {text!r}")
    return size


@dataclass(frozen=True)
class DataSelection:
    """Which images of a dataset a run takes, and where named datasets are found: the positions ``start:stop``,
    the first ``limit`` of them, a seeded random ``sample`` of those (``sample_seed``), and ``resize`` (height,
    width, or ``"224x224"``) for a ``folder:PATH`` dataset. Every command and :func:`pyrobust.evaluate` take one;
    a run records it (:meth:`record`) and a replay rebuilds it from the record (:meth:`from_record`)."""

    data_dir: str | os.PathLike | None = None
    start: int | None = None
    stop: int | None = None
    limit: int | None = None
    sample: int | None = None
    sample_seed: int = 0
    resize: tuple[int, int] | None = None  # also "224x224", read into (224, 224)

    def __post_init__(self) -> None:
        check_fields(self, SELECTION_CONSTRAINTS)
        if isinstance(self.resize, str) or self.resize is None:
            object.__setattr__(self, "resize", parse_resize(self.resize))
        else:
            object.__setattr__(self, "resize", parse_resize("x".join(str(v) for v in self.resize)))

    def record(self, spec: str, dataset: Dataset) -> dict:
        """The selection as a run's summary records it (``summary["dataset"]``, with the spec and the classes)."""
        return {"spec": spec, "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir is not None else None,
                "start": self.start, "stop": self.stop, "limit": self.limit, "sample": self.sample,
                "sample_seed": self.sample_seed, **({"resize": list(self.resize)} if self.resize else {}),
                **({"classes": list(dataset.classes)} if dataset.classes else {})}

    @classmethod
    def from_record(cls, recorded: dict, *, data_dir=None) -> DataSelection:
        """The selection a summary recorded; ``data_dir`` (where to look now) replaces the recorded folder."""
        resize = recorded.get("resize")
        return cls(data_dir=data_dir if data_dir is not None else recorded.get("data_dir"),
                   start=recorded.get("start"), stop=recorded.get("stop"), limit=recorded.get("limit"),
                   sample=recorded.get("sample"), sample_seed=recorded.get("sample_seed", 0),
                   resize=tuple(resize) if resize else None)


SELECTION_CONSTRAINTS = declare("DataSelection", {
    "start": Integer(0, none=True), "stop": Integer(0, none=True), "limit": Integer(1, none=True),
    "sample": Integer(1, none=True), "sample_seed": Integer(0),
}, DataSelection)


def select_positions(n: int, *, start: int | None = None, stop: int | None = None, limit: int | None = None,
                     sample: int | None = None, sample_seed: int = 0, what: str = "the dataset") -> np.ndarray:
    """The positions of ``n`` images that ``start``/``stop``/``limit``/``sample`` select (see
    :meth:`Dataset.select`), in order: loaders that decode images one by one decode only these."""
    for name, v in (("start", start), ("stop", stop)):
        if v is not None and not 0 <= v <= n:
            raise InvalidInput(f"{name} must be in [0, {n}] for {what} ({n} images); got {v}")
    lo = 0 if start is None else start
    hi = n if stop is None else stop
    if hi <= lo:
        raise InvalidInput(f"the index range {lo}:{hi} is empty; give start < stop")
    if limit is not None:
        check("limit", limit, Integer(1))
        if limit > hi - lo:
            raise InvalidInput(f"limit {limit} is beyond the dataset: {what} has {hi - lo} images in range")
        hi = lo + limit
    if sample is None:
        return np.arange(lo, hi, dtype=np.int64)
    if sample < 1 or sample > hi - lo:
        raise InvalidInput(f"sample must be in [1, {hi - lo}] for {what} ({hi - lo} images selected); got {sample}")
    pos = np.sort(np.random.default_rng([sample_seed, 0x5A4D]).choice(hi - lo, size=sample, replace=False))
    return (lo + pos).astype(np.int64)


def images_from_array(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{source}: images must have shape (n, H, W) or (n, H, W, C); got {x.shape}")
    if x.shape[1] < 1 or x.shape[2] < 1 or not 1 <= x.shape[3] <= 4:
        raise DataError(f"{source}: image shape {x.shape[1:]} is not H x W x C with 1 to 4 channels")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind == "f":
        return np.ascontiguousarray(x, dtype=np.float32)
    raise DataError(f"{source}: images must be uint8 (0..255) or float in [0, 1]; got {x.dtype}")


def labels_from_array(y: np.ndarray, source: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D array; got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be integers; got {y.dtype}")
    return y.astype(np.int64)


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where named datasets are looked for, in order."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    if os.environ.get("PYROBUST_DATA"):
        roots.append(Path(os.environ["PYROBUST_DATA"]))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    roots.append(cache / "pyrobust" / "data")
    roots.append(Path("/usr/share/datasets"))
    return roots


def from_arrays(x, y, *, name: str = "arrays") -> Dataset:
    """A dataset from in-memory arrays, the rule for notebooks:

    * ``x``: ``N×H×W`` (one channel) or ``N×H×W×C`` (channels last, C = 1, 3 or 4); ``uint8`` holds pixels in
      0–255, a float array holds pixels in [0, 1] (anything else is refused, never rescaled silently);
    * ``y``: N integer labels >= 0.

    Channels-first arrays (``N×C×H×W``, as torch keeps them) are refused with the transpose that fixes them."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"images must be an array N×H×W or N×H×W×C; got shape {x.shape}")
    if x.shape[3] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
        raise DataError(f"images of shape {x.shape} look channels-first (N×C×H×W); pass x.transpose(0, 2, 3, 1)")
    if x.dtype == np.uint8:
        images = np.ascontiguousarray(x)
    elif np.issubdtype(x.dtype, np.floating):
        images = np.ascontiguousarray(x, dtype=np.float32)
        if images.size and (not np.isfinite(images).all() or images.min() < 0 or images.max() > 1):
            raise DataError(f"float images must be in [0, 1] (found {float(np.nanmin(images)):.4g} to "
                            f"{float(np.nanmax(images)):.4g}); divide 0-255 pixels by 255, or pass uint8 arrays")
    else:
        raise DataError(f"images must be uint8 (0-255) or float (0-1); got {x.dtype}: convert with "
                        "x.astype(np.uint8) for 0-255 pixels or x / 255 as float")
    if y.ndim != 1 or y.shape[0] != images.shape[0]:
        raise DataError(f"labels must be a 1-D array with one label per image ({images.shape[0]}); got shape "
                        f"{y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise DataError(f"labels must be integers; got {y.dtype} values such as {y.flat[0]!r}")
    labels = y.astype(np.int64)
    return Dataset(name, None, images, labels, np.arange(images.shape[0], dtype=np.int64), name)


def parse_range(text: str) -> tuple[int | None, int | None]:
    """``"100:200"`` -> (100, 200); either side may be empty."""
    lo, sep, hi = text.partition(":")
    if not sep:
        raise InvalidInput(f"an index range is START:STOP (e.g. 100:200); got {text!r}")
    try:
        return (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
    except ValueError:
        raise InvalidInput(f"an index range is START:STOP with integers (e.g. 100:200); got {text!r}") from None


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def class_names(dataset_name: str, n_classes: int, named: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Names of classes 0..n_classes-1: the dataset's own (``named``: an image folder's sub-folders, CIFAR-10's),
    Fashion-MNIST's, or the numbers."""
    if named:
        return [str(named[k]) if k < len(named) else str(k) for k in range(n_classes)]
    if dataset_name.startswith("fashion-mnist") and n_classes <= len(FASHION_CLASSES):
        return list(FASHION_CLASSES[:n_classes])
    return [str(k) for k in range(n_classes)]
