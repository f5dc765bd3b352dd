"""Image folders (folder:PATH), CIFAR-10's binary format and its verified archive download, shares of the image
as --pixels, and a 224×224 RGB model end to end."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pyrobust
from pyrobust.cli import main
from pyrobust.data.fetch import RemoteDataset, RemoteFile, fetch_dataset, list_data
from pyrobust.data.images import CIFAR10_CLASSES
from pyrobust.data.load import load_dataset
from pyrobust.errors import DataError, InvalidInput

Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (pyrobust[images])")


def _folder(root, *, sizes=((20, 16),), rgb=False, per_class=4, classes=("cat", "dog", "emu")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[(c * per_class + i) % len(sizes)]
            arr = rng.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"img{i:02d}.png")
        (root / name / "notes.txt").write_text("not an image")  # ignored
    return root


def test_a_folder_loads_in_imagefolder_order(tmp_path):
    root = _folder(tmp_path / "d")
    ds = load_dataset(f"folder:{root}")
    assert ds.images.shape == (12, 16, 20, 1) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and ds.classes == ("cat", "dog", "emu")
    first = np.asarray(Image.open(root / "cat" / "img00.png"))
    assert np.array_equal(ds.images[0, :, :, 0], first)
    part = load_dataset(f"folder:{root}", start=5, limit=3)  # only the chosen images are decoded
    assert part.index.tolist() == [5, 6, 7] and np.array_equal(part.images, ds.images[5:8])
    assert "files SHA-256" in ds.source and ds.source != part.source


def test_sizes_colours_and_resize(tmp_path):
    root = _folder(tmp_path / "d", sizes=((20, 16), (30, 24)), rgb=True)
    with pytest.raises(DataError, match=r"2 different sizes .* pass --resize HxW"):
        load_dataset(f"folder:{root}")
    ds = load_dataset(f"folder:{root}", resize=(8, 10))
    assert ds.images.shape == (12, 8, 10, 3)
    with pytest.raises(DataError, match="need .* MiB, more than the 0 MiB allowed"):
        load_dataset(f"folder:{root}", resize=(8, 10), max_bytes=100)
    with pytest.raises(InvalidInput, match="resize applies to image folders"):
        load_dataset("sample", resize=(8, 8))
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(f"folder:{tmp_path}/d/cat")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: not an image Pillow can read"):
        load_dataset(f"folder:{root}", resize=(8, 10))


def _rgb_model(path, h, w, classes=3, seed=0):
    """N×3×H×W -> a strided convolution, global average pool and a linear layer: a small RGB classifier."""
    rng = np.random.default_rng(seed)
    conv = rng.normal(0, 0.2, (8, 3, 4, 4)).astype(np.float32)
    fc = rng.normal(0, 0.5, (8, classes)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], strides=[4, 4]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "Wf"], ["y"])]
    inits = [helper.make_tensor("Wc", TensorProto.FLOAT, conv.shape, conv.ravel()),
             helper.make_tensor("Wf", TensorProto.FLOAT, fc.shape, fc.ravel())]
    graph = helper.make_graph(nodes, "rgb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_a_folder_run_records_its_classes_and_replays(tmp_path, capsys):
    root = _folder(tmp_path / "d", sizes=((20, 16), (30, 24)), rgb=True)
    model = _rgb_model(tmp_path / "m.onnx", 16, 16, seed=7)  # a seed whose predictions some noise flips
    out = tmp_path / "o"
    code = main(["evaluate", str(model), "--dataset", f"folder:{root}", "--resize", "16x16", "--max-steps", "30",
                 "--pixels", "60%", "--out", str(out), "--quiet", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert code == 0 and s["dataset"]["classes"] == ["cat", "dog", "emu"] and s["dataset"]["resize"] == [16, 16]
    assert s["noise"]["pixels"] == 154  # 60 % of 256 pixel positions, rounded up
    assert [r["name"] for r in s["per_class"]] == ["cat", "dog", "emu"]
    record = pyrobust.load_results(out)
    fooled = record.outcome.index[record.outcome.first_failure > 0]
    assert fooled.size  # a random network on random images: some are fooled within 30 steps
    assert pyrobust.replay(out, index=int(fooled[0])).matches  # the folder is decoded again, resized the same way
    assert main(["evaluate", str(model), "--dataset", f"folder:{root}", "--resize", "sixteen", "--out",
                 str(tmp_path / "p")]) == 2


@pytest.mark.parametrize("text,match", [("0%", "a share of the image such as 3.5%"),
                                        ("101%", "a share of the image"), ("x%", "a share of the image")])
def test_pixel_shares_are_checked(text, match, bundled_model):
    with pytest.raises(InvalidInput, match=match):
        pyrobust.evaluate(bundled_model, "sample", pixels=text, limit=5)


@pytest.mark.slow
def test_three_and_a_half_percent_is_the_papers_28(bundled_model):
    ev = pyrobust.evaluate(bundled_model, "sample", pixels="3.5%", limit=40, max_steps=10)
    ref = pyrobust.evaluate(bundled_model, "sample", pixels=28, limit=40, max_steps=10)
    assert ev.summary["noise"]["pixels"] == 28 and np.array_equal(ev.first_failure, ref.first_failure)


def test_a_224_rgb_model_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    model = _rgb_model(tmp_path / "big.onnx", 224, 224, classes=10)
    from pyrobust.engine.runtime import OnnxModel

    m = OnnxModel(model)
    m = m.bind((224, 224, 3), n_classes=10)
    y = np.argmax(m.run(m.to_flat(x.astype(np.float32) / 255)), axis=1)  # the model's own answers: all correct
    ev = pyrobust.evaluate(model, x, y, pixels="3.5%", max_steps=20, batch_size=8, sessions=1)
    assert ev.summary["noise"]["pixels"] == 1757 and ev.accuracy == 1.0
    assert ev.summary["model"]["layout"] == "NCHW"
    fooled = np.flatnonzero(ev.first_failure > 0)
    if fooled.size:
        r = ev.failing_inputs(int(ev.index[fooled[0]]))
        assert r.matches and int((r.perturbed != r.original).any(axis=2).sum()) <= 1757


# ------------------------------------------------------------------------------------------------------ CIFAR-10
def _cifar_bytes(n, seed):
    rng = np.random.default_rng(seed)
    records = np.empty((n, 3073), np.uint8)
    records[:, 0] = rng.integers(0, 10, n)
    records[:, 1:] = rng.integers(0, 256, (n, 3072))
    return records.tobytes()


CIFAR = {f"data_batch_{k}.bin": _cifar_bytes(3, k) for k in range(1, 6)} | {"test_batch.bin": _cifar_bytes(4, 9)}


def test_cifar10_binary_batches_load(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for name, data in CIFAR.items():
        (folder / name).write_bytes(data)
    test = load_dataset("cifar10:test", data_dir=tmp_path)
    rec = np.frombuffer(CIFAR["test_batch.bin"], np.uint8).reshape(4, 3073)
    assert test.images.shape == (4, 32, 32, 3) and test.labels.tolist() == rec[:, 0].tolist()
    assert np.array_equal(test.images[1, :, :, 2], rec[1, 1 + 2048:].reshape(32, 32))  # the blue plane
    assert test.classes == CIFAR10_CLASSES
    assert load_dataset("cifar10:train", data_dir=tmp_path).n == 15
    (folder / "test_batch.bin").write_bytes(CIFAR["test_batch.bin"][:-1])
    with pytest.raises(DataError, match="not a whole number of CIFAR-10 records"):
        load_dataset("cifar10:test", data_dir=tmp_path)
    with pytest.raises(DataError, match="pyrobust data fetch cifar10"):
        load_dataset("cifar10:test", data_dir=tmp_path / "nowhere")


def _archive(members: dict[str, bytes], extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {**members, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve(body: bytes):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _catalog(srv, archive: bytes) -> dict[str, RemoteDataset]:
    files = tuple(RemoteFile(name, len(data), None, frozenset({hashlib.sha256(data).hexdigest()}))
                  for name, data in CIFAR.items())
    arch = RemoteFile("cifar-10-binary.tar.gz", len(archive), None, frozenset({hashlib.sha256(archive).hexdigest()}))
    return {"cifar10": RemoteDataset("cifar10", (f"http://127.0.0.1:{srv.server_address[1]}/",), files,
                                     archive=arch, member_prefix="cifar-10-batches-bin/")}


@pytest.mark.slow
def test_cifar10_fetch_verifies_the_archive_and_every_member(tmp_path):
    members = {f"cifar-10-batches-bin/{k}": v for k, v in CIFAR.items()}
    body = _archive(members, extra={"../evil.bin": b"x", "cifar-10-batches-bin/readme.html": b"<p>"})
    srv = _serve(body)
    try:
        got = fetch_dataset("cifar10", dest=tmp_path, catalog=_catalog(srv, body), retries=1, backoff=0, timeout=5)
        assert sorted(f.path.name for f in got) == sorted(CIFAR) and {f.status for f in got} == {"downloaded"}
        assert not (tmp_path / "evil.bin").exists() and not (tmp_path / "cifar10" / "readme.html").exists()
        assert not (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").exists()  # the archive is removed
        again = fetch_dataset("cifar10", dest=tmp_path, catalog=_catalog(srv, body), retries=1, backoff=0, timeout=5)
        assert {f.status for f in again} == {"present"}
        _, listed = list_data(tmp_path, catalog=_catalog(srv, body))
        assert {f.name for f in listed if f.verified} == set(CIFAR)
        assert load_dataset("cifar10:test", data_dir=tmp_path).n == 4
    finally:
        srv.shutdown()
        srv.server_close()
    bad = _archive({**members, "cifar-10-batches-bin/test_batch.bin": _cifar_bytes(4, 10)})
    srv = _serve(bad)
    try:
        catalog = _catalog(srv, bad)  # the archive is the one announced, but a member is not the published file
        with pytest.raises(DataError, match="member cifar-10-batches-bin/test_batch.bin has SHA-256"):
            fetch_dataset("cifar10", dest=tmp_path / "b", catalog=catalog, retries=1, backoff=0, timeout=5)
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------------------ deep pixels and linked folders
def _one_image_folder(root, arr, name="x.png", **save):
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "b" / "z.png")
    Image.fromarray(arr).save(root / "a" / name, **save)
    return root


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]] * 4, np.uint16)  # 257 is 1/255 of the range: pixel value 1
    root = _one_image_folder(tmp_path / "d", arr)
    with Image.open(root / "a" / "x.png") as img:
        assert img.mode.startswith("I")  # what Pillow makes of a 16-bit PNG: Pillow's own 8-bit conversion clips it
        assert np.asarray(img.convert("L")).max() == 255 and np.asarray(img.convert("L"))[0, 1] == 255
    ds = load_dataset(f"folder:{root}")
    assert ds.images[0, 0, :, 0].tolist() == [0, 1, 128, 255]
    resized = load_dataset(f"folder:{root}", resize=(2, 2))
    assert resized.images.shape == (2, 2, 2, 1) and resized.images[0].max() <= 255


def test_float_tiff_is_scaled_from_0_1_or_refused(tmp_path):
    arr = np.array([[0.0, 0.25, 0.5, 1.0]] * 4, np.float32)
    root = _one_image_folder(tmp_path / "d", arr, "x.tif")
    assert load_dataset(f"folder:{root}").images[0, 0, :, 0].tolist() == [0, 64, 128, 255]
    bad = _one_image_folder(tmp_path / "e", arr * 300, "x.tif")
    with pytest.raises(DataError, match=r"a float image with values in \[0, 300\]; pyrobust reads float images in"):
        load_dataset(f"folder:{bad}")


def test_a_class_folder_linked_out_of_the_dataset_is_refused(tmp_path):
    root = _folder(tmp_path / "d")
    outside = _folder(tmp_path / "elsewhere", classes=("secret",))
    (root / "zebra").symlink_to(outside / "secret")
    with pytest.raises(DataError, match=r"class folder 'zebra' is a symbolic link to .*outside the dataset"):
        load_dataset(f"folder:{root}")
    (root / "zebra").unlink()
    (root / "cat" / "link.png").symlink_to(outside / "secret" / "img00.png")
    with pytest.raises(DataError, match=r"cat/link.png is a symbolic link to .*outside the dataset"):
        load_dataset(f"folder:{root}")
    (root / "cat" / "link.png").unlink()
    (root / "cats").symlink_to(root / "cat")  # a link inside the dataset is fine
    assert load_dataset(f"folder:{root}").classes == ("cat", "cats", "dog", "emu")
