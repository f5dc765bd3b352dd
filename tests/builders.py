"""Builders the tests share: hand-made ONNX graphs, synthetic datasets, IDX and npz files. Test modules import
from here (and from ``tests/naive.py``), never from one another, so one module's missing dependency cannot take
another down."""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pyrobust.data.dataset import Dataset


def save_model(path: Path, nodes, inputs, outputs, initializers=(), opset: int = 17, domains=()) -> Path:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def tensor(name, array):
    return helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.astype(np.float32).ravel())


def image_input(shape=("N", 1, 28, 28), name="x", elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape))


def logits_output(classes=10, name="y", batch="N"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, classes])


def linear_nodes(weight: np.ndarray, bias: np.ndarray, input_name="x"):
    """x (any shape N×...) -> flatten -> x @ W + b."""
    return (
        [helper.make_node("Flatten", [input_name], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["mm"]),
         helper.make_node("Add", ["mm", "B"], ["y"])],
        [tensor("W", weight), tensor("B", bias)],
    )


def synthetic(n=20, h=28, w=28, c=1, label=0, seed=0, zeros=False, name="synthetic") -> Dataset:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, h, w, c), np.float32) if zeros else rng.random((n, h, w, c), dtype=np.float32)
    y = np.full(n, label, np.int64) if np.isscalar(label) else np.asarray(label, np.int64)
    return Dataset(name, "test", x, y, np.arange(n, dtype=np.int64), name)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype({0x08: ">u1", 0x0D: ">f4", 0x0C: ">i4"}[code]).tobytes()


def write_mnist_folder(folder, images, labels, prefix="t10k", compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(arr)
        name = f"{prefix}-{kind}-ubyte"
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def save_npz(path: str | os.PathLike, ds: Dataset) -> None:
    """Write a dataset as a plain (pickle-free) ``.npz`` with ``x``, ``y`` and ``index``."""
    buf = io.BytesIO()
    x = ds.images[..., 0] if ds.images.shape[3] == 1 else ds.images
    np.savez_compressed(buf, x=x, y=ds.labels.astype(np.uint8 if ds.labels.max() < 256 else np.int64), index=ds.index)
    Path(path).write_bytes(buf.getvalue())
