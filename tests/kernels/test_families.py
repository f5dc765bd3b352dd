"""Every noise family against its naive reference (tests/naive.py), across layouts, channel counts, image sizes,
normalisation, integer inputs, batch composition and threads; the grammar and every error path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from perturbcore.families import FAMILIES, Family, parse, prepare
from tests import naive

# (family text, parameters as naive.family_image reads them); each family at least once, some twice
CASES = [
    ("gaussian:sigma=0.1", {"sigma": 0.1}),
    ("gaussian:sigma=0.5", {"sigma": 0.5}),
    ("uniform:eps=0.05", {"eps": 0.05}),
    ("l2:eps=2", {"eps": 2.0, "shape": "sphere"}),
    ("l2:eps=3,shape=ball", {"eps": 3.0, "shape": "ball"}),
    ("shot:photons=60", {"photons": 60.0}),
    ("shot:photons=3", {"photons": 3.0}),
    ("speckle:sigma=0.3", {"sigma": 0.3}),
    ("impulse:density=0.1", {"density": 0.1}),
    ("dropout:rate=0.2,value=0.5", {"rate": 0.2, "value": 0.5}),
    ("patch:size=3", {"size": 3, "fill": "constant", "value": 0.0}),
    ("patch:size=4,fill=random", {"size": 4, "fill": "random"}),
    ("translate:shift=2", {"shift": 2, "value": 0.0}),
    ("translate:shift=1,value=1", {"shift": 1, "value": 1.0}),
    ("dihedral", {"group": "flips"}),
    ("dihedral:group=d4", {"group": "d4"}),
    ("rotate:degrees=15", {"degrees": 15.0, "value": 0.0}),
]
# Pixel-moving families and counting families are exact; the ones that turn a uniform into a normal (Acklam's
# quantile against the standard library's, 1.2e-9 relative) or interpolate (scipy's order of operations) agree to
# float32 rounding.
TOLERANCE = {"gaussian": 2e-6, "speckle": 2e-6, "l2": 2e-6, "rotate": 2e-6}
IDX = np.array([0, 3, 17, 2**33])
STEPS = np.array([1, 2, 250, 7])


def _images(n, h, w, c, top=1.0, integer=False, seed=0):
    x = np.random.default_rng(seed).random((n, h, w, c)) * top
    return (np.rint(x) if integer else x).astype(np.float32)


def _run(family, x, *, indices=IDX, steps=STEPS, seed=5, channels_first=False, top=1.0, integer=False, mean=None,
         std=None, threads=1, rows=None):
    """The kernel on images (n, H, W, C) in their own units, laid out as a model takes them; the result back in
    (n, H, W, C), normalised as the model takes it when ``mean`` and ``std`` are given."""
    n, h, w, c = x.shape
    flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2) if channels_first else x).reshape(n, -1)
    prepared = prepare(family, height=h, width=w, channels=c, seed=seed, channels_first=channels_first, mean=mean,
                       std=std, top=top, integer=integer)
    rws = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    out = np.empty((rws.size, flat.shape[1]), np.float32)
    prepared.perturb(flat, rws, np.asarray(steps, np.int64)[rws], np.asarray(indices, np.int64), out,
                     threads=threads)
    return out.reshape(rws.size, c, h, w).transpose(0, 2, 3, 1) if channels_first else out.reshape(rws.size, h, w, c)


def _want(text, params, x, *, seed=5, top=1.0, integer=False, indices=IDX, steps=STEPS):
    name = text.partition(":")[0]
    return np.stack([naive.family_image(name, params, x[i], seed=seed, index=int(indices[i]), step=int(steps[i]),
                                        top=top, integer=integer) for i in range(x.shape[0])])


def _check(text, got, want, top=1.0, extra=0.0):
    tol = TOLERANCE.get(text.partition(":")[0], 0.0) * top + extra
    if tol == 0:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("text,params", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (9, 9, 2)], ids=["28x28x1", "32x32x3", "9x9x2"])
def test_family_matches_its_naive_reference(text, params, shape):
    x = _images(4, *shape)
    _check(text, _run(parse(text), x), _want(text, params, x))


@pytest.mark.parametrize("text,params", CASES, ids=[c[0] for c in CASES])
def test_family_at_224x224_rgb(text, params):
    x = _images(1, 224, 224, 3)
    _check(text, _run(parse(text), x, indices=IDX[:1], steps=STEPS[:1]),
           _want(text, params, x, indices=IDX[:1], steps=STEPS[:1]))


@pytest.mark.parametrize("text,params", CASES, ids=[c[0] for c in CASES])
def test_channels_first_and_last_see_the_same_image(text, params):
    x = _images(4, 8, 8, 3)
    family = parse(text)
    np.testing.assert_array_equal(_run(family, x, channels_first=True), _run(family, x, channels_first=False))


@pytest.mark.parametrize("text,params", CASES, ids=[c[0] for c in CASES])
def test_integer_inputs_get_whole_numbers_in_range(text, params):
    x = _images(4, 12, 12, 3, top=255, integer=True)
    got = _run(parse(text), x, top=255, integer=True)
    assert np.all(got == np.rint(got)) and got.min() >= 0 and got.max() <= 255
    # a normal rounding to a whole number can land either side of .5 when the quantiles differ in the 9th digit
    _check(text, got, _want(text, params, x, top=255, integer=True), top=0, extra=1.0 if text in TOLERANCE else 0)


@pytest.mark.parametrize("text,params", CASES, ids=[c[0] for c in CASES])
def test_values_stay_in_the_pixel_range(text, params):
    x = _images(4, 10, 10, 1)
    x[0] = 0.0
    x[1] = 1.0
    got = _run(parse(text), x)
    assert got.min() >= 0.0 and got.max() <= 1.0


@pytest.mark.parametrize("text,params", CASES, ids=[c[0] for c in CASES])
def test_normalisation_applies_to_the_noisy_image_as_numpy_applies_it(text, params):
    x = _images(4, 7, 7, 2)
    mean, std = np.array([0.1307, 0.5], np.float32), np.array([0.3081, 0.25], np.float32)
    got = _run(parse(text), x, mean=mean, std=std)
    np.testing.assert_array_equal(got, (_run(parse(text), x) - mean) / std)  # what replay feeds the model
    _check(text, got, (_want(text, params, x) - mean) / std, top=1 / 0.25)


@pytest.mark.parametrize("text,params", CASES, ids=[c[0] for c in CASES])
def test_results_do_not_depend_on_the_batch_or_threads(text, params):
    x = _images(7, 6, 6, 1)
    idx, steps = np.arange(7) * 11, np.array([0, 1, 2, 3, 4, 5, 6])
    family = parse(text)
    whole = _run(family, x, indices=idx, steps=steps)
    parallel = _run(family, x, indices=idx, steps=steps, threads=2)
    np.testing.assert_array_equal(whole, parallel)
    for i in range(7):
        one = _run(family, x, indices=idx, steps=steps, rows=[i])
        np.testing.assert_array_equal(one[0], whole[i])
    np.testing.assert_array_equal(whole[0], x[0])  # step 0 is the clean image


def test_steps_and_images_get_independent_draws():
    x = np.full((3, 8, 8, 1), 0.5, np.float32)
    g = parse("gaussian:sigma=0.1")
    a = _run(g, x, indices=[1, 1, 2], steps=[1, 2, 1])
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
    b = _run(g, x, indices=[1, 1, 2], steps=[1, 2, 1], seed=6)
    assert not np.array_equal(a, b)


def test_gaussian_and_uniform_values_have_their_distributions():
    x = np.full((1, 64, 64, 1), 0.5, np.float32)
    z = (_run(parse("gaussian:sigma=0.05"), x, indices=[0], steps=[1]) - 0.5).ravel() / 0.05
    assert stats.kstest(z, "norm").pvalue > 1e-3
    u = (_run(parse("uniform:eps=0.2"), x, indices=[0], steps=[1]) - 0.5).ravel()
    assert stats.kstest(u, stats.uniform(-0.2, 0.4).cdf).pvalue > 1e-3


def test_l2_noise_has_its_norm_before_clipping():
    x = np.full((2, 16, 16, 3), 0.5, np.float32)
    d = _run(parse("l2:eps=1.5"), x, indices=[0, 1], steps=[1, 1]) - 0.5
    np.testing.assert_allclose(np.linalg.norm(d.reshape(2, -1), axis=1), 1.5, rtol=1e-5)
    radii = [np.linalg.norm((_run(parse("l2:eps=1,shape=ball"), x[:1], indices=[i], steps=[1]) - 0.5).ravel())
             for i in range(200)]
    # uniform in the 768-dimensional ball: the radius is eps * U**(1/768), so P(r < 0.99) = 0.99**768
    assert max(radii) <= 1 + 1e-5 and np.mean(np.array(radii) < 0.99) < 0.05


def test_impulse_and_dropout_hit_their_share_of_pixels():
    x = np.full((1, 100, 100, 3), 0.5, np.float32)
    got = _run(parse("impulse:density=0.2"), x, indices=[0], steps=[1])[0]
    hit = (got != 0.5).any(axis=-1)
    assert abs(hit.mean() - 0.2) < 0.02
    assert np.all((got[hit] == 0) | (got[hit] == 1)) and np.all(got[hit].min(axis=-1) == got[hit].max(axis=-1))
    assert abs((got[hit][:, 0] == 1).mean() - 0.5) < 0.05
    drop = _run(parse("dropout:rate=0.3"), x, indices=[0], steps=[1])[0]
    assert abs((drop == 0).all(axis=-1).mean() - 0.3) < 0.02


def test_patch_positions_and_shifts_cover_every_choice_uniformly():
    x = np.ones((1, 6, 6, 1), np.float32)
    corners = []
    for s in range(1, 601):
        got = _run(parse("patch:size=4"), x, indices=[0], steps=[s])[0, ..., 0]
        ys, xs = np.nonzero(got == 0)
        assert len(ys) == 16
        corners.append((ys.min(), xs.min()))
    counts = np.bincount([3 * a + b for a, b in corners], minlength=9)
    assert counts.min() > 0 and stats.chisquare(counts).pvalue > 1e-3
    img = np.arange(49, dtype=np.float32).reshape(1, 7, 7, 1) / 48
    seen = set()
    for s in range(1, 400):
        got = _run(parse("translate:shift=1"), img, indices=[0], steps=[s])[0, ..., 0]
        seen.add(next((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                      if np.array_equal(got[max(dy, 0):7 + min(dy, 0), max(dx, 0):7 + min(dx, 0)],
                                        img[0, max(-dy, 0):7 - max(dy, 0), max(-dx, 0):7 - max(dx, 0), 0])))
    assert seen == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} - {(0, 0)}


def test_dihedral_draws_every_element_and_never_the_identity():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 15
    results = {_run(parse("dihedral:group=d4"), img, indices=[0], steps=[s])[0].tobytes() for s in range(1, 200)}
    assert len(results) == 7 and img[0].tobytes() not in results


def test_rotation_turns_counter_clockwise_and_keeps_the_centre():
    img = np.zeros((1, 9, 9, 1), np.float32)
    img[0, 4, 4] = 1.0
    got = _run(parse("rotate:degrees=30"), img, indices=[0], steps=[1])[0, ..., 0]
    assert got[4, 4] == pytest.approx(1.0)
    bar = np.zeros((1, 21, 21, 1), np.float32)
    bar[0, 10, 12:] = 1.0  # a bar pointing right from the centre
    for s in range(1, 30):
        family = parse("rotate:degrees=90")
        out = _run(family, bar, indices=[0], steps=[s])[0, ..., 0]
        t = 90 * (2 * naive.uniforms(5, 0, s, 1)[0] - 1)
        if t > 45:  # turned counter-clockwise by more than 45 degrees: the bar now points up
            assert out[:10, 9:12].sum() > out[11:, 9:12].sum()


def test_grammar_round_trips_and_canonicalises():
    for text, _ in CASES:
        f = parse(text)
        assert parse(f.text()) == f
    assert parse(" Gaussian : sigma = 0.2 ") == parse("gaussian:sigma=0.2")
    assert parse("gaussian").text() == "gaussian:sigma=0.1"
    assert parse("patch:size=5,fill=random").text() == "patch:size=5,fill=random,value=0"
    assert isinstance(parse("rotate"), Family)
    assert set(FAMILIES) >= {"gaussian", "uniform", "l2", "shot", "speckle", "impulse", "dropout", "patch",
                             "translate", "dihedral", "rotate"}


@pytest.mark.parametrize("text,match", [
    ("gauss:sigma=0.1", r"unknown noise family 'gauss'; known: gaussian, uniform"),
    ("gaussian:sgma=0.1", r"gaussian has no parameter 'sgma'; its parameters: sigma"),
    ("gaussian:sigma", r"gaussian: parameters are written key=value; got 'sigma'"),
    ("gaussian:sigma=", r"parameters are written key=value"),
    ("gaussian:", r"gaussian: nothing after ':'"),
    ("gaussian:sigma=0.1,", r"an empty parameter"),
    ("gaussian:sigma=0.1,sigma=0.2", r"gaussian: sigma is given twice"),
    ("gaussian:sigma=abc", r"gaussian: sigma must be a number; got 'abc'"),
    ("gaussian:sigma=0", r"gaussian: sigma must be a number in \(0, 1\] of the pixel range; got 0"),
    ("gaussian:sigma=nan", r"sigma must be a number in \(0, 1\]"),
    ("shot:photons=1000", r"shot: photons must be a number in \[1, 500\]"),
    ("patch:size=2.5", r"patch: size must be an integer in \[1, 4096\] pixels; got 2.5"),
    ("patch:fill=noise", r"patch: fill must be one of constant, random; got 'noise'"),
    ("", r"a noise family is written name"),
])
def test_grammar_errors_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse(text)


@pytest.mark.parametrize("text,shape,match", [
    ("patch:size=9", (8, 8, 1), r"patch: size must be an integer in \[1, 8\] for 8x8 images; got 9"),
    ("translate:shift=8", (8, 4, 1), r"translate: shift must be an integer in \[1, 7\] for 8x4 images"),
    ("dihedral:group=d4", (8, 4, 1), r"needs square images; these are 8x4: use group=flips"),
])
def test_families_refuse_images_they_cannot_apply_to(text, shape, match):
    with pytest.raises(ValueError, match=match):
        prepare(parse(text), height=shape[0], width=shape[1], channels=shape[2], seed=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64\)"),
    ({"height": 0}, r"height must be an integer >= 1"),
    ({"top": 2}, r"top must be the pixel range, 1 or 255"),
])
def test_prepare_refuses_bad_geometry(kwargs, match):
    args = {"height": 4, "width": 4, "channels": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        prepare(parse("gaussian"), **args)
    with pytest.raises(ValueError, match="family must be a noise family"):
        prepare("gaussian", height=4, width=4, channels=1, seed=0)  # type: ignore[arg-type]
