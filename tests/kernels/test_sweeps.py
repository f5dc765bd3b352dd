"""The severity sweeps (deterministic corruptions) against references from scipy, matplotlib and Pillow, on grey and
RGB images of several sizes, both layouts, integer inputs and normalisation; their ladders and kernels."""

from __future__ import annotations

import numpy as np
import pytest

from perturbcore.families import FAMILIES, LEVELS, Sweep, parse, prepare
from perturbcore.families._sweep import disk, motion_line
from tests import naive

SWEEPS = [name for name, cls in FAMILIES.items() if issubclass(cls, Sweep)]
# float64 sums in another order (scipy's filters, matplotlib's HSV): float32 rounding apart
TOLERANCE = 2e-6


def _images(n, h, w, c, top=1.0, integer=False, seed=0):
    x = np.random.default_rng(seed).random((n, h, w, c)) * top
    return (np.rint(x) if integer else x).astype(np.float32)


def _run(family, x, *, channels_first=False, top=1.0, integer=False, mean=None, std=None):
    """Every severity 0..5 of each image (n, H, W, C): returns (n, 6, H, W, C), normalised when mean/std are given."""
    n, h, w, c = x.shape
    flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2) if channels_first else x).reshape(n, -1)
    prepared = prepare(family, height=h, width=w, channels=c, seed=0, channels_first=channels_first, mean=mean,
                       std=std, top=top, integer=integer)
    rows = np.repeat(np.arange(n, dtype=np.int64), LEVELS + 1)
    steps = np.tile(np.arange(LEVELS + 1, dtype=np.int64), n)
    out = np.empty((rows.size, flat.shape[1]), np.float32)
    prepared.perturb(flat, rows, steps, np.arange(n, dtype=np.int64), out)
    back = out.reshape(-1, c, h, w).transpose(0, 2, 3, 1) if channels_first else out.reshape(-1, h, w, c)
    return back.reshape(n, LEVELS + 1, h, w, c)


SHAPES = [(28, 28, 1), (32, 32, 3), (9, 7, 3), (64, 48, 1)]
# saturate needs colour: its grey cases are refusals (test_sweeps_refuse_what_they_cannot_do)
SWEEP_SHAPES = [(name, shape) for name in SWEEPS for shape in SHAPES if not (name == "saturate" and shape[2] != 3)]


@pytest.mark.parametrize("name,shape", SWEEP_SHAPES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in SWEEP_SHAPES])
@pytest.mark.parametrize("channels_first", [False, True], ids=["nhwc", "nchw"])
def test_every_severity_matches_the_reference(name, shape, channels_first):
    x = _images(2, *shape)
    got = _run(parse(name), x, channels_first=channels_first)
    for i in range(2):
        np.testing.assert_array_equal(got[i, 0], x[i])  # step 0 is the clean image
        for s in range(1, LEVELS + 1):
            want = naive.sweep_image(name, x[i], s)
            np.testing.assert_allclose(got[i, s], want, rtol=0, atol=TOLERANCE, err_msg=f"{name} severity {s}")


@pytest.mark.parametrize("name", SWEEPS)
def test_integer_inputs_and_normalisation(name):
    x = _images(2, 12, 12, 3, top=255, integer=True)
    got = _run(parse(name), x, top=255, integer=True)
    assert np.all(got == np.rint(got)) and got.min() >= 0 and got.max() <= 255
    for s in range(1, LEVELS + 1):
        want = naive.sweep_image(name, x[0], s, top=255, integer=True)
        assert np.mean(got[0, s] != want) < 0.01  # a value at .5 may round either way after float64 sums
        assert np.abs(got[0, s] - want).max() <= 1
    y = _images(2, 10, 10, 3)
    mean, std = np.array([0.4, 0.5, 0.6], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
    np.testing.assert_array_equal(_run(parse(name), y, mean=mean, std=std), (_run(parse(name), y) - mean) / std)


@pytest.mark.parametrize("name", SWEEPS)
def test_severities_grow(name):
    """Higher severity, larger change (on average over images): the ladders are ordered (saturate's is not:
    it desaturates, then oversaturates)."""
    x = _images(16, 32, 32, 3)
    got = _run(parse(name), x)
    change = [float(np.abs(got[:, s] - x).mean()) for s in range(1, LEVELS + 1)]
    if name == "saturate":
        assert change[1] > change[0] and change[4] > change[3] > change[2]
    else:
        assert all(b > a for a, b in zip(change, change[1:], strict=False)), change


def test_spatial_ladders_scale_with_the_image():
    blur = parse("gaussian-blur")
    assert blur.levels((32, 32, 1))[0] == (0.4,)
    assert blur.levels((224, 224, 3))[4] == pytest.approx((7.0,))
    assert blur.levels((28, 40, 1))[4] == pytest.approx((0.875,))
    assert parse("contrast").levels((224, 224, 3)) == parse("contrast").levels((28, 28, 1))
    assert parse("defocus-blur").levels((64, 64, 3))[3] == pytest.approx((2.0, 0.2))
    assert parse("motion-blur").describe_level(5, (32, 32, 1)) == "radius=12, sigma=3"


def test_blur_kernels_are_normalised_and_shaped():
    for r, a in parse("defocus-blur").ladder + ((12.0, 0.5),):
        k = disk(r, a)
        assert k.sum() == pytest.approx(1.0) and np.allclose(k, k.T) and np.allclose(k, k[::-1, ::-1])
        yy, xx = np.nonzero(k > 1e-9)
        centre = k.shape[0] // 2
        assert np.hypot(yy - centre, xx - centre).max() <= r + 2 * (1 if r <= 8 else 2) + 1e-9
    line = motion_line(10, 2, 0)
    assert line.sum() == pytest.approx(1.0)
    centre = line.shape[0] // 2
    assert np.count_nonzero(line[centre]) == 21 and np.count_nonzero(line) == 21  # one row, to the right
    assert line[centre, centre] == line.max()
    assert np.count_nonzero(motion_line(10, 2, 90)[:, centre]) == 21


def test_a_224x224_rgb_image_at_every_severity():
    x = _images(1, 224, 224, 3)
    got = _run(parse("defocus-blur"), x, channels_first=True)
    for s in (1, 5):
        np.testing.assert_allclose(got[0, s], naive.sweep_image("defocus-blur", x[0], s), atol=TOLERANCE)


@pytest.mark.parametrize("text,shape,match", [
    ("saturate", (8, 8, 1), r"saturate changes colours: it needs RGB images; these have 1 channel"),
    ("brightness", (8, 8, 2), r"brightness works on grey or RGB images; these have 2 channels"),
    ("jpeg", (8, 8, 4), r"jpeg encodes grey or RGB images"),
    ("motion-blur:angle=200", (8, 8, 1), r"motion-blur: angle must be a number in \[-180, 180\] degrees"),
])
def test_sweeps_refuse_what_they_cannot_do(text, shape, match):
    with pytest.raises(ValueError, match=match):
        prepare(parse(text), height=shape[0], width=shape[1], channels=shape[2], seed=0)
