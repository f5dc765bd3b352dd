"""Every noise family through the engine: against the naive protocol, the same results whatever the batch, chunk,
threads, layout, sessions and Dask, replayed exactly (with normalisation, on RGB, on integer inputs), recorded in
summary.json and read back strictly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pyrobust
from perturbcore.families import parse
from pyrobust.cli import main
from pyrobust.compare import compare_runs
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import InvalidInput, PyRobustError
from pyrobust.types import NoiseSpec
from tests import naive
from tests.engine.test_engine import _predict_one
from tests.kernels.test_families import CASES

# Strong enough settings that each family fools the bundled CNN within a few steps on some images
ENGINE_CASES = [
    ("gaussian:sigma=0.4", {"sigma": 0.4}),
    ("uniform:eps=0.5", {"eps": 0.5}),
    ("l2:eps=9,shape=ball", {"eps": 9.0, "shape": "ball"}),
    ("shot:photons=2", {"photons": 2.0}),
    ("speckle:sigma=2", {"sigma": 2.0}),
    ("impulse:density=0.2", {"density": 0.2}),
    ("dropout:rate=0.5", {"rate": 0.5, "value": 0.0}),
    ("patch:size=12,fill=random", {"size": 12, "fill": "random"}),
    ("translate:shift=6", {"shift": 6, "value": 0.0}),
    ("dihedral:group=d4", {"group": "d4"}),
    ("rotate:degrees=60", {"degrees": 60.0, "value": 0.0}),
]
IDS = [c[0].partition(":")[0] for c in ENGINE_CASES]


def test_every_family_has_an_engine_case():
    assert {c[0].partition(":")[0] for c in CASES} == set(IDS)


def _same(a, b):
    for name in ("clean_prediction", "first_failure", "failure_label"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def runs(bundled_model, sample):
    """Each family on 40 images of the sample, 15 steps, batch 16 (the reference run of the other tests)."""
    ds = sample.select(start=40, stop=80)
    out = {}
    for text, _ in ENGINE_CASES:
        spec = NoiseSpec(max_steps=15, seed=3, corruption=text)
        out[text] = (spec, ds, run_protocol(OnnxModel(bundled_model, threads=1), ds, spec, batch_size=16))
    return out


@pytest.mark.parametrize("text,params", ENGINE_CASES, ids=IDS)
def test_each_family_matches_the_naive_protocol(bundled_model, runs, text, params):
    spec, ds, got = runs[text]
    clean, first, fail, _ = naive.family_protocol(_predict_one(bundled_model), ds.float_images(), ds.labels,
                                                  ds.index, name=text.partition(":")[0], params=params, seed=3,
                                                  max_steps=15)
    assert np.array_equal(got.clean_prediction, clean)
    assert np.array_equal(got.first_failure, first)
    assert np.array_equal(got.failure_label, fail)
    assert (first > 0).any(), "the case must fool the model somewhere to test anything"


@pytest.mark.parametrize("text,params", ENGINE_CASES, ids=IDS)
def test_failure_counts_under_each_family_match_the_naive_protocol(bundled_model, sample, text, params):
    ds = sample.select(start=40, stop=60)
    spec = NoiseSpec(max_steps=10, seed=3, corruption=text, count_failures=True)
    got = run_protocol(OnnxModel(bundled_model, threads=1), ds, spec, batch_size=64)
    _, first, _, count = naive.family_protocol(_predict_one(bundled_model), ds.float_images(), ds.labels,
                                               ds.index, name=text.partition(":")[0], params=params, seed=3,
                                               max_steps=10, count=True)
    assert np.array_equal(got.first_failure, first) and np.array_equal(got.failures, count)


@pytest.mark.parametrize("batch_size,chunk_size,threads,pack", [(1, 4096, 1, True), (7, 9, 2, True),
                                                                 (256, 4096, 2, True), (16, 4096, 1, False)])
@pytest.mark.parametrize("text", [c[0] for c in ENGINE_CASES], ids=IDS)
def test_results_do_not_depend_on_batch_chunk_threads_or_packing(bundled_model, runs, text, batch_size, chunk_size,
                                                                 threads, pack):
    spec, ds, ref = runs[text]
    got = run_protocol(OnnxModel(bundled_model, threads=threads), ds, spec, batch_size=batch_size,
                       chunk_size=chunk_size, pack=pack)
    _same(got, ref)


@pytest.mark.parametrize("text", [c[0] for c in ENGINE_CASES], ids=IDS)
def test_channels_first_and_last_models_get_the_same_noise(models, sample, text):
    ds = sample.select(limit=60)
    spec = NoiseSpec(max_steps=20, seed=1, corruption=text)
    a = run_protocol(OnnxModel(models["linear_nchw"], threads=1), ds, spec, batch_size=32)
    b = run_protocol(OnnxModel(models["linear_nhwc"], threads=1), ds, spec, batch_size=32)
    _same(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("text", ["gaussian:sigma=0.4", "patch:size=12,fill=random", "rotate:degrees=60"])
@pytest.mark.parametrize("layout", [dict(sessions=2, threads=2, shard_size=7), dict(scheduler="local:2",
                                                                                   shard_size=37)],
                         ids=["sessions", "dask"])
def test_results_are_bit_identical_across_sessions_and_dask(bundled_model, text, layout):
    kw = dict(limit=120, max_steps=20, seed=4, noise=text)
    ref = pyrobust.evaluate(bundled_model, "sample", sessions=1, batch_size=64, **kw).outcome
    got = pyrobust.evaluate(bundled_model, "sample", batch_size=32, **layout, **kw).outcome
    _same(got, ref)
    assert (got.first_failure > 0).any()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, bundled_model):
    """Each family's run written to a results folder."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for text, _ in ENGINE_CASES:
        folder = root / text.partition(":")[0]
        ev = pyrobust.evaluate(bundled_model, "sample", limit=60, max_steps=20, seed=2, noise=text, out=folder,
                               report=False, batch_size=32, sessions=1)
        out[text] = (folder, ev)
    return out


@pytest.mark.parametrize("text", [c[0] for c in ENGINE_CASES], ids=IDS)
def test_every_first_failure_replays_exactly(recorded, text):
    folder, ev = recorded[text]
    fooled = np.flatnonzero(ev.outcome.first_failure > 0)
    assert fooled.size
    for i in fooled[:8]:
        r = pyrobust.replay(folder, index=int(ev.outcome.index[i]))
        assert r.matches, (text, int(ev.outcome.index[i]))
        assert r.prediction == ev.outcome.failure_label[i]
    robust = np.flatnonzero(ev.outcome.first_failure == -1)
    if robust.size:  # a step an image survived replays as survived
        r = pyrobust.replay(folder, index=int(ev.outcome.index[robust[0]]), step=5)
        assert r.matches and r.prediction == ev.outcome.label[robust[0]]


@pytest.mark.parametrize("text", [c[0] for c in ENGINE_CASES], ids=IDS)
def test_the_family_is_recorded_and_read_back(recorded, text):
    folder, ev = recorded[text]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["noise"]["corruption"] == parse(text).text()
    record = pyrobust.load_results(folder)
    assert record.noise.corruption == parse(text)


def test_a_tampered_family_is_refused_on_load(recorded, tmp_path):
    import shutil

    folder, _ = recorded["gaussian:sigma=0.4"]
    for bad, message in (("gaussian:sigma=7", r"sigma must be a number in \(0, 1\]"),
                         ("fog:density=1", r"unknown noise family 'fog'"), (3, r"corruption must be written as text")):
        copy = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, copy)
        summary = json.loads((copy / "summary.json").read_text())
        summary["noise"]["corruption"] = bad
        (copy / "summary.json").write_text(json.dumps(summary))
        with pytest.raises(PyRobustError, match=message):
            pyrobust.load_results(copy)


def test_a_run_with_another_family_never_pairs(recorded):
    a, _ = recorded["gaussian:sigma=0.4"]
    b, _ = recorded["uniform:eps=0.5"]
    with pytest.raises(PyRobustError, match=r"corruption 'gaussian:sigma=0.4' → 'uniform:eps=0.5'"):
        compare_runs(a, b)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """A small random-weight RGB CNN at 32×32, exported by torch's exporter, that normalises its input."""
    torch = pytest.importorskip("torch", reason="the RGB model is exported from torch (pip install pyrobust[train])")
    from pyrobust.training import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    path = tmp_path_factory.mktemp("rgb") / "rgb32.onnx"
    export_onnx(net, (32, 32, 3), path)
    x = np.random.default_rng(0).random((80, 32, 32, 3), dtype=np.float32)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    xn = (x - np.float32(mean)) / np.float32(std)
    with torch.no_grad():
        y = net(torch.from_numpy(xn.transpose(0, 3, 1, 2))).argmax(1).numpy()
    return path, x, y, mean, std


@pytest.mark.parametrize("text", [c[0] for c in ENGINE_CASES], ids=IDS)
def test_rgb_32x32_with_normalisation_replays_exactly(rgb_model, tmp_path, text):
    path, x, y, mean, std = rgb_model
    text = text.replace("patch:size=12", "patch:size=10").replace("translate:shift=6", "translate:shift=4")
    ev = pyrobust.evaluate(path, x, y, max_steps=20, noise=text, mean=mean, std=std, out=tmp_path / "r",
                           report=False, batch_size=32, sessions=1)
    assert ev.outcome.correct.all()  # labels are the model's own clean predictions
    fooled = np.flatnonzero(ev.outcome.first_failure > 0)
    for i in fooled[:5]:
        assert pyrobust.replay(tmp_path / "r", index=int(ev.outcome.index[i])).matches
    ref = run_protocol(OnnxModel(path, threads=1), ev.dataset, NoiseSpec(max_steps=20, corruption=text, mean=mean,
                                                                        std=std), batch_size=7)
    _same(ref, ev.outcome)


def test_integer_input_models_get_whole_number_noise(tmp_path, bundled_model):
    from tests.engine.test_exporters import _prefixed

    model = _prefixed(tmp_path / "u8.onnx", bundled_model, uint8=True)
    ev = pyrobust.evaluate(model, "sample", limit=60, max_steps=20, noise="gaussian:sigma=0.4", out=tmp_path / "o",
                           report=False, sessions=1)
    fooled = np.flatnonzero(ev.outcome.first_failure > 0)
    r = pyrobust.replay(tmp_path / "o", index=int(ev.outcome.index[fooled[0]]))
    assert r.matches
    raw = r.perturbed * 255
    assert np.allclose(raw, np.round(raw), atol=1e-3) and raw.min() >= 0 and raw.max() <= 255


@pytest.mark.parametrize("kwargs,match", [
    ({"noise": "gaussian:sigma=0.1", "pixels": 10}, r"pixels set the L0 noise; the gaussian noise has its own "
                                                    r"parameters \(gaussian:sigma=0.1\): leave pixels unset"),
    ({"noise": "gaussian", "scheme": "salt-pepper", "high": 0.5}, r"high, scheme set the L0 noise|scheme, high set"),
    ({"noise": "rotate", "mode": "cumulative"}, r"random walk \(mode=cumulative\) is the L0 noise's"),
    ({"noise": "patch:size=40"}, r"patch: size must be an integer in \[1, 28\] for 28x28 images; got 40"),
    ({"noise": "blur"}, r"unknown noise family 'blur'"),
])
def test_bad_family_settings_are_refused_before_work(bundled_model, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        pyrobust.evaluate(bundled_model, "sample", limit=10, max_steps=2, **kwargs)


def test_the_cli_takes_a_family_and_refuses_a_bad_one(bundled_model, tmp_path, capsys):
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "40", "--max-steps", "10",
                 "--noise", "speckle:sigma=1.5", "--out", str(tmp_path / "a"), "--no-report", "--sessions", "1"])
    assert code == 0
    assert "speckle:sigma=1.5, 10 steps" in capsys.readouterr().out
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--noise", "speckle:sigma=9",
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "speckle: sigma must be a number in (0, 5]" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--noise", "gaussian", "--pixels", "5",
                 "--out", str(tmp_path / "c")])
    assert code == 2 and "leave pixels unset" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- severity sweeps
from perturbcore.families import FAMILIES as _ALL  # noqa: E402
from perturbcore.families import LEVELS, Sweep  # noqa: E402

SWEEPS = [name for name, cls in _ALL.items() if issubclass(cls, Sweep)]
GREY_SWEEPS = [name for name in SWEEPS if name != "saturate"]


def _first_failing(predict_one, images, labels, name, **kw):
    out = []
    for img, y in zip(images, labels, strict=True):
        if predict_one(img) != y:
            out.append(0)
            continue
        out.append(next((s for s in range(1, LEVELS + 1)
                         if predict_one(naive.sweep_image(name, img, s, **kw)) != y), -1))
    return np.array(out)


@pytest.mark.parametrize("name", GREY_SWEEPS)
def test_sweeps_record_the_first_failing_severity(bundled_model, sample, name):
    ds = sample.select(limit=80)
    got = run_protocol(OnnxModel(bundled_model, threads=1), ds, NoiseSpec(corruption=name), batch_size=32)
    want = _first_failing(_predict_one(bundled_model), ds.float_images(), ds.labels, name)
    assert np.array_equal(got.first_failure, want)
    assert got.first_failure.max() <= LEVELS
    again = run_protocol(OnnxModel(bundled_model, threads=2), ds, NoiseSpec(corruption=name), batch_size=7)
    _same(again, got)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweeps_on_rgb_with_normalisation_replay_exactly(rgb_model, tmp_path, name):
    path, x, y, mean, std = rgb_model
    ev = pyrobust.evaluate(path, x, y, noise=name, mean=mean, std=std, out=tmp_path / "r", report=False,
                           batch_size=16, sessions=1)
    assert ev.noise.max_steps == LEVELS and ev.summary["severity"]["levels"][0]["severity"] == 1
    for i in np.flatnonzero(ev.outcome.first_failure > 0)[:4]:
        r = pyrobust.replay(tmp_path / "r", index=int(ev.outcome.index[i]))
        assert r.matches and r.step == ev.outcome.first_failure[i]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, bundled_model):
    folder = tmp_path_factory.mktemp("sweep") / "contrast"
    ev = pyrobust.evaluate(bundled_model, "sample", noise="contrast", out=folder, sessions=1)
    return folder, ev


def test_a_sweep_summary_speaks_of_severities_not_probabilities(swept):
    folder, ev = swept
    s = json.loads((folder / "summary.json").read_text())
    assert s["failure_probability"] is None and s["noise"]["max_steps"] == LEVELS
    sev = s["severity"]
    assert [lv["severity"] for lv in sev["levels"]] == [1, 2, 3, 4, 5]
    assert sev["levels"][4]["setting"] == "keep=0.15"
    ff = ev.outcome.first_failure
    assert [lv["first_failing"] for lv in sev["levels"]] == [int((ff == k).sum()) for k in range(1, 6)]
    assert sev["survive_all"] == int((ff == -1).sum()) and sum(lv["first_failing"] for lv in sev["levels"]) > 0
    with np.load(folder / "results.npz") as z:
        assert "failure_probability" not in z.files
    with pytest.raises(InvalidInput, match="contrast is a severity sweep, deterministic"):
        ev.failure_probability  # noqa: B018
    assert "p_hat" not in ev.to_dataframe().columns
    assert (folder / "failure_probability.png").exists()  # the first-failing-severity chart


def test_a_sweep_with_probabilities_added_is_refused(swept, tmp_path):
    import shutil

    folder, ev = swept
    copy = tmp_path / "c"
    shutil.copytree(folder, copy)
    with np.load(copy / "results.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["failure_probability"] = np.zeros(ev.outcome.n)
    np.savez(copy / "results.npz", **arrays)
    with pytest.raises(PyRobustError, match="'failure_probability' in a severity sweep"):
        pyrobust.load_results(copy)


def test_a_sweeps_steps_are_its_severities(bundled_model):
    with pytest.raises(InvalidInput, match=r"contrast is a severity sweep: its 5 steps are its 5 severities, so "
                                           r"max_steps is 5; got 10"):
        NoiseSpec(corruption="contrast", max_steps=10)
    assert NoiseSpec(corruption="contrast").max_steps == LEVELS
    assert NoiseSpec(corruption="contrast", max_steps=5).max_steps == LEVELS


@pytest.mark.slow
def test_a_sweep_is_identical_across_sessions_and_dask(bundled_model):
    ref = pyrobust.evaluate(bundled_model, "sample", noise="pixelate", sessions=1, batch_size=64).outcome
    for layout in (dict(sessions=2, threads=2, shard_size=7), dict(scheduler="local:2", shard_size=37)):
        _same(pyrobust.evaluate(bundled_model, "sample", noise="pixelate", batch_size=32, **layout).outcome, ref)
