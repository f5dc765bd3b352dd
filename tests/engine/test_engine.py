import numpy as np
import onnxruntime as ort
import pytest

from pyrobust.data.dataset import Dataset
from pyrobust.engine.loop import clean_predictions, run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import InvalidInput
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec
from tests import naive
from tests.builders import synthetic


def _predict_one(path, layout=(1, 28, 28), mean=None, std=None):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def predict(img):
        x = img if mean is None else (img - np.float32(mean)) / np.float32(std)
        scores = sess.run(None, {name: x.reshape((1, *layout)).astype(np.float32)})[0][0]
        return int(np.argmax(scores)) if np.isfinite(scores).all() else NONFINITE

    return predict


def _outcome_arrays(o):
    return o.clean_prediction, o.first_failure, o.failure_label


@pytest.mark.slow
@pytest.mark.parametrize("scheme,mode,count", [("uniform", "restart", "fixed"), ("salt-pepper", "restart", "fixed"),
                                               ("uniform", "cumulative", "fixed"), ("uniform", "restart", "random"),
                                               ("salt-pepper", "cumulative", "random")])
def test_engine_matches_naive_protocol(bundled_model, sample, scheme, mode, count):
    ds = sample.select(start=40, stop=80)  # holds images wrong before noise, fooled ones and robust ones
    spec = NoiseSpec(pixels=28, max_steps=25, seed=3, scheme=scheme, mode=mode, pixel_count=count)
    got = run_protocol(OnnxModel(bundled_model, threads=1), ds, spec, batch_size=16)
    want = naive.protocol(_predict_one(bundled_model), ds.float_images(), ds.labels, ds.index, seed=3, pixels=28,
                          max_steps=25, scheme=scheme, mode=mode, random_count=count == "random")
    for g, w in zip(_outcome_arrays(got), want, strict=True):
        assert np.array_equal(g, w)
    # the run covers every outcome: wrong before noise, fooled, robust
    assert {0, ROBUST} <= set(got.first_failure.tolist()) and (got.first_failure > 0).any()


def test_engine_with_normalisation_matches_naive(bundled_model, sample):
    ds = sample.select(limit=20)
    spec = NoiseSpec(pixels=10, max_steps=10, seed=1, mean=(0.1,), std=(0.9,))
    got = run_protocol(OnnxModel(bundled_model), ds, spec, batch_size=8)
    want = naive.protocol(_predict_one(bundled_model, mean=0.1, std=0.9), ds.float_images(), ds.labels, ds.index,
                          seed=1, pixels=10, max_steps=10)
    for g, w in zip(_outcome_arrays(got), want, strict=True):
        assert np.array_equal(g, w)


@pytest.fixture(scope="module")
def reference_run(bundled_model, sample):
    spec = NoiseSpec(pixels=28, max_steps=60, seed=5)
    return spec, run_protocol(OnnxModel(bundled_model, threads=2), sample.select(limit=300), spec, batch_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_results_do_not_depend_on_batch_size(bundled_model, sample, reference_run, batch_size):
    spec, ref = reference_run
    ds = sample.select(limit=300 if batch_size > 1 else 60)
    got = run_protocol(OnnxModel(bundled_model, threads=2), ds, spec, batch_size=batch_size, chunk_size=37)
    for g, r in zip(_outcome_arrays(got), _outcome_arrays(ref), strict=True):
        assert np.array_equal(g, r[: ds.n])


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_threads(bundled_model, sample, reference_run, threads):
    spec, ref = reference_run
    got = run_protocol(OnnxModel(bundled_model, threads=threads), sample.select(limit=300), spec)
    for g, r in zip(_outcome_arrays(got), _outcome_arrays(ref), strict=True):
        assert np.array_equal(g, r)


def test_a_subset_gets_the_same_per_image_results(bundled_model, sample, reference_run):
    spec, ref = reference_run
    got = run_protocol(OnnxModel(bundled_model), sample.select(start=100, stop=200), spec, batch_size=32)
    assert np.array_equal(got.index, np.arange(100, 200))
    for g, r in zip(_outcome_arrays(got), _outcome_arrays(ref), strict=True):
        assert np.array_equal(g, r[100:200])


@pytest.mark.slow
def test_image_order_does_not_matter(bundled_model, sample, reference_run):
    spec, ref = reference_run
    ds = sample.select(limit=300)
    perm = np.random.default_rng(0).permutation(ds.n)
    shuffled = Dataset(ds.name, ds.split, ds.images[perm], ds.labels[perm], ds.index[perm], ds.source)
    got = run_protocol(OnnxModel(bundled_model), shuffled, spec, batch_size=50)
    for g, r in zip(_outcome_arrays(got), _outcome_arrays(ref), strict=True):
        assert np.array_equal(g, r[perm])


@pytest.mark.slow
def test_different_seeds_give_different_noise(bundled_model, sample, reference_run):
    spec, ref = reference_run
    other = NoiseSpec(pixels=28, max_steps=60, seed=6)
    got = run_protocol(OnnxModel(bundled_model), sample.select(limit=300), other)
    assert not np.array_equal(got.first_failure, ref.first_failure)


def test_robust_by_construction_and_wrong_before_noise(models):
    ds = synthetic(n=12, label=[3] * 8 + [1] * 4)
    out = run_protocol(OnnxModel(models["constant3"]), ds, NoiseSpec(max_steps=7), batch_size=5, pack=False)
    assert out.first_failure.tolist() == [ROBUST] * 8 + [0] * 4
    assert out.failure_label.tolist() == [ROBUST] * 8 + [3] * 4
    assert out.clean_prediction.tolist() == [3] * 12
    # clean pass for all 12, then 7 steps for each of the 8 robust ones
    assert out.inferences == 12 + 8 * 7 and out.noisy_inferences == 8 * 7


def test_any_noise_fools_at_step_one(models):
    ds = synthetic(n=9, zeros=True, label=0)
    spec = NoiseSpec(low=0.5, high=1.0, max_steps=250)
    out = run_protocol(OnnxModel(models["any_noise"]), ds, spec, pack=False)
    assert out.first_failure.tolist() == [1] * 9
    assert out.failure_label.tolist() == [1] * 9
    assert out.inferences == 18  # images leave the batch the moment they are fooled
    packed = run_protocol(OnnxModel(models["any_noise"]), ds, spec, batch_size=256)
    assert packed.first_failure.tolist() == [1] * 9 and packed.inferences == 256  # one packed batch


def test_non_finite_outputs_are_their_own_failure(models):
    ds = synthetic(n=6, zeros=True, label=0)
    out = run_protocol(OnnxModel(models["inf_on_one"]), ds, NoiseSpec(scheme="salt-pepper", max_steps=5))
    assert out.clean_prediction.tolist() == [0] * 6
    assert out.first_failure.tolist() == [1] * 6
    assert out.failure_label.tolist() == [NONFINITE] * 6
    out = run_protocol(OnnxModel(models["nan"]), synthetic(n=4, label=0), NoiseSpec(max_steps=5))
    assert out.first_failure.tolist() == [0] * 4 and out.clean_prediction.tolist() == [NONFINITE] * 4


def test_max_steps_one_and_pixels_all(bundled_model, sample):
    ds = sample.select(limit=30)
    out = run_protocol(OnnxModel(bundled_model), ds, NoiseSpec(pixels=784, max_steps=1))
    assert set(out.first_failure.tolist()) <= {ROBUST, 0, 1}


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
])
def test_engine_rejects_bad_sizes(bundled_model, sample, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        run_protocol(OnnxModel(bundled_model), sample.select(limit=2), NoiseSpec(), **kwargs)


def test_pixels_beyond_the_image_is_refused(bundled_model, sample):
    with pytest.raises(InvalidInput, match=r"pixels must be an integer in \[1, 784\] for 28x28 images; got 785"):
        run_protocol(OnnxModel(bundled_model), sample.select(limit=2), NoiseSpec(pixels=785))


def test_normalisation_needs_one_value_per_channel(bundled_model, sample):
    with pytest.raises(InvalidInput, match="mean needs 1 or 1 values for 1-channel images; got 2"):
        run_protocol(OnnxModel(bundled_model), sample.select(limit=2), NoiseSpec(mean=(0.1, 0.2), std=(1.0, 1.0)))


def test_clean_predictions(bundled_model, sample):
    ds = sample.select(limit=50)
    p = clean_predictions(OnnxModel(bundled_model), ds, batch_size=16)
    want = [_predict_one(bundled_model)(img) for img in ds.float_images()]
    assert p.tolist() == want


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [7, 64, 256, 1000])
@pytest.mark.parametrize("mode", ["restart", "cumulative"])
def test_step_packing_is_bit_identical(bundled_model, sample, batch_size, mode):
    ds = sample.select(start=40, stop=140)
    spec = NoiseSpec(max_steps=80, seed=2, mode=mode)
    plain = run_protocol(OnnxModel(bundled_model), ds, spec, batch_size=batch_size, pack=False)
    packed = run_protocol(OnnxModel(bundled_model), ds, spec, batch_size=batch_size, pack=True)
    for g, r in zip(_outcome_arrays(packed), _outcome_arrays(plain), strict=True):
        assert np.array_equal(g, r)
    if mode == "restart" and batch_size > 100:
        assert packed.inferences > plain.inferences  # the tail was packed


def test_packed_rows_never_pass_max_steps():
    from pyrobust.engine.loop import _batch_rows

    slot_step = np.array([0, 5, 9, 10, 3])
    rows = np.array([0, 2, 3])
    slots, steps = _batch_rows(rows, slot_step, batch_size=10, max_steps=10, pack=True)
    assert slots.tolist() == [0, 0, 0, 0, 2, 2, 3]
    assert steps.tolist() == [0, 1, 2, 3, 9, 10, 10]
    slots, steps = _batch_rows(rows, slot_step, batch_size=2, max_steps=10, pack=True)
    assert slots.tolist() == [0, 2, 3] and steps.tolist() == [0, 9, 10]


def test_a_bound_model_is_evaluated_like_the_loaded_one(bundled_model, sample):
    """A BoundModel (what bind() returns) is a model evaluate() takes too: bound again to the data, same results."""
    import pyrobust
    from pyrobust.engine.runtime import OnnxModel

    loaded = OnnxModel(bundled_model, threads=1)
    bound = loaded.bind((28, 28, 1), n_classes=10)
    a = pyrobust.evaluate(bound, sample, limit=30, max_steps=8, report=False)
    b = pyrobust.evaluate(loaded, sample, limit=30, max_steps=8, report=False)
    assert np.array_equal(a.first_failure, b.first_failure) and a.model.binding == bound.binding
