"""perturbcore: numba kernels for random L0 noise and first-failure tracking (arrays in, arrays out, no I/O)."""

from perturbcore.noise import SCHEMES, check_noise_params, perturb_flat, perturb_images
from perturbcore.rng import random_u64
from perturbcore.tracking import NONFINITE, ROBUST, predict, record_batch

__all__ = [
    "NONFINITE",
    "ROBUST",
    "SCHEMES",
    "check_noise_params",
    "perturb_flat",
    "perturb_images",
    "predict",
    "random_u64",
    "record_batch",
]
