"""Datasets: IDX files (gzip or raw), ``.npz`` archives, MNIST-style folders, and the named datasets.

A :class:`Dataset` keeps each image's *original* index in its source: that index keys the random noise, so a
subset (``limit``, an index range) gives every image exactly the noise it gets in a full run.
"""

from __future__ import annotations

import gzip
import hashlib
import mmap
import os
import zlib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from pyrobust.errors import DataError, InvalidInput
from pyrobust.store.files import open_regular

NAMED = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
SAMPLE_NAME = "mnist-sample"
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# A header claiming more than this is refused before anything is allocated (a 1e12-byte claim is an attack or rot).
_MAX_IDX_BYTES = 2**34


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
        if limit < 1:
            raise InvalidInput(f"limit must be >= 1; got {limit}")
        if limit > hi - lo:
            raise InvalidInput(f"limit {limit} is beyond the dataset: {what} has {hi - lo} images in range")
        hi = lo + limit
    if sample is None:
        return np.arange(lo, hi, dtype=np.int64)
    if sample < 1 or sample > hi - lo:
        raise InvalidInput(f"sample must be in [1, {hi - lo}] for {what} ({hi - lo} images selected); got {sample}")
    pos = np.sort(np.random.default_rng([sample_seed, 0x5A4D]).choice(hi - lo, size=sample, replace=False))
    return (lo + pos).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------- IDX
def _open_bytes(path: Path):
    """One open of a regular file (a FIFO or a device is refused, never read); gzip is decompressed on the fly."""
    fh = os.fdopen(open_regular(path, what="data file"), "rb")
    head = fh.read(2)
    fh.seek(0)
    return gzip.GzipFile(fileobj=fh, mode="rb") if head == _GZIP_MAGIC else fh


def _idx_header(stream, source: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Read and check an IDX header; return (dimensions, dtype, data bytes)."""
    header = stream.read(4)
    if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES or header[3] == 0:
        raise DataError(f"{source}: not an IDX file (bad magic number {header.hex() or 'empty'}); "
                        "expected 0x0000 + type code + number of dimensions, as in the MNIST files")
    ndim = header[3]
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{source}: truncated IDX header ({len(raw_dims) // 4} of {ndim} dimensions)")
    dims = tuple(int(v) for v in np.frombuffer(raw_dims, dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[header[2]])
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    if expected > _MAX_IDX_BYTES:
        raise DataError(f"{source}: IDX header claims {expected} bytes of data for dimensions {dims}; refusing")
    return dims, dtype, expected


def _too_big(source: str, needed: int, max_bytes: int) -> DataError:
    return DataError(f"{source}: holds {needed / 2**20:.0f} MiB of images, more than the {max_bytes / 2**20:.0f} MiB "
                     "of memory allowed (--max-memory); evaluate "
                     "a --range, or allow more memory")


def parse_idx(stream, source: str = "<bytes>", *, max_bytes: int | None = None) -> np.ndarray:
    """Parse an IDX stream (already decompressed) into memory. Validates magic, dimensions and exact length;
    refuses data larger than ``max_bytes`` before reading it."""
    try:
        dims, dtype, expected = _idx_header(stream, source)
        if max_bytes is not None and expected > max_bytes:
            raise _too_big(source, expected, max_bytes)
        body = stream.read(expected)
        if len(body) < expected:
            raise DataError(f"{source}: truncated IDX data: dimensions {dims} need {expected} bytes, found {len(body)}")
        if stream.read(1):
            raise DataError(f"{source}: IDX data is longer than its dimensions {dims} say ({expected} bytes)")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{source}: corrupt or truncated compressed data ({exc})") from None
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    # Bytes need no byte-order conversion: no copy (a 60k-image file would briefly take twice its 47 MiB).
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike, *, max_bytes: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) into memory, at most ``max_bytes`` of data (checked from the header before
    the data is read). Read, not memory-mapped: a file rewritten or truncated while a run works can then neither
    change the images the run uses nor kill it, and the recorded SHA-256 is that of what was used."""
    p = Path(path)
    fh = _open_bytes(p)
    with fh:
        inner = getattr(fh, "fileobj", None)
        try:
            return parse_idx(fh, str(p), max_bytes=max_bytes)
        finally:
            if inner is not None:
                inner.close()


def _images_from_array(x: np.ndarray, source: str) -> np.ndarray:
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


def _labels_from_array(y: np.ndarray, source: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D array; got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be integers; got {y.dtype}")
    return y.astype(np.int64)


def load_idx_pair(images_path, labels_path, *, name: str, split: str | None, max_bytes: int | None = None) -> Dataset:
    x = read_idx(images_path, max_bytes=max_bytes)
    y = read_idx(labels_path, max_bytes=max_bytes)
    src = str(images_path)
    if x.shape[0] != (y.shape[0] if y.ndim else -1):
        raise DataError(f"{images_path} has {x.shape[0]} images but {labels_path} has "
                        f"{y.shape[0] if y.ndim else 0} labels; the two files must match")
    return Dataset(name, split, _images_from_array(x, src), _labels_from_array(y, str(labels_path)),
                   np.arange(x.shape[0], dtype=np.int64), src)


# ---------------------------------------------------------------------------------------------------------- npz
def load_npz(path: str | os.PathLike, *, name: str | None = None, max_bytes: int | None = None) -> Dataset:
    """Load ``x`` (images) and ``y`` (labels), and ``index`` (original indices) when present. Pickles are refused."""
    p = Path(path)
    try:
        # Our own handle: np.load leaks the one it opens when the archive is corrupt.
        with os.fdopen(open_regular(p, what="data file"), "rb") as fh, np.load(fh, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DataError(f"{p}: holds a single array, not an .npz archive with arrays 'x' and 'y'")
            keys = set(z.files)
            missing = {"x", "y"} - keys
            if missing:
                raise DataError(f"{p}: .npz needs arrays 'x' (images) and 'y' (labels); missing {sorted(missing)}")
            # every member read counts, and a budget applies even when none was given: a few KB of zip can
            # declare gigabytes of zeros (index.npy too), which would be inflated into memory before any check
            if max_bytes is None:
                from pyrobust.store.files import memory_budget

                max_bytes = memory_budget(None)
            size = sum(z.zip.getinfo(f"{k}.npy").file_size for k in ("x", "y", "index") if k in keys)
            if max_bytes is not None and size > max_bytes:
                raise _too_big(str(p), size, max_bytes)
            x, y = z["x"], z["y"]
            idx = z["index"] if "index" in keys else None
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{p}: .npz holds pickled objects, which pyrobust never loads; save plain arrays") from None
        raise DataError(f"{p}: not a valid .npz file ({exc})") from None
    except DataError:
        raise
    except Exception as exc:  # zipfile and numpy raise a zoo (BadZipFile, RuntimeError, struct.error, ...)
        raise DataError(f"{p}: not a valid .npz file ({type(exc).__name__}: {exc})") from None
    src = str(p)
    images = _images_from_array(x, src)
    labels = _labels_from_array(y, src)
    if idx is None:
        index = np.arange(images.shape[0], dtype=np.int64)
    else:
        if idx.dtype.kind not in "iu" or idx.shape != (images.shape[0],):
            raise DataError(f"{p}: 'index' must hold one integer original index per image")
        index = idx.astype(np.int64)
        if index.min() < 0 or np.unique(index).size != index.size:
            raise DataError(f"{p}: 'index' must hold distinct non-negative original indices")
    return Dataset(name or p.stem, None, images, labels, index, src)


# ------------------------------------------------------------------------------------------------------- folders
def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if os.path.lexists(candidate) and not candidate.is_dir():  # reading it says what is wrong with it
            return candidate
    return None


def _folder_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _SPLIT_PREFIX[split]
    images = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def load_folder(folder: str | os.PathLike, split: str, *, name: str | None = None,
                max_bytes: int | None = None) -> Dataset:
    """A folder holding the standard MNIST file names (``train-*`` / ``t10k-*``, gzip or raw)."""
    f = Path(folder)
    files = _folder_files(f, split)
    if files is None:
        prefix = _SPLIT_PREFIX[split]
        raise DataError(f"{f}: no {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] "
                        f"for split '{split}'")
    return load_idx_pair(*files, name=name or f.name, split=split, max_bytes=max_bytes)


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


def find_named(name: str, split: str, data_dir=None) -> tuple[Path, Path]:
    looked: list[str] = []
    for root in search_roots(data_dir):
        for folder in (root / name, root) if root.name == name else (root / name,):
            files = _folder_files(folder, split)
            if files:
                return files
            looked.append(str(folder))
    prefix = _SPLIT_PREFIX[split]
    raise DataError(
        f"dataset {name}:{split} not found; looked in {', '.join(looked)}. Put {prefix}-images-idx3-ubyte.gz and "
        f"{prefix}-labels-idx1-ubyte.gz in DIR/{name}/ and pass --data-dir DIR (or set PYROBUST_DATA=DIR)"
    )


def bundled_sample() -> Dataset:
    """The small MNIST test-set sample shipped with the package (CC BY-SA 3.0, LeCun, Cortes and Burges)."""
    ref = resources.files("pyrobust") / "assets" / f"{SAMPLE_NAME}.npz"
    with resources.as_file(ref) as path:
        ds = load_npz(path, name=SAMPLE_NAME)
    return Dataset(SAMPLE_NAME, "test", ds.images, ds.labels, ds.index, "pyrobust/assets/mnist-sample.npz")


def _split_spec(spec: str) -> tuple[str, str | None]:
    head, sep, tail = spec.rpartition(":")
    if sep and tail in SPLITS:
        return head, tail
    if sep and (head in NAMED or head == "cifar10"):
        raise InvalidInput(f"split must be one of {', '.join(SPLITS)}; got {tail!r} in {spec!r}")
    return spec, None


def load_dataset(spec: str, *, data_dir=None, start: int | None = None, stop: int | None = None,
                 limit: int | None = None, sample: int | None = None, sample_seed: int = 0,
                 max_bytes: int | None = None, resize: tuple[int, int] | None = None) -> Dataset:
    """Load a dataset by spec.

    ``spec`` is ``mnist:test`` / ``fashion-mnist:train`` (a named dataset, split ``test`` when omitted),
    ``sample`` (the bundled MNIST sample), a ``.npz`` file, or a folder of MNIST-named files with ``:train`` or
    ``:test``, ``cifar10:train|test`` (CIFAR-10's binary batches), or ``folder:PATH`` (a folder of image files
    per class; ``resize`` (height, width) brings them to one size; see :mod:`pyrobust.images`). ``start``/
    ``stop``/``limit`` select a part; images keep their original indices. Compressed data larger than
    ``max_bytes`` is refused before it is decompressed (raw IDX files too: they are read, not mapped).
    """
    if not spec:
        raise InvalidInput("dataset must be NAME:SPLIT (mnist or fashion-mnist, train or test), 'sample', "
                           "a .npz file or a folder of IDX files; got an empty string")
    if spec.startswith("folder:"):
        from pyrobust.images import load_image_folder

        return load_image_folder(spec[len("folder:"):], resize=resize, start=start, stop=stop, limit=limit,
                                 sample=sample, sample_seed=sample_seed, max_bytes=max_bytes)
    if resize is not None:
        raise InvalidInput("resize applies to image folders (folder:PATH); the other datasets have one image size")
    target, split = _split_spec(spec)
    if target == "cifar10":
        from pyrobust.images import load_cifar10

        ds = load_cifar10(split or "test", data_dir=data_dir, max_bytes=max_bytes)
    elif target in ("sample", SAMPLE_NAME):
        ds = bundled_sample()
    elif target in NAMED:
        if data_dir is not None and not Path(data_dir).is_dir():
            raise DataError(f"data_dir {data_dir}: no such folder; point it at the folder that holds {target}/ "
                            "(or fetch the data: pyrobust data fetch)")
        ds = load_idx_pair(*find_named(target, split or "test", data_dir), name=target, split=split or "test",
                           max_bytes=max_bytes)
    else:
        p = Path(target)
        if p.is_dir():
            ds = load_folder(p, split or "test", max_bytes=max_bytes)
        elif p.suffix == ".npz" or p.is_file():
            if split is not None:
                raise InvalidInput(f"a .npz file has no splits; drop ':{split}' from {spec!r}")
            ds = load_npz(p, max_bytes=max_bytes)
        else:
            raise DataError(f"dataset {spec!r} not found: give mnist:SPLIT, fashion-mnist:SPLIT, cifar10:SPLIT, "
                            "sample, a .npz file with arrays x and y, a folder of MNIST-named IDX files, or "
                            "folder:PATH (one sub-folder of images per class)")
    return ds.select(start=start, stop=stop, limit=limit, sample=sample, sample_seed=sample_seed)


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


def load_recorded(recorded: dict, *, data_dir=None) -> Dataset:
    """The exact images a run evaluated (``summary["dataset"]``), checked against its recorded SHA-256."""
    recorded_dir = recorded.get("data_dir")
    if data_dir is None and recorded_dir is not None and Path(recorded_dir).is_dir():
        data_dir = recorded_dir  # where the run found it; elsewhere, the usual search (the SHA-256 decides)
    from pyrobust.store.files import memory_budget

    resize = recorded.get("resize")
    ds = load_dataset(recorded["spec"], data_dir=data_dir, max_bytes=memory_budget(None),
                      start=recorded.get("start"), stop=recorded.get("stop"), limit=recorded.get("limit"),
                      sample=recorded.get("sample"), sample_seed=recorded.get("sample_seed", 0),
                      resize=tuple(resize) if resize else None)
    if ds.sha256 != recorded["sha256"]:
        raise DataError(f"dataset {recorded['spec']} now has SHA-256 {ds.sha256[:12]}…, but the run evaluated "
                        f"{recorded['sha256'][:12]}…; point --data-dir at the files the run used")
    return ds


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
