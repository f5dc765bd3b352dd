"""The notebook API: evaluate(model, x, y) with arrays, a torch module directly, and a result object with numbers,
arrays and figures back."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

import pyrobust
from pyrobust.errors import DataError, InvalidInput, MissingDependency, OutputError

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier

FAST = dict(max_steps=20)


@pytest.fixture(scope="module")
def arrays(sample):
    ds = sample.select(limit=60)
    return ds.images[..., 0], ds.labels  # uint8 N×H×W, as a user holds MNIST


@pytest.fixture(scope="module")
def reference(bundled_model, sample):
    return pyrobust.evaluate(bundled_model, sample, limit=60, report=False, **FAST)


def test_arrays_in_every_documented_form_give_the_spec_run_results(bundled_model, arrays, reference):
    x, y = arrays
    forms = {"uint8 NxHxW": (x, y), "uint8 NxHxWx1": (x[..., None], y),
             "float32 0-1": (x.astype(np.float32) / np.float32(255), y)}
    for name, (xx, yy) in forms.items():
        ev = pyrobust.evaluate(bundled_model, xx, yy, **FAST)
        assert np.array_equal(ev.first_failure, reference.first_failure), name
    ev = pyrobust.evaluate(bundled_model, (x, y), **FAST)  # an (x, y) pair
    assert np.array_equal(ev.first_failure, reference.first_failure)
    assert ev.summary["dataset"]["spec"] == "arrays" and np.array_equal(ev.index, np.arange(60))


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((4, 1, 28, 28), np.uint8), [0] * 4, r"look channels-first .* x.transpose\(0, 2, 3, 1\)"),
    (np.zeros((4, 28, 28), np.int32), [0] * 4, "must be uint8 .* or float"),
    (np.full((4, 28, 28), 255.0), [0] * 4, r"float images must be in \[0, 1\] .* divide 0-255 pixels by 255"),
    (np.zeros((4, 28), np.uint8), [0] * 4, "N×H×W or N×H×W×C"),
    (np.zeros((4, 28, 28), np.uint8), [0] * 3, "one label per image"),
    (np.zeros((4, 28, 28), np.uint8), [0.5] * 4, "labels must be integers"),
])
def test_bad_arrays_are_refused_with_the_fix(bundled_model, x, y, match):
    with pytest.raises(DataError, match=match):
        pyrobust.evaluate(bundled_model, x, y, **FAST)


def test_labels_belong_to_arrays(bundled_model, arrays):
    with pytest.raises(InvalidInput, match=r"need their labels: evaluate\(model, x, y\)"):
        pyrobust.evaluate(bundled_model, arrays[0], **FAST)
    with pytest.raises(InvalidInput, match="carries its own labels"):
        pyrobust.evaluate(bundled_model, "sample", arrays[1], **FAST)


def test_the_result_object(bundled_model, reference, tmp_path):
    ev = reference
    text = repr(ev)
    assert "\n" not in text and len(text) < 200 and "accuracy" in text and "robust" in text
    assert ev.robust_fraction == ev.summary["metrics"]["robust"]["fraction"] == float(ev.robust.mean())
    assert ev.accuracy == pytest.approx(float((ev.first_failure != 0).mean()))
    fooled = int(ev.index[np.flatnonzero(ev.first_failure > 0)[0]])
    r = ev.failing_inputs(fooled)
    assert r.original.shape == r.perturbed.shape == (28, 28, 1) and r.original.dtype == np.float32
    assert r.step == ev.first_failure[fooled] and r.matches  # the model, asked again, is fooled the same way
    assert "\n" not in repr(r) and "pixels changed" in repr(r) and len(repr(r)) < 250
    at3 = ev.failing_inputs(fooled, step=1)
    assert at3.step == 1 and not np.array_equal(at3.perturbed, r.perturbed)
    robust = int(ev.index[np.flatnonzero(ev.robust)[0]])
    with pytest.raises(InvalidInput, match="pass step=S"):
        ev.failing_inputs(robust)
    for fig in (ev.plot_survival(), ev.plot_per_class(), ev.plot_examples(), ev.plot_failure(),
                ev.plot_failure(fooled), r.plot()):
        assert isinstance(fig, Figure) and fig.axes
    with pytest.raises(InvalidInput, match="has no failing input here"):
        ev.plot_failure(robust)


def test_to_dataframe(reference, monkeypatch):
    try:
        import pandas  # noqa: F401
    except ImportError:
        pandas = None
    if pandas is not None:
        df = reference.to_dataframe()
        assert len(df) == 60 and list(df.columns[:5]) == ["index", "label", "clean_prediction", "first_failure",
                                                          "failure_label"]
        assert df["robust"].mean() == reference.robust_fraction
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependency, match="pip install pandas"):
        reference.to_dataframe()


def test_rerunning_a_cell_with_out_says_what_to_pass(bundled_model, tmp_path):
    pyrobust.evaluate(bundled_model, "sample", limit=40, out=tmp_path / "r", report=False, **FAST)
    with pytest.raises(OutputError, match=r"pass overwrite=True to replace them"):
        pyrobust.evaluate(bundled_model, "sample", limit=40, out=tmp_path / "r", report=False, **FAST)
    again = pyrobust.evaluate(bundled_model, "sample", limit=40, out=tmp_path / "r", overwrite=True, report=False,
                              **FAST)
    assert again.failing_inputs(int(again.index[again.first_failure > 0][0])).matches


@pytest.mark.torch
def test_a_torch_module_directly(tmp_path, arrays):
    torch = pytest.importorskip("torch")
    from pyrobust.training import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    net.train()  # evaluate puts it in eval mode
    x, y = arrays
    ev = pyrobust.evaluate(net, x, y, **FAST)
    assert "Sequential (torch module)" in repr(ev) and ev.summary["model"]["path"] is None and not net.training
    export_onnx(net, (28, 28, 1), tmp_path / "net.onnx")
    via_file = pyrobust.evaluate(tmp_path / "net.onnx", x, y, **FAST)
    assert np.array_equal(ev.first_failure, via_file.first_failure)
    fooled = ev.index[ev.first_failure > 0]
    if fooled.size:
        assert ev.failing_inputs(int(fooled[0])).matches
