import numpy as np
import pytest

import perturbcore
from tests import naive


def _images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


CASES = [
    # (h, w, c, pixels, scheme, low, high)
    (28, 28, 1, 28, "uniform", 0.0, 1.0),
    (28, 28, 1, 28, "salt-pepper", 0.0, 1.0),
    (5, 7, 3, 4, "uniform", -1.0, 2.5),
    (5, 7, 3, 4, "salt-pepper", 0.25, 0.75),
    (1, 1, 1, 1, "uniform", 0.0, 1.0),  # one pixel
    (4, 4, 2, 16, "uniform", 0.0, 1.0),  # k = every pixel
]


@pytest.mark.parametrize("h,w,c,pixels,scheme,low,high", CASES)
def test_kernel_matches_naive_reference(h, w, c, pixels, scheme, low, high):
    x = _images(6, h, w, c)
    idx = np.array([0, 3, 17, 100, 5, 2**33])
    steps = np.array([0, 1, 2, 250, 7, 1])
    got = perturbcore.perturb_images(x, indices=idx, steps=steps, pixels=pixels, seed=42, low=low, high=high,
                                     scheme=scheme)
    for i in range(6):
        want = naive.perturb_image(x[i], seed=42, index=int(idx[i]), step=int(steps[i]), pixels=pixels, low=low,
                                   high=high, scheme=scheme)
        np.testing.assert_array_equal(got[i], want)


def test_step_zero_is_the_clean_image():
    x = _images(3, 6, 6, 1)
    got = perturbcore.perturb_images(x, indices=[0, 1, 2], steps=[0, 0, 0], pixels=36, seed=1)
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("channels_first", [False, True])
def test_channel_layouts_hold_the_same_pixels(channels_first):
    h, w, c = 5, 6, 3
    x = _images(4, h, w, c)
    flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2) if channels_first else x).reshape(4, -1)
    out = perturbcore.perturb_flat(flat, indices=np.arange(4), steps=[1, 2, 3, 4], pixels=5, n_positions=h * w,
                                   channels=c, seed=7, channels_first=channels_first)
    back = out.reshape(4, c, h, w).transpose(0, 2, 3, 1) if channels_first else out.reshape(4, h, w, c)
    want = perturbcore.perturb_images(x, indices=np.arange(4), steps=[1, 2, 3, 4], pixels=5, seed=7)
    np.testing.assert_array_equal(back, want)


def test_normalisation_applies_to_noise_values_exactly_as_to_the_image():
    x = _images(5, 6, 6, 2)
    mean, std = np.array([0.1307, 0.5], np.float32), np.array([0.3081, 0.25], np.float32)
    normed = ((x - mean) / std).reshape(5, -1)
    out = perturbcore.perturb_flat(normed, indices=np.arange(5), steps=np.arange(1, 6), pixels=6, n_positions=36,
                                   channels=2, seed=3, mean=mean, std=std)
    raw = perturbcore.perturb_images(x, indices=np.arange(5), steps=np.arange(1, 6), pixels=6, seed=3)
    np.testing.assert_array_equal(out, ((raw - mean) / std).reshape(5, -1))


def test_at_most_k_pixels_change_and_nothing_else():
    n, k = 2000, 28
    x = np.full((n, 28, 28, 1), 2.0, np.float32)  # outside [0, 1): every drawn pixel visibly changes
    out = perturbcore.perturb_images(x, indices=np.arange(n), steps=np.full(n, 3), pixels=k, seed=5)
    changed = (out != x).reshape(n, -1).sum(1)
    assert changed.max() <= k
    assert changed.min() >= k - 6  # with replacement, a few repeats at most
    assert np.all((out == 2.0) | ((out >= 0) & (out < 1)))


def test_positions_are_uniform_chi_square():
    n, h, w = 4000, 8, 8
    x = np.full((n, h, w, 1), -1.0, np.float32)
    out = perturbcore.perturb_images(x, indices=np.arange(n), steps=np.ones(n, int), pixels=1, seed=11)
    hits = (out != -1.0).reshape(n, -1).sum(0)
    expected = n / (h * w)
    chi2 = ((hits - expected) ** 2 / expected).sum()
    assert hits.sum() == n
    assert chi2 < 110.6  # 63 degrees of freedom, 99.9% critical value 103.4 (slack for the discrete test)


def test_values_are_uniform_ks():
    n = 5000
    x = np.full((n, 1, 1, 1), -1.0, np.float32)
    out = perturbcore.perturb_images(x, indices=np.arange(n), steps=np.ones(n, int), pixels=1, seed=13,
                                     low=0.2, high=0.7).ravel()
    assert out.min() >= 0.2 and out.max() < 0.7
    u = np.sort((out - 0.2) / 0.5)
    ecdf_hi = np.arange(1, n + 1) / n
    ks = max(np.max(ecdf_hi - u), np.max(u - (ecdf_hi - 1 / n)))
    assert ks < 1.95 / np.sqrt(n)  # 99.9% critical value of the Kolmogorov-Smirnov statistic


def test_salt_pepper_uses_only_the_extremes_half_each():
    n = 4000
    x = np.full((n, 1, 1, 1), 0.5, np.float32)
    out = perturbcore.perturb_images(x, indices=np.arange(n), steps=np.ones(n, int), pixels=1, seed=2,
                                     scheme="salt-pepper", low=0.0, high=1.0).ravel()
    assert set(np.unique(out).tolist()) == {0.0, 1.0}
    assert abs(out.mean() - 0.5) < 3.3 * 0.5 / np.sqrt(n)


def test_uniform_never_reaches_high():
    # A span whose float32 rounding lands on `high` for the largest draws.
    x = np.zeros((3000, 4, 4, 1), np.float32)
    out = perturbcore.perturb_images(x, indices=np.arange(3000), steps=np.ones(3000, int), pixels=16, seed=0,
                                     low=1.0, high=1.0000001)
    assert out.max() < np.float32(1.0000001)


def test_cumulative_write_back_is_a_random_walk():
    x = _images(3, 6, 6, 1)
    src = x.reshape(3, -1).copy()
    out = np.empty_like(src)
    for s in (1, 2, 3):
        perturbcore.perturb_flat(src, indices=[4, 5, 6], steps=[s] * 3, pixels=4, n_positions=36, channels=1,
                                 seed=9, out=out, write_back=True)
    for i in range(3):
        want = x[i]
        for s in (1, 2, 3):
            want = naive.perturb_image(want, seed=9, index=4 + i, step=s, pixels=4)
        np.testing.assert_array_equal(src[i].reshape(6, 6, 1), want)
        np.testing.assert_array_equal(out[i].reshape(6, 6, 1), want)


def test_rows_select_slots_in_order():
    x = _images(5, 4, 4, 1).reshape(5, -1)
    full = perturbcore.perturb_flat(x, indices=np.arange(5), steps=np.ones(5, int), pixels=3, n_positions=16,
                                    channels=1, seed=1)
    part = perturbcore.perturb_flat(x, indices=np.arange(5), steps=np.ones(5, int), pixels=3, n_positions=16,
                                    channels=1, seed=1, rows=[4, 0, 2])
    np.testing.assert_array_equal(part, full[[4, 0, 2]])


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads):
    x = _images(300, 28, 28, 1)
    ref = perturbcore.perturb_images(x, indices=np.arange(300), steps=np.arange(300) % 250 + 1, pixels=28, seed=4,
                                     threads=1)
    got = perturbcore.perturb_images(x, indices=np.arange(300), steps=np.arange(300) % 250 + 1, pixels=28, seed=4,
                                     threads=threads)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kwargs,match", [
    ({"pixels": 0}, r"pixels must be an integer in \[1, 16\]"),
    ({"pixels": 17}, r"pixels must be an integer in \[1, 16\]"),
    ({"pixels": 2.5}, r"pixels must be an integer"),
    ({"low": 1.0, "high": 1.0}, r"finite low < high"),
    ({"low": 0.0, "high": float("nan")}, r"finite low < high"),
    ({"scheme": "gaussian"}, r"scheme must be one of uniform, salt-pepper"),
    ({"seed": -3}, r"seed must be an integer in \[0, 2\*\*64\)"),
    ({"steps": [-1, 1]}, r"steps must be >= 0"),
    ({"steps": [1]}, r"steps must have shape \(2,\)"),
    ({"rows": [0, 2]}, r"rows must index slots in \[0, 2\)"),
    ({"out": np.empty((1, 16), np.float32)}, r"out must be a C-contiguous float32 array"),
    ({"write_back": True, "source": np.zeros((2, 16))}, r"write_back needs a C-contiguous float32 source"),
    ({"source": np.zeros((2, 15), np.float32)}, r"source must have shape \(slots, 16\)"),
])
def test_driver_rejects_bad_arguments(kwargs, match):
    args = dict(source=np.zeros((2, 16), np.float32), indices=[0, 1], steps=[1, 1], pixels=3, n_positions=16,
                channels=1, seed=0)
    args.update(kwargs)
    source = args.pop("source")
    with pytest.raises(ValueError, match=match):
        perturbcore.perturb_flat(source, **args)


def test_perturb_images_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"images must have shape \(n, H, W\) or \(n, H, W, C\)"):
        perturbcore.perturb_images(np.zeros((4, 4)), indices=[0], steps=[1], pixels=1, seed=0)


def test_row_steps_pack_several_steps_of_one_slot():
    x = _images(2, 6, 6, 1).reshape(2, -1)
    out = perturbcore.perturb_flat(x, rows=[0, 0, 0, 1], row_steps=[0, 1, 2, 7], indices=[5, 9], steps=[0, 0],
                                   pixels=4, n_positions=36, channels=1, seed=3)
    for j, (slot, step) in enumerate([(0, 0), (0, 1), (0, 2), (1, 7)]):
        want = naive.perturb_image(x[slot].reshape(6, 6, 1), seed=3, index=[5, 9][slot], step=step, pixels=4)
        np.testing.assert_array_equal(out[j].reshape(6, 6, 1), want)
    with pytest.raises(ValueError, match="write_back needs distinct rows"):
        perturbcore.perturb_flat(x, rows=[0, 0], row_steps=[1, 2], indices=[5, 9], steps=[0, 0], pixels=4,
                                 n_positions=36, channels=1, seed=3, write_back=True)
    with pytest.raises(ValueError, match="row_steps must be >= 0"):
        perturbcore.perturb_flat(x, rows=[0], row_steps=[-1], indices=[5, 9], steps=[0, 0], pixels=4,
                                 n_positions=36, channels=1, seed=3)


def test_serial_and_parallel_compilations_agree():
    x = _images(64, 28, 28, 1)
    args = dict(indices=np.arange(64), steps=np.arange(1, 65), pixels=28, seed=8)
    np.testing.assert_array_equal(perturbcore.perturb_images(x, threads=1, **args),
                                  perturbcore.perturb_images(x, threads=2, **args))


def test_a_random_pixel_count_matches_the_reference():
    """--pixel-count random: each step changes a count uniform in 1..pixels, drawn from its own counter."""
    rng = np.random.default_rng(8)
    img = rng.random((9, 11, 2), dtype=np.float32)
    counts = []
    for step in range(1, 60):
        got = perturbcore.perturb_flat(img.reshape(1, -1), indices=[5], steps=[step], pixels=28, n_positions=99,
                                       channels=2, seed=2, random_count=True)
        want = naive.perturb_image(img, seed=2, index=5, step=step, pixels=28, random_count=True)
        assert np.array_equal(got.reshape(img.shape), want)
        counts.append(len(naive.noise_draws(2, 5, step, 28, 99, 2, 0.0, 1.0, "uniform", random_count=True)))
    assert min(counts) >= 1 and max(counts) <= 28 and len(set(counts)) > 10  # spread over 1..28
    fixed = perturbcore.perturb_flat(img.reshape(1, -1), indices=[5], steps=[1], pixels=28, n_positions=99,
                                     channels=2, seed=2)
    assert np.array_equal(fixed.reshape(img.shape),
                          naive.perturb_image(img, seed=2, index=5, step=1, pixels=28))  # fixed mode unchanged
