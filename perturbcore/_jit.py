"""The one place that sets numba's compilation options for every kernel.

``cache=True`` keeps compiled machine code between processes (the first import of a fresh install pays the
compile, later ones load it); ``error_model="numpy"`` makes division follow IEEE rules instead of raising, which
removes a branch from every inner loop; ``nogil=True`` lets a caller run a kernel beside onnxruntime's threads.
"""

from __future__ import annotations

import numba

JIT_OPTIONS = {"cache": True, "error_model": "numpy", "nogil": True}


def kernel(func):
    """Compile a serial kernel."""
    return numba.njit(**JIT_OPTIONS)(func)


def parallel_kernel(func):
    """Compile a kernel whose outer ``prange`` loop runs on numba's thread pool."""
    return numba.njit(parallel=True, **JIT_OPTIONS)(func)
