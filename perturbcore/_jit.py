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
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where numba keeps the compiled kernels."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyrobust" / "numba"


# Before numba reads its configuration (and again after, for a process that imported numba first).
os.environ["NUMBA_CACHE_DIR"] = str(cache_dir())

import numba  # noqa: E402

numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # type: ignore[attr-defined]

JIT_OPTIONS = {"cache": True, "error_model": "numpy", "nogil": True}


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
