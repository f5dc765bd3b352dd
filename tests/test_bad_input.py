"""Every kind of bad input: a specific exception from the Python API, and from the real CLI one line on stderr,
the documented exit code, no traceback and nothing written."""

from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import onnx
import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.errors import ClassCountMismatch, DataError, InvalidInput, ModelError, OutputError
from tests.builders import idx_bytes, write_mnist_folder


def _external_data_model(folder, location, *, make_target=True):
    """A linear model whose weights live in an external file at ``location`` (relative to the model)."""
    from tests.builders import image_input, linear_nodes, logits_output

    folder.mkdir(parents=True, exist_ok=True)
    nodes, inits = linear_nodes(np.ones((784, 10)) * 0.01, np.zeros(10))
    graph = onnx.helper.make_graph(nodes, "g", [image_input()], [logits_output()], initializer=inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    w = model.graph.initializer[0]
    raw = w.raw_data or onnx.numpy_helper.to_array(w).tobytes()
    if make_target:
        target = (folder / location)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
    w.ClearField("float_data")
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        e = w.external_data.add()
        e.key, e.value = k, v
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("bad")
    x = (np.random.default_rng(0).random((8, 28, 28)) * 255).astype(np.uint8)
    y = np.arange(8, dtype=np.uint8)
    files = {}
    good = write_mnist_folder(d / "good", x, y)
    files["good"] = f"{good}:test"

    def folder(name, images: bytes, labels: bytes):
        f = d / name
        f.mkdir()
        (f / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (f / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
        files[name] = f"{f}:test"

    xi, yi = idx_bytes(x), idx_bytes(y)
    folder("wrong_magic", b"\x12\x34\x08\x03" + xi[4:], yi)
    folder("truncated", xi[:-100], yi)
    folder("dims_vs_length", xi[:4] + struct.pack(">3I", 8, 28, 27) + xi[16:], yi)
    folder("count_mismatch", xi, idx_bytes(y[:7]))
    folder("labels_beyond", xi, idx_bytes(np.array([0, 1, 2, 3, 4, 5, 6, 12], np.uint8)))
    np.savez(d / "empty.npz", x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.uint8))
    files["empty"] = str(d / "empty.npz")
    np.savez(d / "pickled.npz", x=np.array([object()], dtype=object), y=np.zeros(1, int))
    files["pickled"] = str(d / "pickled.npz")
    files["missing"] = str(d / "nope.npz")
    ext = d / "ext"
    files["ext_outside"] = _external_data_model(ext / "a", "../outside.bin", make_target=False)
    (ext / "outside.bin").write_bytes(b"\0" * 31360)
    files["ext_ok"] = _external_data_model(ext / "ok", "w.bin")
    files["ext_symlink"] = _external_data_model(ext / "s", "w.bin", make_target=False)
    (ext / "s" / "w.bin").symlink_to(ext / "outside.bin")
    files["ext_hardlink"] = _external_data_model(ext / "h", "w.bin", make_target=False)
    (ext / "h" / "w.bin").hardlink_to(ext / "outside.bin")
    files["ext_absolute"] = _external_data_model(ext / "abs", str(ext / "outside.bin"), make_target=False)
    return files


# (case id, model key or None for the bundled model, dataset key or "sample", extra kwargs, exception, exit, message)
CASES = [
    ("not onnx", "not_onnx", "sample", {}, ModelError, 3, r"not an ONNX model"),
    ("truncated model", "truncated", "sample", {}, ModelError, 3, r"not an ONNX model|invalid ONNX model"),
    ("two inputs", "two_inputs", "sample", {}, ModelError, 3, r"has 2 inputs"),
    ("no batch axis", "no_batch_axis", "sample", {}, ModelError, 3, r"input 'x' has shape \[784\], which does not fit"),
    ("output not N×classes", "rank3_output", "sample", {}, ModelError, 3, r"pyrobust needs N×classes scores"),
    ("fewer classes", "five_classes", "sample", {}, ClassCountMismatch, 3, r"outputs 5 classes but the labels need 10"),
    ("image size", "size_8x8", "sample", {}, ModelError, 3, r"does not fit the data"),
    ("custom op domain", "custom_domain", "sample", {}, ModelError, 3, r"custom operator domain\(s\) com.example"),
    ("external data outside", "@ext_outside", "sample", {}, ModelError, 3, r"outside the model's folder"),
    ("external data absolute", "@ext_absolute", "sample", {}, ModelError, 3, r"outside the model's folder"),
    ("external data symlink", "@ext_symlink", "sample", {}, ModelError, 3, r"through a symbolic link"),
    ("external data hardlink", "@ext_hardlink", "sample", {}, ModelError, 3, r"several hard links"),
    ("output batch size", "one_row", "sample", {}, ModelError, 3, r"for a batch of 2 images output 'y' has shape"),
    ("wrong magic", None, "wrong_magic", {}, DataError, 3, r"bad magic number"),
    ("truncated data", None, "truncated", {}, DataError, 3, r"truncated IDX data"),
    ("dims vs length", None, "dims_vs_length", {}, DataError, 3, r"longer than its dimensions"),
    ("count mismatch", None, "count_mismatch", {}, DataError, 3, r"has 8 images but .* has 7 labels"),
    ("labels beyond classes", None, "labels_beyond", {}, DataError, 3, r"outputs 10 classes but the labels need 13"),
    ("empty dataset", None, "empty", {}, DataError, 3, r"the dataset is empty"),
    ("pickled npz", None, "pickled", {}, DataError, 3, r"holds pickled objects"),
    ("missing data", None, "missing", {}, DataError, 3, r"not found"),
    ("pixels < 1", None, "sample", {"pixels": 0}, InvalidInput, 2,
     r"pixels must be an integer >= 1 or a share of the image such as 3.5%; got 0"),
    ("pixels > image", None, "sample", {"pixels": 785}, InvalidInput, 2, r"\[1, 784\] for 28x28 images; got 785"),
    ("max_steps < 1", None, "sample", {"max_steps": 0}, InvalidInput, 2, r"max_steps must be an integer in \[1, "),
    ("max_steps huge", None, "sample", {"max_steps": 100_000_000}, InvalidInput, 2,
     r"max_steps must be an integer in \[1, 100,000\] .*; got 100000000"),
    ("low >= high", None, "sample", {"low": 0.5, "high": 0.5}, InvalidInput, 2, r"finite low < high"),
    ("limit beyond", None, "sample", {"limit": 501}, InvalidInput, 2, r"limit 501 is beyond the dataset"),
    ("max memory", None, "sample", {"max_memory_mb": 0}, InvalidInput, 2, r"max_memory must be a number of MiB in"),
    ("resume and overwrite", None, "sample", {"resume": True, "overwrite": True}, InvalidInput, 2,
     r"(resume=True|--resume) continues a run and (overwrite=True|--overwrite) replaces it"),
]
_CLI = {"pixels": "--pixels", "max_steps": "--max-steps", "low": "--low", "high": "--high", "limit": "--limit",
        "max_memory_mb": "--max-memory", "resume": "--resume", "overwrite": "--overwrite"}


def _model(key, models, bad, bundled_model):
    if key is None:
        return bundled_model
    return bad[key[1:]] if key.startswith("@") else models[key]


@pytest.mark.parametrize("case,model,data,kwargs,exc,code,match", CASES, ids=[c[0] for c in CASES])
def test_python_api(tmp_path, models, bad, bundled_model, case, model, data, kwargs, exc, code, match):
    kwargs = {"max_steps": 3, **kwargs}
    with pytest.raises(exc, match=match):
        pyrobust.evaluate(_model(model, models, bad, bundled_model), bad.get(data, data), out=tmp_path / "out",
                          **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,model,data,kwargs,exc,code,match", CASES, ids=[c[0] for c in CASES])
def test_cli(capsys, tmp_path, models, bad, bundled_model, case, model, data, kwargs, exc, code, match):
    args = ["evaluate", str(_model(model, models, bad, bundled_model)), "--dataset", str(bad.get(data, data)),
            "--out", str(tmp_path / "out")]
    for k, v in kwargs.items():
        args += [_CLI[k]] if v is True else [_CLI[k], str(v)]
    if "max_steps" not in kwargs:
        args += ["--max-steps", "3"]
    got = main(args)
    err = capsys.readouterr().err
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrobust: error: ") and re.search(match, lines[0]), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_external_data_beside_the_model_is_fine(bad, sample):
    ev = pyrobust.evaluate(bad["ext_ok"], sample, limit=5, max_steps=2)
    assert ev.outcome.n == 5


@pytest.mark.slow
def test_nan_outputs_warn_with_the_count(models):
    """Some non-finite outputs: a warning with the count. Every output non-finite: an error, nothing to measure."""
    zeros = pyrobust.Dataset("zeros", "test", np.zeros((7, 28, 28, 1), np.uint8), np.zeros(7, np.int64),
                             np.arange(7), "zeros")
    with pytest.warns(pyrobust.NonFiniteOutputWarning, match="7 image"):
        ev = pyrobust.evaluate(models["inf_on_one"], zeros, max_steps=2, scheme="salt-pepper", report=False)
    assert ev.summary["metrics"]["nonfinite_outputs"] == 7
    assert (ev.outcome.failure_label == pyrobust.NONFINITE).all() and (ev.outcome.clean_prediction == 0).all()
    with pytest.raises(ModelError, match="every output of the model is NaN or infinite"):
        pyrobust.evaluate(models["nan"], zeros, max_steps=2)


@pytest.mark.slow
def test_existing_results_and_unwritable_folder(tmp_path, bundled_model, capsys):
    pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2, out=tmp_path / "r", report=False)
    with pytest.raises(OutputError, match="already holds a run's results .* pass overwrite=True"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2, out=tmp_path / "r")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder|cannot write there"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2, out=tmp_path / "file" / "out")
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--out", str(tmp_path / "file" / "o")]) == 2
    assert "choose" in capsys.readouterr().err


def test_custom_ops_library_is_loaded_only_when_named(tmp_path, models, capsys):
    with pytest.raises(ModelError, match="custom-op library not found"):
        pyrobust.evaluate(models["custom_domain"], "sample", custom_ops=tmp_path / "libnope.so")
    (tmp_path / "libfake.so").write_bytes(b"not a shared object")
    with pytest.raises(ModelError, match="cannot load this custom-op library"):
        pyrobust.evaluate(models["custom_domain"], "sample", custom_ops=tmp_path / "libfake.so")
    assert main(["evaluate", str(models["custom_domain"]), "--dataset", "sample", "--custom-ops",
                 str(tmp_path / "libnope.so"), "--out", str(tmp_path / "o")]) == 3


def test_memory_budget(tmp_path, shared_data, bundled_model, capsys):
    # 10,000 gzip'd MNIST images need 7.5 MiB in memory plus ~26 MiB of working buffers.
    with pytest.raises(DataError, match=r"needs about \d+ MiB .* more than the 20 MiB allowed"):
        pyrobust.evaluate(bundled_model, "mnist:test", data_dir=shared_data, max_memory_mb=20)
    with pytest.raises(DataError, match=r"holds 7 MiB of images, more than the 5 MiB of memory allowed"):
        pyrobust.evaluate(bundled_model, "mnist:test", data_dir=shared_data, max_memory_mb=5)
    assert main(["evaluate", str(bundled_model), "--dataset", "mnist:test", "--data-dir", str(shared_data),
                 "--max-memory", "5", "--out", str(tmp_path / "o")]) == 3
    assert "more than the 5 MiB of memory allowed (--max-memory)" in capsys.readouterr().err
    # Decompressed (raw) files are read, not memory-mapped: the same budget applies, checked from the header.
    raw = tmp_path / "raw" / "mnist"
    raw.mkdir(parents=True)
    for f in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f).write_bytes(gzip.decompress((shared_data / "mnist" / f"{f}.gz").read_bytes()))
    with pytest.raises(DataError, match=r"holds 7 MiB of images, more than the 5 MiB of memory allowed"):
        pyrobust.evaluate(bundled_model, "mnist:test", data_dir=raw.parent, max_memory_mb=5)
    ev = pyrobust.evaluate(bundled_model, "mnist:test", data_dir=raw.parent, max_memory_mb=60, limit=2000,
                           max_steps=1, sessions=1, batch_size=64)
    assert ev.outcome.n == 2000
    # every parallel session keeps its own buffers, and the check counts them
    with pytest.raises(DataError, match="fewer --sessions"):
        pyrobust.evaluate(bundled_model, "mnist:test", data_dir=raw.parent, max_memory_mb=30, limit=2000,
                          max_steps=1, sessions=2, threads=2)
    assert ev.outcome.n == 2000
