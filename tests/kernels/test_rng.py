import numpy as np
import pytest

import perturbcore
from tests import naive


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, 2**64 - 1])
def test_random_u64_matches_reference(seed):
    idx = np.array([0, 1, 7, 59999, 2**40])
    steps = np.array([0, 1, 250, 3, 99])
    ctr = np.array([0, 5, 28, 1000, 3])
    got = perturbcore.random_u64(seed, idx, steps, ctr)
    want = [naive.random_u64(seed, int(i), int(s), int(c)) for i, s, c in zip(idx, steps, ctr, strict=True)]
    assert got.tolist() == want


def test_every_key_component_changes_the_draw():
    base = perturbcore.random_u64(3, 10, 5, 2)
    for args in ((4, 10, 5, 2), (3, 11, 5, 2), (3, 10, 6, 2), (3, 10, 5, 3)):
        assert perturbcore.random_u64(*args) != base


def test_draws_are_a_pure_function_of_the_key():
    idx = np.arange(1000)
    a = perturbcore.random_u64(9, idx, 1, 0)
    b = perturbcore.random_u64(9, idx[::-1], 1, 0)[::-1]
    assert np.array_equal(a, b)


def test_top_bits_are_uniform():
    # 2**16 draws into 64 buckets of their top 6 bits; chi-square with 63 dof, 99.9% critical value 103.4.
    u = perturbcore.random_u64(1, np.arange(2**16), 1, 0)
    counts = np.bincount((u >> np.uint64(58)).astype(np.int64), minlength=64)
    expected = u.size / 64
    assert ((counts - expected) ** 2 / expected).sum() < 103.4


def test_seed_out_of_range():
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        perturbcore.random_u64(-1, 0, 0, 0)
