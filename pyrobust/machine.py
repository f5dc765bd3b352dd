"""What this machine lets a run use: CPUs (affinity and a container's CPU quota), memory (MemAvailable and a
container's cgroup memory limit), the memory budget a run plans with, and the library versions a result records.
Core: imports only ``errors``."""

from __future__ import annotations

import math
import os
import platform
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from pyrobust.validate import Integer, Number, check, declare

MAX_MEMORY = Number(0, 2**40, lo_open=True, hi_open=True, unit="MiB", none=True)  # None: 80 % of what is available
THREADS = Integer(1, none=True)


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
        check("max_memory", max_memory_mb, MAX_MEMORY)
        return int(max_memory_mb * 2**20)
    avail = available_memory_bytes()
    return int(avail * 0.8) if avail else None


class ThreadsCappedWarning(UserWarning):
    """More threads were asked for than this process may use; the count was lowered."""


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs a container's CPU quota allows (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), or None without a quota."""
    base = Path(root)
    try:
        limit, per = (base / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(per)
    except (OSError, ValueError):
        pass
    try:
        quota = int((base / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((base / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """CPUs this process may use: its affinity mask, lowered to a container's CPU quota."""
    try:
        n = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        n = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = max(1, min(n, math.ceil(limit)))
    return n


def check_threads(threads) -> int:
    """A thread count to use: an integer >= 1 (None: every CPU available), capped at the CPUs available with a
    warning (onnxruntime with far more threads than cores is slow, and can hang under an address-space limit)."""
    check("threads", threads, THREADS)
    if threads is None:
        return default_threads()
    available = default_threads()
    if threads > available:
        warnings.warn(f"{threads} threads asked for, but this process may use {available} CPU(s); using "
                      f"{available}", ThreadsCappedWarning, stacklevel=3)
        return available
    return int(threads)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("pyrobust", "numpy", "numba", "onnxruntime", "onnx", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ------------------------------------------------------------------------------------------------ forced exit
_FORCED_EXIT_HOOKS: list[Callable[[], str]] = []


def on_forced_exit(hook: Callable[[], str]) -> None:
    """Register ``hook`` to run when the process is ended from outside its main thread (the watchdog's last resort:
    the main thread is stuck inside one model operation). It saves what it can and says what it saved. The store
    registers its checkpoint saving here, so the engine's watchdog needs no import of the store."""
    if hook not in _FORCED_EXIT_HOOKS:
        _FORCED_EXIT_HOOKS.append(hook)


def before_forced_exit() -> str:
    """Run every hook registered with :func:`on_forced_exit`; what they saved, in one phrase."""
    said = [hook() for hook in list(_FORCED_EXIT_HOOKS)]
    return "; ".join(s for s in said if s) or "stopped before any result was saved"


declare("memory_budget", {"max_memory_mb": MAX_MEMORY}, lambda max_memory_mb: memory_budget(max_memory_mb))
declare("check_threads", {"threads": THREADS}, lambda threads: check_threads(threads))
