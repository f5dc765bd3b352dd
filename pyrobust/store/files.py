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
import json
import math
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pyrobust.errors import DataError, InvalidInput, OutputError, PyRobustError


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


# ------------------------------------------------------------------------------------------------ memory
def _own_cgroups(proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> dict[str, str]:
    """This process's cgroup path per hierarchy: ``""`` for the v2 unified one, else the v1 controller names."""
    out: dict[str, str] = {}
    try:
        text = Path(proc_cgroup).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
    return out


def cgroup_memory_available(root: str | os.PathLike = "/sys/fs/cgroup",
                            proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int | None:
    """Bytes a container's memory limit still allows (cgroup v2 ``memory.max`` less ``memory.current``, or v1
    ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``), the tightest of this process's cgroup and its
    ancestors, or None without a limit. The kernel kills a process that goes past it without a word, whatever
    /proc/meminfo says the machine has."""
    base = Path(root)
    own = _own_cgroups(proc_cgroup)
    best: int | None = None
    for hierarchy, limit_name, usage_name, key in ((base, "memory.max", "memory.current", ""),
                                                   (base / "memory", "memory.limit_in_bytes",
                                                    "memory.usage_in_bytes", "memory")):
        rel = own.get(key, "/").strip("/")
        folders = [hierarchy / rel] if rel else []
        folders += [hierarchy / Path(rel).parents[i] for i in range(len(Path(rel).parents))] if rel else [hierarchy]
        for folder in folders:
            try:
                limit = (folder / limit_name).read_text().strip()
            except OSError:
                continue
            try:
                cap = int(limit)
            except ValueError:
                continue  # "max": no limit at this level
            if cap >= 2**60:  # v1 writes a huge number for "no limit"
                continue
            try:
                used = int((folder / usage_name).read_text().strip())
            except (OSError, ValueError):
                used = 0
            left = max(0, cap - used)
            best = left if best is None else min(best, left)
    return best


def available_memory_bytes(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """Memory this process may still take: MemAvailable from /proc/meminfo, lowered to what a container's cgroup
    memory limit leaves; None where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    cap = cgroup_memory_available(cgroup_root)
    if cap is not None:
        avail = cap if avail is None else min(avail, cap)
    return avail


def memory_budget(max_memory_mb: float | None) -> int | None:
    """Bytes pyrobust may use for data and working buffers: ``max_memory_mb``, or 80 % of the available memory."""
    if max_memory_mb is not None:
        if isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, (int, float)) or \
                not 0 < max_memory_mb < 2**40 or not math.isfinite(max_memory_mb):
            raise InvalidInput(f"max_memory must be a finite number of MiB > 0; got {max_memory_mb}")
        return int(max_memory_mb * 2**20)
    avail = available_memory_bytes()
    return int(avail * 0.8) if avail else None
