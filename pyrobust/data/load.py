"""The dispatcher: a spec (``mnist:test``, ``fashion-mnist``, ``cifar10:test``, ``sample``, ``npz:PATH``,
``idx:IMAGES,LABELS``, ``folder:PATH``, a folder of IDX files) becomes a :class:`~pyrobust.data.dataset.Dataset`,
within a memory budget; ``.npz`` archives are read and written here; a run's recorded dataset is loaded again and
checked against its SHA-256."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import DataSelection, Dataset, images_from_array, labels_from_array, search_roots
from pyrobust.data.idx import load_idx_pair, too_big
from pyrobust.errors import DataError, InvalidInput
from pyrobust.files import open_regular, write_bytes_atomic

NAMED = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
SAMPLE_NAME = "mnist-sample"


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
                from pyrobust.machine import memory_budget

                max_bytes = memory_budget(None)
            size = sum(z.zip.getinfo(f"{k}.npy").file_size for k in ("x", "y", "index") if k in keys)
            if max_bytes is not None and size > max_bytes:
                raise too_big(str(p), size, max_bytes)
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
    images = images_from_array(x, src)
    labels = labels_from_array(y, src)
    if idx is None:
        index = np.arange(images.shape[0], dtype=np.int64)
    else:
        if idx.dtype.kind not in "iu" or idx.shape != (images.shape[0],):
            raise DataError(f"{p}: 'index' must hold one integer original index per image")
        index = idx.astype(np.int64)
        if index.min() < 0 or np.unique(index).size != index.size:
            raise DataError(f"{p}: 'index' must hold distinct non-negative original indices")
    return Dataset(name or p.stem, None, images, labels, index, src)


def save_npz(path: str | os.PathLike, dataset: Dataset) -> Path:
    """Write ``dataset`` as an ``.npz`` archive :func:`load_npz` reads back: ``x`` (images as stored), ``y``
    (labels) and ``index`` (original indices, so the noise of every image stays the same). Written atomically; an
    existing file is replaced."""
    if not isinstance(dataset, Dataset):
        raise InvalidInput(f"save_npz needs a Dataset; got {type(dataset).__name__}")
    buf = io.BytesIO()
    np.savez_compressed(buf, x=dataset.images, y=dataset.labels, index=dataset.index)
    out = Path(path)
    write_bytes_atomic(out, buf.getvalue())
    return out


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
    per class; ``resize`` (height, width) brings them to one size; see :mod:`pyrobust.data.images`). ``start``/
    ``stop``/``limit`` select a part; images keep their original indices. Compressed data larger than
    ``max_bytes`` is refused before it is decompressed (raw IDX files too: they are read, not mapped).
    """
    if not spec:
        raise InvalidInput("dataset must be NAME:SPLIT (mnist or fashion-mnist, train or test), 'sample', "
                           "a .npz file or a folder of IDX files; got an empty string")
    if spec.startswith("folder:"):
        from pyrobust.data.images import load_image_folder

        return load_image_folder(spec[len("folder:"):], resize=resize, start=start, stop=stop, limit=limit,
                                 sample=sample, sample_seed=sample_seed, max_bytes=max_bytes)
    if resize is not None:
        raise InvalidInput("resize applies to image folders (folder:PATH); the other datasets have one image size")
    target, split = _split_spec(spec)
    if target == "cifar10":
        from pyrobust.data.images import load_cifar10

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


def load_selected(spec: str, selection: DataSelection, *, max_bytes: int | None = None) -> Dataset:
    """The images of dataset ``spec`` that ``selection`` takes, found where it says."""
    return load_dataset(spec, data_dir=selection.data_dir, start=selection.start, stop=selection.stop,
                        limit=selection.limit, sample=selection.sample, sample_seed=selection.sample_seed,
                        max_bytes=max_bytes, resize=selection.resize if selection.resize else None)


def load_recorded(recorded: dict, *, data_dir=None) -> Dataset:
    """The exact images a run evaluated (``summary["dataset"]``), checked against its recorded SHA-256."""
    recorded_dir = recorded.get("data_dir")
    if data_dir is None and recorded_dir is not None and Path(recorded_dir).is_dir():
        data_dir = recorded_dir  # where the run found it; elsewhere, the usual search (the SHA-256 decides)
    from pyrobust.machine import memory_budget

    selection = replace(DataSelection.from_record(recorded), data_dir=data_dir)
    ds = load_selected(recorded["spec"], selection, max_bytes=memory_budget(None))
    if ds.sha256 != recorded["sha256"]:
        raise DataError(f"dataset {recorded['spec']} now has SHA-256 {ds.sha256[:12]}…, but the run evaluated "
                        f"{recorded['sha256'][:12]}…; point --data-dir at the files the run used")
    return ds
