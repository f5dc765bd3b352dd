"""perturbcore: numba kernels for random L0 noise, first-failure tracking, failure counts and clean margins (arrays
in, arrays out, no I/O)."""

from perturbcore.noise import SCHEMES, PreparedNoise, check_noise_params, perturb_flat, perturb_images, prepare_noise
from perturbcore.rng import random_u64
from perturbcore.tracking import NONFINITE, ROBUST, clean_margin, predict, record_batch

__all__ = [
    "NONFINITE",
    "PreparedNoise",
    "ROBUST",
    "SCHEMES",
    "check_noise_params",
    "clean_margin",
    "perturb_flat",
    "perturb_images",
    "predict",
    "prepare_noise",
    "random_u64",
    "record_batch",
]
