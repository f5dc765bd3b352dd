import warnings

import numpy as np
import pytest

from pyrobust.data.dataset import Dataset
from pyrobust.engine.loop import clean_predictions, run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import ModelError
from pyrobust.types import NoiseSpec
from tests.builders import synthetic

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier

torch = pytest.importorskip("torch", reason="the layout fixtures are exported from torch (pyrobust[train])")


def _export(module, example, path, *, dynamic=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"dynamic_shapes": {"image": {0: torch.export.Dim("batch", min=1)}}} if dynamic else {}
        prog = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"], output_names=["scores"],
                                 external_data=False, verbose=False, **kwargs)
    prog.save(str(path))
    return path


class _Layout(torch.nn.Module):
    """Feeds a NCHW network from another layout."""

    def __init__(self, net, layout, shape):
        super().__init__()
        self.net, self.layout, self.shape = net, layout, shape

    def forward(self, image):
        c, h, w = self.shape
        if self.layout == "NHWC":
            image = image.permute(0, 3, 1, 2)
        elif self.layout == "NHW":
            image = image.unsqueeze(1)
        elif self.layout == "NF":
            image = image.reshape(-1, h, w, c).permute(0, 3, 1, 2)
        out = self.net(image)
        return torch.softmax(out, dim=1) if self.layout == "probs" else out


def _net(c, n_classes=10):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(c, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.LazyLinear(n_classes))


@pytest.fixture(scope="module")
def layout_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    out = {}
    for c, (h, w) in ((1, (28, 28)), (3, (8, 6))):
        net = _net(c)
        net(torch.zeros(1, c, h, w))  # materialise the lazy layer
        net.eval()
        shapes = {"NCHW": (2, c, h, w), "NHWC": (2, h, w, c), "NF": (2, h * w * c), "probs": (2, c, h, w)}
        if c == 1:
            shapes["NHW"] = (2, h, w)
        for layout, shape in shapes.items():
            out[(c, layout)] = _export(_Layout(net, layout, (c, h, w)).eval(), torch.zeros(shape),
                                       d / f"c{c}_{layout}.onnx")
        out[(c, "batch1")] = _export(_Layout(net, "NCHW", (c, h, w)).eval(), torch.zeros(1, c, h, w),
                                     d / f"c{c}_batch1.onnx", dynamic=False)
    return out


def _labelled_by(model_path, ds: Dataset) -> Dataset:
    """The same images, labelled with the model's own clean predictions, so that every image starts correct."""
    y = clean_predictions(OnnxModel(model_path), ds).astype(np.int64)
    return Dataset(ds.name, ds.split, ds.images, y, ds.index, ds.source)


@pytest.mark.parametrize("channels,h,w", [(1, 28, 28), (3, 8, 6)])
def test_every_layout_gives_identical_results(layout_models, sample, channels, h, w):
    base = sample.select(limit=60) if channels == 1 else synthetic(n=60, h=h, w=w, c=3, seed=4)
    ds = _labelled_by(layout_models[(channels, "NCHW")], base)
    spec = NoiseSpec(pixels=min(28, h * w // 4), max_steps=30, seed=2)
    ref = run_protocol(OnnxModel(layout_models[(channels, "NCHW")]), ds, spec, batch_size=16)
    assert (ref.first_failure > 0).any()
    layouts = [k for k in layout_models if k[0] == channels and k[1] != "NCHW"]
    assert len(layouts) == (5 if channels == 1 else 4)
    for key in layouts:
        m = OnnxModel(layout_models[key])
        got = run_protocol(m, ds, spec, batch_size=16)
        layout = m.bind((h, w, channels), n_classes=10).binding.layout
        assert layout == {"NHWC": "NHWC", "NHW": "NHW", "NF": "NF"}.get(key[1], "NCHW"), key
        assert np.array_equal(got.first_failure, ref.first_failure), key
        assert np.array_equal(got.failure_label, ref.failure_label), key


def test_fixed_batch_one_model(layout_models, sample):
    m = OnnxModel(layout_models[(1, "batch1")])
    m = m.bind((28, 28, 1), n_classes=10)
    assert m.binding.fixed_batch == 1
    scores = m.run(m.to_flat(sample.float_images(0, 5)))
    assert scores.shape == (5, 10)


def test_torch_and_onnxruntime_agree(layout_models, sample):
    net = _net(1)
    net(torch.zeros(1, 1, 28, 28))
    net.eval()
    x = sample.float_images(0, 32)
    with torch.no_grad():
        want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    m = OnnxModel(layout_models[(1, "NCHW")])
    m = m.bind((28, 28, 1), n_classes=10)
    np.testing.assert_allclose(m.run(m.to_flat(x)), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["linear_nhwc", "linear_nhw", "linear_flat", "linear_b1"])
def test_hand_built_layouts_match_nchw(models, sample, name):
    ds = sample.select(limit=40)
    ref = clean_predictions(OnnxModel(models["linear_nchw"]), ds)
    assert np.array_equal(clean_predictions(OnnxModel(models[name]), ds), ref)


@pytest.mark.parametrize("name,match", [
    ("two_inputs", r"has 2 inputs \(x \[N, 1, 28, 28\], x2 \[N, 1, 28, 28\]\); pyrobust needs exactly one image input"),
    ("five_classes", r"outputs 5 classes but the labels need 10 \(0..9\)"),
    ("size_8x8", r"input 'x' has shape \[N, 1, 8, 8\], which does not fit the data"),
    ("rank3_output", r"output 'y3' has shape \[N, 10, 1\]; pyrobust needs N×classes scores"),
    ("bool_input", r"input 'x' has type tensor\(bool\); pyrobust feeds float images"),
    ("one_row", r"for a batch of 2 images output 'y' has shape \[1, 10\]"),
    ("custom_domain", r"custom operator domain\(s\) com.example.custom"),
    ("not_onnx", r"not an ONNX model"),
    ("truncated", r"not an ONNX model|invalid ONNX model"),
])
def test_unusable_models_fail_before_any_work(models, name, match):
    with pytest.raises(ModelError, match=match):
        OnnxModel(models[name]).bind((28, 28, 1), n_classes=10)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        OnnxModel(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a folder"):
        OnnxModel(tmp_path)


def test_session_settings_are_explicit(models):
    m = OnnxModel(models["linear_nchw"], threads=1)
    assert m.session.get_providers() == ["CPUExecutionProvider"]
    assert m.threads == 1 and m.spinning is False
