"""Reading files that come from elsewhere (models, data, results folders) as untrusted input.

Every read goes through :func:`read_bounded`: only a regular file (a FIFO would block forever, ``/dev/zero`` never
ends), never more than a stated number of bytes (checked from the file's size before anything is read), and, inside
folders pyrobust writes, never through a symbolic link. The bytes are read once: whatever is hashed, checked and used
afterwards is this one copy, so a file swapped or rewritten during a run cannot change what the run used or what its
record says.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat

from pyrobust.errors import DataError, PyRobustError


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_regular(path: str | os.PathLike, *, what: str, follow_symlinks: bool = True,
                 error: type[PyRobustError] = DataError) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (else ``error``)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected the {what} file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise error(f"{path}: the {what} is a symbolic link; pyrobust never follows links inside a folder it "
                        "writes") from None
        raise error(f"{path}: cannot read the {what} ({exc.strerror})") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise error(f"{path}: is a folder, expected the {what} file")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path}: the {what} is not a regular file (a pipe, socket or device); give a file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def read_bounded(path: str | os.PathLike, *, what: str, max_bytes: int, follow_symlinks: bool = True,
                 error: type[PyRobustError] = DataError, hint: str = "") -> bytes:
    """All bytes of the regular file ``path``, refused before reading when it holds more than ``max_bytes``."""
    fd = open_regular(path, what=what, follow_symlinks=follow_symlinks, error=error)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise error(f"{path}: the {what} is {size / 2**20:,.0f} MiB, more than the {max_bytes / 2**20:,.0f} MiB "
                        f"allowed{hint}")
        chunks, got = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > max_bytes:
                raise error(f"{path}: the {what} grew past {max_bytes / 2**20:,.0f} MiB while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)
