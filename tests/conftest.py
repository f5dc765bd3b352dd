"""Shared fixtures: hand-built ONNX models whose behaviour is known by construction, tiny torch models exported
to every supported input layout, and small datasets."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyrobust.data.dataset import Dataset
from pyrobust.data.load import bundled_sample
from tests.builders import image_input, linear_nodes, logits_output, save_model, synthetic, tensor  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PYROBUST_TEST_DATA", ROOT.parent / "shared" / "data"))
BUNDLED_MODEL = resources.files("pyrobust") / "assets" / "mnist-cnn.onnx"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Measured batch sizes and layouts go to a cache of this test session, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """ONNX models built node by node, each with a behaviour the tests rely on."""
    d = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    # Always class 3, whatever the input: robust by construction for images labelled 3.
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
             helper.make_node("Reshape", ["s", "shape"], ["s2"]),
             helper.make_node("Mul", ["s2", "zero"], ["z"]),
             helper.make_node("Add", ["z", "const"], ["y"])]
    const = np.zeros((1, 10), np.float32)
    const[0, 3] = 1.0
    inits = [tensor("zero", np.zeros((1, 10))), tensor("const", const),
             helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1])]
    out["constant3"] = save_model(d / "constant3.onnx", nodes, [image_input()], [logits_output()], inits)
    # logits = [0.5, sum(x)]: class 0 on an all-zero image, class 1 once any pixel adds up to more than 0.5.
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
             helper.make_node("Unsqueeze", ["s", "one"], ["s2"]),
             helper.make_node("Mul", ["s2", "half_mask"], ["a"]),
             helper.make_node("Add", ["a", "base"], ["y"])]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             tensor("half_mask", np.array([[0.0, 1.0]])), tensor("base", np.array([[0.5, 0.0]]))]
    out["any_noise"] = save_model(d / "any_noise.onnx", nodes, [image_input()], [logits_output(2)], inits)
    # logits = [1, log(1 - max(x))]: finite on values < 1, -inf where a pixel is exactly 1 (salt-and-pepper's high).
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Sub", ["onef", "m"], ["r"]),
             helper.make_node("Log", ["r"], ["l"]),
             helper.make_node("Reshape", ["l", "shape"], ["l2"]),
             helper.make_node("Mul", ["l2", "mask"], ["a"]),
             helper.make_node("Add", ["a", "base"], ["y"])]
    inits = [tensor("onef", np.array(1.0)), helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
             tensor("mask", np.array([[0.0, 1.0]])), tensor("base", np.array([[1.0, 0.0]]))]
    out["inf_on_one"] = save_model(d / "inf_on_one.onnx", nodes, [image_input()], [logits_output(2)], inits)
    # NaN for every input.
    nodes, inits = linear_nodes(np.full((784, 10), np.nan), np.zeros(10))
    out["nan"] = save_model(d / "nan.onnx", nodes, [image_input()], [logits_output()], inits)
    # A random linear classifier (fooled now and then), in each layout the engine adapts to.
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(784, 10)) * 0.05, rng.normal(size=10) * 0.1
    for name, shape in (("linear_nchw", ("N", 1, 28, 28)), ("linear_nhwc", ("N", 28, 28, 1)),
                        ("linear_nhw", ("N", 28, 28)), ("linear_flat", ("N", 784)), ("linear_b1", (1, 1, 28, 28))):
        nodes, inits = linear_nodes(w, b)
        out[name] = save_model(d / f"{name}.onnx", nodes, [image_input(shape)], [logits_output(batch=shape[0])],
                               inits)
    # Broken or unfit models.
    nodes, inits = linear_nodes(w, b)
    nodes.append(helper.make_node("Identity", ["x2"], ["y2"]))
    out["two_inputs"] = save_model(d / "two_inputs.onnx", nodes, [image_input(), image_input(name="x2")],
                                   [logits_output(), image_input(name="y2")], inits)
    nodes, inits = linear_nodes(w[:, :5], b[:5])
    out["five_classes"] = save_model(d / "five_classes.onnx", nodes, [image_input()], [logits_output(5)], inits)
    nodes, inits = linear_nodes(np.zeros((64, 10)), np.zeros(10))
    out["size_8x8"] = save_model(d / "size_8x8.onnx", nodes, [image_input(("N", 1, 8, 8))], [logits_output()], inits)
    nodes, inits = linear_nodes(w, b)
    nodes.append(helper.make_node("Unsqueeze", ["y", "ax"], ["y3"]))
    inits.append(helper.make_tensor("ax", TensorProto.INT64, [1], [2]))
    out["rank3_output"] = save_model(d / "rank3_output.onnx", nodes, [image_input()],
                                     [helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["N", 10, 1])], inits)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("Gather", ["f", "i"], ["y"], axis=1)]
    out["bool_input"] = save_model(
        d / "bool_input.onnx",
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["xf"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["y"])],
        [image_input(elem=TensorProto.BOOL)], [logits_output()], [tensor("W", w)])
    # Ignores the batch: always one row of scores.
    inits = [tensor("row", np.zeros((1, 10))), tensor("zero", np.zeros((1, 10)))]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
             helper.make_node("ReduceMean", ["m"], ["m2"], keepdims=1),
             helper.make_node("Mul", ["m2", "zero"], ["z"]), helper.make_node("Add", ["z", "row"], ["y"])]
    out["one_row"] = save_model(d / "one_row.onnx", nodes, [image_input()], [logits_output(batch=1)], inits)
    nodes = [helper.make_node("Unsqueeze", ["x", "ax0"], ["x2"]), helper.make_node("MatMul", ["x2", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "B"], ["y"])]
    inits = [tensor("W", w), tensor("B", b), helper.make_tensor("ax0", TensorProto.INT64, [1], [0])]
    out["no_batch_axis"] = save_model(d / "no_batch_axis.onnx", nodes, [image_input((784,))],
                                      [logits_output(batch=1)], inits)
    out["custom_domain"] = save_model(d / "custom_domain.onnx",
                                      [helper.make_node("MyOp", ["x"], ["y"], domain="com.example.custom")],
                                      [image_input()], [logits_output()], domains=["com.example.custom"])
    out["not_onnx"] = d / "not_onnx.onnx"
    out["not_onnx"].write_text("this is not a model\n")
    data = out["linear_nchw"].read_bytes()
    out["truncated"] = d / "truncated.onnx"
    out["truncated"].write_bytes(data[: len(data) // 2])
    return out


@pytest.fixture(scope="session")
def sample() -> Dataset:
    return bundled_sample()


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    with resources.as_file(BUNDLED_MODEL) as p:
        return Path(p)


@pytest.fixture(scope="session")
def regressed(tmp_path_factory, bundled_model):
    """The bundled CNN with its class-8 bias raised by 2: ~2.8 points less robust on MNIST test images."""
    proto = onnx.load(str(bundled_model))
    for t in proto.graph.initializer:
        if t.name == "net.9.bias":
            b = numpy_helper.to_array(t).copy()
            b[8] += 2.0
            t.CopyFrom(numpy_helper.from_array(b, t.name))
    path = tmp_path_factory.mktemp("regressed") / "regressed.onnx"
    onnx.save(proto, str(path))
    return path


MISSING_DATA = ("needs the real MNIST files (mnist/t10k-*.gz, mnist/train-*.gz) under {where}: get them with "
                "`pyrobust data fetch mnist --dir DIR` and set PYROBUST_TEST_DATA=DIR")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data. A user's clone has none: those tests skip, saying how to get it. CI has it (CI=true): there a
    missing file is a failure, so no real-data test is ever skipped in CI."""
    if not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        reason = MISSING_DATA.format(where=SHARED_DATA)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run every real-data test: {reason}")
        pytest.skip(reason)
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """A test on the real data is slow by nature (it reads tens of MB): it is marked so, and left out of the fast
    tier (``pytest -m "not slow"``), wherever it is written."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
