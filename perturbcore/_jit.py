"""The one place that sets numba's compilation options for every kernel.

``cache=True`` keeps compiled machine code between processes (the first import of a fresh install pays the
compile, later ones load it); ``error_model="numpy"`` makes division follow IEEE rules instead of raising, which
removes a branch from every inner loop; ``nogil=True`` lets several Python threads run kernels beside onnxruntime.

**256-bit vectors on AVX-512 hosts.** On CPUs whose LLVM model prefers 512-bit vectors (rocketlake here), numba
vectorised the noise loop with zmm registers and AVX-512 scatters. The kernel itself is tiny, but running 512-bit
instructions lowers the core's clock for a while, and the onnxruntime inference that follows took ~45 % longer
(8.4 ms instead of 5.7 ms per 256-image batch; the engine fell from 0.92x to 0.6x bare onnxruntime). Adding LLVM's
``prefer-256-bit`` feature keeps every instruction set but makes the vectoriser use 256-bit registers, as LLVM does by
default for skylake-avx512. It is set on numba's CPU target before the first compilation, unless the user chose a
target (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``); it also applies to other numba code compiled in the process.

**The compiled cache lives in a per-user folder**, ``$NUMBA_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME/pyrobust/numba`` (``~/.cache/pyrobust/numba``), never beside the installed sources: numba's default
``__pycache__`` inside ``site-packages/perturbcore`` outlives a ``pip uninstall`` and then shadows a later editable
install of the package as an empty namespace package. Like the vector width, this is numba's process-wide setting.

**The cache is executable code.** numba's index files are pickles, loaded before any check, and its ``.nbc`` files
are machine code: whoever can write the cache folder can run code as the next user of pyrobust. So the folder is
created ``0700`` and used only when it is safe to trust: a real folder (not a symbolic link) owned by this user,
not writable by group or others, on a writable file system, every ancestor owned by this user or root and not
writable by others (unless sticky, as ``/tmp``), and every file and folder inside owned by this user and not
writable by group or others. Otherwise the kernels are compiled in memory for this process only (slower to start,
nothing read or written) and a ``KernelCacheWarning`` says why and how to fix it. Restoring this folder from a CI
cache that other jobs or forks can write defeats all of this: the README says so.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any


class KernelCacheWarning(UserWarning):
    """The compiled-kernel cache cannot be trusted or written: kernels are compiled in memory instead."""


def cache_dir() -> Path:
    """Where numba keeps the compiled kernels."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyrobust" / "numba"


def _make_private(folder: Path) -> None:
    """Create ``folder`` and any missing parents with mode 0700."""
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        os.mkdir(d, 0o700)


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def cache_problem(folder: Path) -> str | None:
    """Why ``folder`` must not hold compiled kernels (a sentence), or None when it is safe to use; creates it 0700
    if it does not exist."""
    uid = os.geteuid()
    try:
        _make_private(folder)
        st = os.lstat(folder)
    except OSError as exc:
        return f"it cannot be created ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if st.st_uid != uid:
        return f"it is owned by user {st.st_uid}, not by you ({uid})"
    if _writable_by_others(st):
        return f"others can write it (mode {stat.S_IMODE(st.st_mode):04o})"
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:  # pragma: no cover - statvfs is there on every POSIX system
        read_only = False
    if read_only or not os.access(folder, os.W_OK | os.X_OK):
        return "it cannot be written (a read-only file system or home)"
    for parent in folder.resolve().parents:
        pst = os.stat(parent)
        if pst.st_uid not in (uid, 0):
            return f"its parent {parent} is owned by user {pst.st_uid}"
        if _writable_by_others(pst) and not pst.st_mode & stat.S_ISVTX:
            return f"others can write its parent {parent} (mode {stat.S_IMODE(pst.st_mode):04o})"
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            est = os.lstat(path)
            if stat.S_ISLNK(est.st_mode):
                return f"{path} is a symbolic link"
            if est.st_uid != uid:
                return f"{path} is owned by user {est.st_uid}, not by you"
            if _writable_by_others(est):
                return f"others can write {path} (mode {stat.S_IMODE(est.st_mode):04o})"
    return None


CACHE_DIR = cache_dir()
_problem = cache_problem(CACHE_DIR)
if _problem is not None:
    warnings.warn(f"the compiled-kernel cache {CACHE_DIR} is not used: {_problem}. It holds executable code, so "
                  "pyrobust only uses a folder that only you can write; kernels are compiled in memory for this run "
                  "(slower to start). Fix: remove the folder (pyrobust creates it again, private), or set "
                  "NUMBA_CACHE_DIR to a folder of your own that only you can write",
                  KernelCacheWarning, stacklevel=2)

# Before numba reads its configuration (and again after, for a process that imported numba first).
os.environ["NUMBA_CACHE_DIR"] = str(CACHE_DIR)

import numba  # noqa: E402

numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # type: ignore[attr-defined]

JIT_OPTIONS: dict[str, Any] = {"cache": _problem is None, "error_model": "numpy", "nogil": True}


def _prefer_256_bit_vectors() -> None:
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES") or numba.config.CPU_FEATURES:  # type: ignore[attr-defined]
        return
    try:
        import llvmlite.binding as ll

        features = ll.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - no host introspection: leave numba's default
        return
    if "+avx512f" in features.split(",") and "prefer-256-bit" not in features:
        numba.config.CPU_FEATURES = features + ",+prefer-256-bit"  # type: ignore[attr-defined]


_prefer_256_bit_vectors()


def kernel(func):
    """Compile a serial kernel."""
    return numba.njit(**JIT_OPTIONS)(func)


def parallel_kernel(func):
    """Compile a kernel whose outer ``prange`` loop runs on numba's thread pool."""
    return numba.njit(parallel=True, **JIT_OPTIONS)(func)


def run_on_threads(serial, parallel, args: tuple, threads: int | None) -> None:
    """Call a kernel compiled both ways: ``threads=1`` the serial one (it never wakes numba's pool), otherwise the
    parallel one on ``threads`` threads (None: numba's setting), restoring the pool's size afterwards."""
    if threads == 1:
        serial(*args)
        return
    previous = numba.get_num_threads()
    try:
        if threads is not None:
            numba.set_num_threads(int(threads))
        parallel(*args)
    finally:
        numba.set_num_threads(previous)
