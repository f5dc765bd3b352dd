"""Reading files that come from elsewhere (models, data, results folders) as untrusted input.

Every read goes through :func:`read_bounded`: only a regular file (a FIFO would block forever, ``/dev/zero`` never
ends), never more than a stated number of bytes (checked from the file's size before anything is read), and, inside
folders pyrobust writes, never through a symbolic link. The bytes are read once: whatever is hashed, checked and used
afterwards is this one copy, so a file swapped or rewritten during a run cannot change what the run used or what its
record says."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pyrobust.errors import DataError, OutputError, PyRobustError


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


# ------------------------------------------------------------------------------------------------ writing
@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it is flushed to disk and renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MAX_RUN_FILE_BYTES = 2 * 2**30  # results of 50 M images; anything larger in a run folder is not ours


def read_run_file(path: Path, *, what: str, max_bytes: int = MAX_RUN_FILE_BYTES) -> bytes:
    """The bytes of a file inside a run folder, read as untrusted input: never through a symbolic link, only from a
    regular file (a FIFO or a device would hang or never end), and only up to ``max_bytes``."""
    return read_bounded(path, what=what, max_bytes=max_bytes, follow_symlinks=False,
                        hint=" (more than a run writes)")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def make_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check it can be written."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: exists and is not a folder; choose another --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"{p}: cannot write there ({exc.strerror}); choose a writable --out") from None
    return p


def check_output_file(path: Path, what: str, *, create_parent: bool = True) -> None:
    """Before any work: ``path`` can be written as a file (its folder exists, or is created, and takes a file; the
    path itself is not a folder)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {p}: is a folder; give a file name")
    parent = p.parent
    try:
        if create_parent:
            parent.mkdir(parents=True, exist_ok=True)
        elif not parent.is_dir():
            raise OutputError(f"{what} {p}: its folder {parent} does not exist")
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"{what} {p}: cannot write there ({exc.strerror})") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file: the same path, a symbolic link to it, or a hard link (same inode)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def refuse_inputs_as_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]]) -> None:
    """Before any work: no file a command will write (``outputs``: what names it, and the path) may be one of its
    inputs, by path, symbolic link or hard link; an atomic rename over it would replace the input."""
    for what, out in outputs:
        for in_what, inp in inputs:
            if same_file(out, inp):
                also = "" if Path(out) == Path(inp) else f" ({out} is the same file)"
                raise OutputError(f"{what} {out} would overwrite {in_what} {inp}{also}; an input is never an "
                                  f"output: choose another {what}")
