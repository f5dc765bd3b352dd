"""What the record says ran is what ran: a model and its external data are read once, and those bytes are hashed,
checked and loaded; data files are read, not memory-mapped; only regular files are read."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pyrobust
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import DataError, ModelError
from tests.builders import idx_bytes

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier


def _with_bias(src, dst, delta):
    proto = onnx.load(str(src))
    for t in proto.graph.initializer:
        if t.name == "net.9.bias":
            b = numpy_helper.to_array(t).copy()
            b += delta
            t.CopyFrom(numpy_helper.from_array(b, t.name))
    return proto


def test_sessions_are_built_from_the_bytes_that_were_hashed(tmp_path, bundled_model, sample, monkeypatch):
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(source, *args, **kwargs):
        seen.append(type(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    path = tmp_path / "m.onnx"
    shutil.copy(bundled_model, path)
    m = OnnxModel(path, threads=1)
    other = _with_bias(bundled_model, None, np.array([0, 0, 0, 0, 0, 0, 0, 0, 50.0, 0], np.float32))
    onnx.save(other, str(path))  # swapped on disk after the model was read
    extra = m.copy(threads=1)  # a parallel session: the same bytes, not the new file
    assert seen == [bytes, bytes] and extra.sha256 == m.sha256
    x = sample.float_images(0, 20).transpose(0, 3, 1, 2).reshape(20, -1)
    a, b = (mm.bind((28, 28, 1), n_classes=10) for mm in (m, extra))
    assert np.array_equal(a.run(x), b.run(x))
    assert OnnxModel(path, threads=1).sha256 != m.sha256


def test_external_data_is_part_of_the_model_identity(tmp_path, bundled_model, sample):
    folder = tmp_path / "ext"
    folder.mkdir()
    proto = onnx.load(str(bundled_model))
    onnx.save(proto, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    a = OnnxModel(folder / "m.onnx", threads=1)
    graph_bytes = (folder / "m.onnx").read_bytes()
    assert a.external_data and a.external_data[0]["location"] == "m.onnx.data"
    with pytest.raises(pyrobust.errors.Interrupted):  # a run interrupted half-way, to be resumed below
        pyrobust.evaluate(folder / "m.onnx", sample, limit=40, max_steps=10, out=tmp_path / "half", batch_size=4,
                          sessions=1, progress=_stop_at(20), report=False)
    ev = pyrobust.evaluate(folder / "m.onnx", sample, limit=40, max_steps=10, out=tmp_path / "run", report=False)
    assert ev.summary["model"]["external_data"][0]["sha256"] == a.external_data[0]["sha256"]
    plain = pyrobust.evaluate(bundled_model, sample, limit=40, max_steps=10, report=False)
    assert np.array_equal(ev.first_failure, plain.first_failure)  # the same weights, however they are stored
    # the same .onnx with other weights in the data file: another model
    changed = _with_bias(bundled_model, None, np.float32(3.0))
    onnx.save(changed, str(tmp_path / "tmp.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="tmp.onnx.data", size_threshold=0)
    os.replace(tmp_path / "tmp.onnx.data", folder / "m.onnx.data")
    b = OnnxModel(folder / "m.onnx", threads=1)
    assert (folder / "m.onnx").read_bytes() == graph_bytes and b.sha256 != a.sha256
    with pytest.raises(pyrobust.InvalidInput, match="the model changed"):  # no mixing of two models in one run
        pyrobust.evaluate(folder / "m.onnx", sample, limit=40, max_steps=10, out=tmp_path / "half", resume=True,
                          report=False)
    with pytest.raises(pyrobust.InvalidInput, match="finished run of another model"):
        pyrobust.evaluate(folder / "m.onnx", sample, limit=40, max_steps=10, out=tmp_path / "run", resume=True,
                          report=False)


def _stop_at(n):
    def progress(done, total, inferences):
        if done >= n:
            raise KeyboardInterrupt

    return progress


def test_only_regular_files_are_read(tmp_path, sample):
    with pytest.raises(ModelError, match="not a regular file"):
        OnnxModel("/dev/zero")
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="not a regular file"):
        OnnxModel(fifo)
    data = tmp_path / "data.npz"
    os.mkfifo(data)
    with pytest.raises(DataError, match="not a regular file"):
        pyrobust.load_dataset(str(data))
    folder = tmp_path / "idx"
    folder.mkdir()
    os.mkfifo(folder / "t10k-images-idx3-ubyte")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="not a regular file"):
        pyrobust.load_dataset(f"{folder}:test")


def test_raw_idx_data_is_read_not_mapped(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(5, dtype=np.uint8))))
    ds = pyrobust.load_dataset(f"{folder}:test")
    digest = ds.sha256
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(255 - x))  # rewritten in place
    assert np.array_equal(ds.images[..., 0], x) and ds.sha256 == digest
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"")  # truncated: no SIGBUS, the copy is intact
    assert int(ds.images.sum()) == int(x.astype(np.int64).sum())
