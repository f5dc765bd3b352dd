"""IDX files (MNIST's format), raw or gzip: the header is checked and the size it claims bounded before anything
is allocated, and an image file and its label file are read into a :class:`~pyrobust.data.dataset.Dataset`."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import Dataset, images_from_array, labels_from_array
from pyrobust.errors import DataError
from pyrobust.files import open_regular

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# A header claiming more than this is refused before anything is allocated (a 1e12-byte claim is an attack or rot).
_MAX_IDX_BYTES = 2**34


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


def too_big(source: str, needed: int, max_bytes: int) -> DataError:
    return DataError(f"{source}: holds {needed / 2**20:.0f} MiB of images, more than the {max_bytes / 2**20:.0f} MiB "
                     "of memory allowed (--max-memory); evaluate "
                     "a --range, or allow more memory")


def parse_idx(stream, source: str = "<bytes>", *, max_bytes: int | None = None) -> np.ndarray:
    """Parse an IDX stream (already decompressed) into memory. Validates magic, dimensions and exact length;
    refuses data larger than ``max_bytes`` before reading it."""
    try:
        dims, dtype, expected = _idx_header(stream, source)
        if max_bytes is not None and expected > max_bytes:
            raise too_big(source, expected, max_bytes)
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


def load_idx_pair(images_path, labels_path, *, name: str, split: str | None, max_bytes: int | None = None) -> Dataset:
    x = read_idx(images_path, max_bytes=max_bytes)
    y = read_idx(labels_path, max_bytes=max_bytes)
    src = str(images_path)
    if x.shape[0] != (y.shape[0] if y.ndim else -1):
        raise DataError(f"{images_path} has {x.shape[0]} images but {labels_path} has "
                        f"{y.shape[0] if y.ndim else 0} labels; the two files must match")
    return Dataset(name, split, images_from_array(x, src), labels_from_array(y, str(labels_path)),
                   np.arange(x.shape[0], dtype=np.int64), src)
