"""Crafted models must not read files: a tensor keeping its data "externally" in a file that is not beside the model
is refused wherever the tensor lives (initializer, sparse initializer, tensor and sparse-tensor attributes, subgraphs
of If/Loop/Scan, model-local functions, training-info graphs), and external data that *is* beside the model is
inlined so that onnxruntime, handed bytes, never resolves a location against the working directory."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pyrobust.engine.modelfile import all_tensors, used_domains
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import ModelError
from pyrobust.files import file_sha256
from tests.builders import image_input, logits_output

SECRET = b"[remote]\n\ttoken = ghp_0123456789abcdefghijklmnopqrstuv\n"[:40]  # 40 bytes: ten float32 values


def _external(name: str, location: str, dims=(10,), dtype=TensorProto.FLOAT) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=dtype, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(40 if dtype == TensorProto.FLOAT else 80))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _sparse(name: str, location: str) -> onnx.SparseTensorProto:
    values = _external(name, location)  # a sparse tensor is named by its values
    indices = helper.make_tensor(f"{name}_indices", TensorProto.INT64, [10], list(range(10)))
    return helper.make_sparse_tensor(values, indices, [10])


def _head(const_nodes, inits=(), sparse=(), functions=(), extra_imports=()):
    """y = 0 * sum(x) + C, where C (10 values) comes from wherever the crafted tensor is."""
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
             helper.make_node("Flatten", ["s"], ["s2"], axis=1),
             helper.make_node("Mul", ["s2", "zero"], ["z"]),
             *const_nodes,
             helper.make_node("Add", ["z", "C"], ["y"])]
    base = [helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    graph = helper.make_graph(nodes, "g", [image_input()], [logits_output()], initializer=base + list(inits),
                              sparse_initializer=list(sparse))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_imports],
                              functions=list(functions))
    model.ir_version = 8
    return model


def _branch(name: str, location: str) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Constant", [], ["c_out"], value=_external(name, location))],
                             name, [], [helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [10])])


def crafted(where: str, location: str) -> onnx.ModelProto:
    if where == "initializer":
        return _head([], inits=[_external("C", location)])
    if where == "sparse_initializer":
        return _head([], sparse=[_sparse("C", location)])
    if where == "constant_value":
        return _head([helper.make_node("Constant", [], ["C"], value=_external("c", location))])
    if where == "constant_sparse_value":
        return _head([helper.make_node("Constant", [], ["C"], sparse_value=_sparse("c", location))])
    if where == "if_subgraph":
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        return _head([helper.make_node("Constant", [], ["cond_v"], value=cond),
                      helper.make_node("If", ["cond_v"], ["C"], then_branch=_branch("t", location),
                                       else_branch=_branch("e", location))])
    if where == "function":
        body = [helper.make_node("Constant", [], ["out"], value=_external("fc", location))]
        fn = helper.make_function("local.secret", "Secret", [], ["out"], body,
                                  [helper.make_opsetid("", 17)])
        return _head([helper.make_node("Secret", [], ["C"], domain="local.secret")], functions=[fn],
                     extra_imports=[helper.make_opsetid("local.secret", 1)])
    raise AssertionError(where)


PLACES = ["initializer", "sparse_initializer", "constant_value", "constant_sparse_value", "if_subgraph", "function"]


@pytest.fixture()
def checkout(tmp_path, monkeypatch):
    """A CI-like working directory holding a secret, and a models folder elsewhere."""
    work = tmp_path / "checkout"
    (work / ".git").mkdir(parents=True)
    (work / ".git" / "config").write_bytes(SECRET)
    (work / "secret.bin").write_bytes(SECRET)
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.chdir(work)
    return models


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("location", ["secret.bin", ".git/config"])
def test_a_file_in_the_working_directory_is_never_read(checkout, where, location):
    path = checkout / f"{where}.onnx"
    onnx.save(crafted(where, location), str(path))
    with pytest.raises(ModelError, match=r"keeps its data in .*which does not exist; keep the data file beside"):
        OnnxModel(path, threads=1)


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("location", ["../checkout/secret.bin", "/etc/hostname"])
def test_a_file_outside_the_model_folder_is_refused(checkout, where, location):
    path = checkout / f"{where}.onnx"
    onnx.save(crafted(where, location), str(path))
    with pytest.raises(ModelError, match="outside the model's folder"):
        OnnxModel(path, threads=1)


@pytest.mark.parametrize("where", PLACES)
def test_external_data_beside_the_model_is_inlined_and_hashed(checkout, where):
    """The legitimate case, in every place: the bytes come from the file beside the model, not from the working
    directory's file of the same name, and they are part of the model's identity."""
    beside = np.arange(10, dtype=np.float32)
    (checkout / "secret.bin").write_bytes(beside.tobytes())
    path = checkout / f"{where}.onnx"
    onnx.save(crafted(where, "secret.bin"), str(path))
    m = OnnxModel(path, threads=1)
    assert [e["location"] for e in m.external_data] == ["secret.bin"]
    m = m.bind((28, 28, 1), n_classes=10)
    out = m.run(np.zeros((2, 784), np.float32))
    assert np.array_equal(out[0], beside)  # the working directory's secret.bin holds other bytes
    assert not any(t.data_location == TensorProto.EXTERNAL for t in all_tensors(onnx.load_from_string(m.model_bytes)))
    (checkout / "secret.bin").write_bytes((beside + 1).tobytes())
    assert OnnxModel(path, threads=1).sha256 != m.sha256


def test_a_symlinked_data_file_beside_the_model_is_refused(checkout):
    os.symlink(checkout.parent / "checkout" / ".git" / "config", checkout / "data.bin")
    path = checkout / "m.onnx"
    onnx.save(crafted("sparse_initializer", "data.bin"), str(path))
    with pytest.raises(ModelError, match="symbolic link"):
        OnnxModel(path, threads=1)


def test_external_data_not_marked_external_is_refused(checkout):
    model = crafted("initializer", "secret.bin")
    model.graph.initializer[-1].data_location = TensorProto.DEFAULT
    path = checkout / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="not marked as external"):
        OnnxModel(path, threads=1)


def test_the_walk_finds_tensors_in_training_info(checkout):
    model = crafted("initializer", "x.bin")
    info = model.training_info.add()
    info.initialization.CopyFrom(_branch("init", "hidden.bin"))
    names = {t.name for t in all_tensors(model)}
    assert {"init", "C", "axes", "zero"} <= names
    path = checkout / "m.onnx"
    onnx.save(model, str(path))
    (checkout / "x.bin").write_bytes(SECRET)
    with pytest.raises(ModelError, match="'hidden.bin', which does not exist"):
        OnnxModel(path, threads=1)


def test_through_the_command_line_nothing_of_the_secret_is_printed(checkout, capsys, sample):
    path = checkout / "m.onnx"
    onnx.save(crafted("sparse_initializer", ".git/config"), str(path))
    from pyrobust.cli import main

    code = main(["evaluate", str(path), "--dataset", "sample", "--limit", "4", "--max-steps", "2",
                 "--out", str(checkout / "out")])
    err = capsys.readouterr().err
    assert code == 3
    assert "token" not in err and "ghp_" not in err
    assert not (checkout / "out" / "results.npz").exists()
    del sample


def test_used_domains_are_those_of_the_nodes_not_the_declarations(checkout):
    model = crafted("function", "secret.bin")
    model.opset_import.extend([helper.make_opsetid("ai.onnx.preview", 1),
                               helper.make_opsetid("org.pytorch.aten", 1)])
    assert used_domains(model) == {""}  # the local function's own domain is its body's nodes
    (checkout / "secret.bin").write_bytes(np.zeros(10, np.float32).tobytes())
    path = checkout / "m.onnx"
    onnx.save(model, str(path))
    OnnxModel(path, threads=1)  # declared-but-unused domains are not refused


def test_a_used_custom_domain_is_still_refused(checkout):
    model = _head([helper.make_node("Secret", [], ["C"], domain="com.example")],
                  extra_imports=[helper.make_opsetid("com.example", 1)])
    path = checkout / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="custom operator domain\\(s\\) com.example"):
        OnnxModel(path, threads=1)


def test_a_model_without_external_data_keeps_its_file_digest(bundled_model):
    assert OnnxModel(bundled_model, threads=1).sha256 == file_sha256(bundled_model)


# ------------------------------------------------------------------------------- what the model does, checked
def test_a_model_whose_class_count_changes_after_the_probe_is_refused(checkout, sample):
    """10 scores for the probe's 2 rows, more for a larger batch: caught on the first real batch."""
    i64 = TensorProto.INT64
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero_i", "one_i"], ["n"]),
             helper.make_node("Concat", ["n", "twenty"], ["wide"], axis=0),
             helper.make_node("Expand", ["row", "wide"], ["full"]),
             helper.make_node("Add", ["n", "eight"], ["k"]),
             helper.make_node("Slice", ["full", "zero_i", "k", "one_i"], ["y"])]
    inits = [helper.make_tensor("zero_i", i64, [1], [0]), helper.make_tensor("one_i", i64, [1], [1]),
             helper.make_tensor("twenty", i64, [1], [20]), helper.make_tensor("eight", i64, [1], [8]),
             helper.make_tensor("row", TensorProto.FLOAT, [1, 20], [float(k == 3) for k in range(20)])]
    graph = helper.make_graph(nodes, "g", [image_input()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = checkout / "shifty.onnx"
    onnx.save(model, str(path))
    m = OnnxModel(path, threads=1)
    bound = m.bind((28, 28, 1), n_classes=10)
    assert bound.binding.scores == 10
    with pytest.raises(ModelError, match="gave 20 class scores per image, but 10 on the probe"):
        bound.run(np.zeros((16, 784), np.float32))
    from pyrobust.cli import main

    assert main(["evaluate", str(path), "--dataset", "sample", "--limit", "40", "--max-steps", "2", "--batch-size",
                 "16", "--out", str(checkout / "out")]) == 3
    del sample


def _random_model(checkout, op="RandomUniformLike"):
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
             helper.make_node("Flatten", ["s"], ["s2"], axis=1),
             helper.make_node("Mul", ["s2", "zero"], ["z"]),
             helper.make_node("Add", ["z", "C"], ["base"]),
             helper.make_node(op, ["base"], ["noise"], dtype=TensorProto.FLOAT),
             helper.make_node("Add", ["base", "noise"], ["y"])]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("C", TensorProto.FLOAT, [1, 10], [0.5] * 10)]
    graph = helper.make_graph(nodes, "g", [image_input()], [logits_output()], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = checkout / "random.onnx"
    onnx.save(model, str(path))
    return path


def test_a_model_with_random_operators_is_refused(checkout):
    with pytest.raises(ModelError, match=r"draws random numbers \(RandomUniformLike\)"):
        OnnxModel(_random_model(checkout), threads=1)


def test_a_model_whose_outputs_change_between_runs_is_refused_at_the_probe(checkout, monkeypatch):
    """However the randomness gets in (here the static check is switched off), running the probe twice shows it."""
    import pyrobust.engine.runtime as rt

    monkeypatch.setattr(rt, "random_operators", lambda proto: [])
    m = OnnxModel(_random_model(checkout), threads=1)
    with pytest.raises(ModelError, match="gives other scores for the same input when run again"):
        m = m.bind((28, 28, 1), n_classes=10)
