"""Counter-based random numbers: every value is a pure function of (seed, image index, step, counter).

The generator is SplitMix64 (Steele, Lea and Flood, 2014). A *stream key* is derived from
``(seed, index, step)`` by chaining the SplitMix64 finaliser, and the ``counter``-th value of that stream is the
finaliser applied to ``key + (counter + 1) * GOLDEN``, exactly as SplitMix64 advances its state. Nothing is kept
between calls, so a value does not depend on which thread computes it, in which batch, or in which order.

All arithmetic is on ``uint64`` and wraps modulo 2**64. Mixing ``uint64`` with signed integers makes numba promote
to ``float64``, silently destroying the bits, so every operand is cast explicitly.
"""

from __future__ import annotations

import numpy as np

from perturbcore._jit import kernel

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S40 = np.uint64(40)
_ONE = np.uint64(1)
# 2**-24: turns the top 24 bits of a draw into a float32-exact value in [0, 1).
_INV_2_24 = 1.0 / 16777216.0


@kernel
def _mix64(z):
    z = np.uint64(z)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@kernel
def _stream_key(seed, index, step):
    h = _mix64(np.uint64(seed) + GOLDEN)
    h = _mix64(h ^ (np.uint64(index) + GOLDEN))
    return _mix64(h ^ (np.uint64(step) + GOLDEN))


@kernel
def _draw(key, counter):
    return _mix64(key + (np.uint64(counter) + _ONE) * GOLDEN)


@kernel
def _unit24(u):
    """Top 24 bits of ``u`` as a float in [0, 1); exactly representable in float32."""
    return np.float64(u >> _S40) * _INV_2_24


@kernel
def _random_u64_kernel(seed, indices, steps, counters, out):
    for i in range(out.shape[0]):
        out[i] = _draw(_stream_key(seed, indices[i], steps[i]), counters[i])


def random_u64(seed: int, indices, steps, counters) -> np.ndarray:
    """The raw 64-bit draws for arrays of (index, step, counter), broadcast together; for tests and audits."""
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {seed}")
    idx, stp, ctr = np.broadcast_arrays(
        np.asarray(indices, dtype=np.int64), np.asarray(steps, dtype=np.int64), np.asarray(counters, dtype=np.int64)
    )
    out = np.empty(idx.size, dtype=np.uint64)
    _random_u64_kernel(np.uint64(seed), idx.ravel().copy(), stp.ravel().copy(), ctr.ravel().copy(), out)
    return out.reshape(idx.shape)
