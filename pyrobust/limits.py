"""Bounds on what a run may use: the memory budget (``--max-memory``, else 80 % of the memory available)."""

from __future__ import annotations

import math

from pyrobust.errors import InvalidInput


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget(max_memory_mb: float | None) -> int | None:
    """Bytes pyrobust may use for data and working buffers: ``max_memory_mb``, or 80 % of the available memory."""
    if max_memory_mb is not None:
        if isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, (int, float)) or \
                not 0 < max_memory_mb < 2**40 or not math.isfinite(max_memory_mb):
            raise InvalidInput(f"max_memory must be a finite number of MiB > 0; got {max_memory_mb}")
        return int(max_memory_mb * 2**20)
    avail = available_memory_bytes()
    return int(avail * 0.8) if avail else None
