import gzip
import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrobust.data.dataset import Dataset, parse_range, search_roots
from pyrobust.data.idx import parse_idx, read_idx
from pyrobust.data.load import load_dataset, load_folder, load_npz
from pyrobust.errors import DataError, InvalidInput
from tests.builders import idx_bytes, save_npz, write_mnist_folder


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 5, 4), dtype=np.uint8), rng.integers(0, 10, 12).astype(np.uint8)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip(tmp_path, tiny, compress):
    x, _ = tiny
    data = idx_bytes(x)
    p = tmp_path / ("a.gz" if compress else "a")
    p.write_bytes(gzip.compress(data) if compress else data)
    np.testing.assert_array_equal(read_idx(p), x)


def test_idx_other_dtypes():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(parse_idx(io.BytesIO(idx_bytes(a, 0x0D))), a)
    b = np.array([-5, 7, 2**20], dtype=np.int32)
    np.testing.assert_array_equal(parse_idx(io.BytesIO(idx_bytes(b, 0x0C))), b)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b"\x01" + b[1:], "bad magic number"),
    (lambda b: b[:2] + b"\x42" + b[3:], "bad magic number"),
    (lambda b: b[:3] + b"\x00" + b[4:], "bad magic number"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b[:-1], r"truncated IDX data: dimensions \(12, 5, 4\) need 240 bytes, found 239"),
    (lambda b: b + b"\x00", "longer than its dimensions"),
    (lambda b: b"", "bad magic number empty"),
])
def test_idx_rejects_malformed(tiny, mutate, match):
    with pytest.raises(DataError, match=match):
        parse_idx(io.BytesIO(mutate(idx_bytes(tiny[0]))))


def test_idx_refuses_absurd_header():
    head = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 2**20, 2**10)
    with pytest.raises(DataError, match="claims .* bytes of data"):
        parse_idx(io.BytesIO(head))


def test_truncated_gzip(tmp_path, tiny):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(idx_bytes(tiny[0]))[:-20])
    with pytest.raises(DataError, match="corrupt or truncated compressed data|truncated IDX data"):
        read_idx(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nope")


def test_folder_and_counts(tmp_path, tiny):
    x, y = tiny
    folder = write_mnist_folder(tmp_path / "d", x, y)
    ds = load_folder(folder, "test")
    assert ds.n == 12 and ds.image_shape == (5, 4, 1) and ds.index.tolist() == list(range(12))
    assert ds.labels.dtype == np.int64
    write_mnist_folder(tmp_path / "bad", x, y[:11])
    with pytest.raises(DataError, match="has 12 images but .* has 11 labels; the two files must match"):
        load_folder(tmp_path / "bad", "test")
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_folder(folder, "train")


@given(st.binary(max_size=300))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_idx_parser_on_arbitrary_bytes(data):
    try:
        arr = parse_idx(io.BytesIO(data))
    except DataError:
        return
    assert isinstance(arr, np.ndarray)


@pytest.mark.slow
@given(st.data())
@settings(max_examples=400, deadline=None)
def test_idx_parser_on_mutated_files(data):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytearray(idx_bytes(x))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    blob = bytes(raw)
    if data.draw(st.booleans()):
        blob = gzip.compress(blob)
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        try:
            with gzip.open(io.BytesIO(blob)) as fh:
                arr = parse_idx(fh)
        except DataError:
            return
    else:
        try:
            arr = parse_idx(io.BytesIO(blob))
        except DataError:
            return
    assert arr.size * arr.itemsize + 4 + 4 * arr.ndim <= len(bytes(raw))


def test_npz(tmp_path, tiny):
    x, y = tiny
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_npz(tmp_path / "d.npz")
    assert ds.n == 12 and ds.index.tolist() == list(range(12))
    np.savez(tmp_path / "i.npz", x=x.astype(np.float32) / 255, y=y, index=np.arange(100, 112))
    assert load_npz(tmp_path / "i.npz").index.tolist() == list(range(100, 112))


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((2, 3, 3))}, r"needs arrays 'x' \(images\) and 'y' \(labels\); missing \['y'\]"),
    ({"x": np.zeros((2, 3, 3)), "y": np.zeros(3, int)}, "2 images but 3 labels"),
    ({"x": np.zeros((2, 3, 3)), "y": np.zeros(2)}, "labels must be integers"),
    ({"x": np.zeros((2, 3, 3)) + 2, "y": np.zeros(2, int)}, r"float images must be finite and in \[0, 1\]"),
    ({"x": np.zeros((0, 3, 3)), "y": np.zeros(0, int)}, "the dataset is empty"),
    ({"x": np.zeros((2, 3)), "y": np.zeros(2, int)}, r"images must have shape \(n, H, W\)"),
    ({"x": np.zeros((2, 3, 3), np.int16), "y": np.zeros(2, int)}, "images must be uint8"),
    ({"x": np.zeros((2, 3, 3)), "y": np.array([0, -1])}, "labels must be >= 0"),
    ({"x": np.zeros((2, 3, 3)), "y": np.zeros(2, int), "index": np.array([1, 1])}, "distinct non-negative"),
])
def test_npz_rejects_bad_content(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_npz(tmp_path / "d.npz")


def test_npz_refuses_pickles(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataError, match="holds pickled objects, which pyrobust never loads"):
        load_npz(tmp_path / "p.npz")


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "z.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="not a valid .npz file"):
        load_npz(tmp_path / "z.npz")


@pytest.mark.slow
@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_npz_loader_on_arbitrary_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("npz") / "f.npz"
    p.write_bytes(data)
    try:
        ds = load_npz(p)
    except DataError:
        return
    assert isinstance(ds, Dataset)


@pytest.mark.slow
@given(st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_npz_loader_on_mutated_archives(tmp_path, data):
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((2, 3, 3), np.uint8), y=np.array([0, 1]))
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    p = tmp_path / "m.npz"
    p.write_bytes(bytes(raw))
    try:
        ds = load_npz(p)
    except DataError:
        return
    assert ds.images.ndim == 4


def test_named_dataset_search_and_message(tmp_path, tiny, monkeypatch):
    monkeypatch.delenv("PYROBUST_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no such folder"):  # an explicit folder must exist: no silent fallback
        load_dataset("fashion-mnist:test", data_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist:test", data_dir=tmp_path / "empty")
    msg = str(err.value)
    for where in (tmp_path / "empty" / "fashion-mnist", tmp_path / "cache" / "pyrobust" / "data" / "fashion-mnist",
                  "/usr/share/datasets/fashion-mnist"):
        assert str(where) in msg
    assert "pass --data-dir DIR (or set PYROBUST_DATA=DIR)" in msg
    x, y = tiny
    write_mnist_folder(tmp_path / "env" / "fashion-mnist", x, y)
    monkeypatch.setenv("PYROBUST_DATA", str(tmp_path / "env"))
    assert load_dataset("fashion-mnist:test").n == 12
    write_mnist_folder(tmp_path / "cache" / "pyrobust" / "data" / "mnist", x, y, prefix="train", compress=False)
    ds = load_dataset("mnist:train")
    assert (ds.name, ds.split, ds.n) == ("mnist", "train", 12)
    assert search_roots("D")[0].name == "D"


def test_data_dir_may_point_at_the_dataset_folder_itself(tmp_path, tiny):
    write_mnist_folder(tmp_path / "mnist", *tiny)
    assert load_dataset("mnist:test", data_dir=tmp_path / "mnist").n == 12


def test_specs(tmp_path, tiny):
    folder = write_mnist_folder(tmp_path / "mine", *tiny)
    assert load_dataset(f"{folder}:test").n == 12
    np.savez(tmp_path / "d.npz", x=tiny[0], y=tiny[1])
    assert load_dataset(str(tmp_path / "d.npz")).n == 12
    with pytest.raises(InvalidInput, match="a .npz file has no splits"):
        load_dataset(f"{tmp_path / 'd.npz'}:train")
    with pytest.raises(InvalidInput, match="split must be one of train, test; got 'val'"):
        load_dataset("mnist:val")
    with pytest.raises(DataError, match="dataset 'nope' not found"):
        load_dataset("nope")
    with pytest.raises(InvalidInput, match="dataset must be NAME:SPLIT"):
        load_dataset("")
    assert load_dataset("sample").name == "mnist-sample"


def test_selection_keeps_original_indices(sample):
    part = sample.select(start=100, stop=200)
    assert part.index.tolist() == list(range(100, 200))
    assert sample.select(start=100, stop=200, limit=5).index.tolist() == [100, 101, 102, 103, 104]
    assert sample.select(limit=3).index.tolist() == [0, 1, 2]
    with pytest.raises(InvalidInput, match="limit 501 is beyond the dataset: mnist-sample:test has 500 images"):
        sample.select(limit=501)
    with pytest.raises(InvalidInput, match="limit must be an integer >= 1"):
        sample.select(limit=0)
    with pytest.raises(InvalidInput, match=r"stop must be in \[0, 500\]"):
        sample.select(stop=600)
    with pytest.raises(InvalidInput, match="the index range 5:5 is empty"):
        sample.select(start=5, stop=5)


def test_parse_range():
    assert parse_range("100:200") == (100, 200)
    assert parse_range(":50") == (None, 50)
    for bad in ("100", "a:b"):
        with pytest.raises(InvalidInput, match="an index range is START:STOP"):
            parse_range(bad)


def test_sha_identifies_content(sample, tmp_path):
    a = sample.select(limit=10)
    save_npz(tmp_path / "s.npz", a)
    b = load_npz(tmp_path / "s.npz")
    assert b.sha256 == a.sha256
    assert sample.select(start=1, stop=11).sha256 != a.sha256


def test_shared_mnist_files(shared_data):
    test = load_dataset("mnist:test", data_dir=shared_data)
    assert test.n == 10000 and np.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                                        974, 1009]
    assert load_dataset("mnist:train", data_dir=shared_data).n in (5000, 60000)  # the project's subset, or all


@pytest.mark.slow
def test_an_npz_bomb_in_any_member_is_refused_before_it_is_inflated(tmp_path):
    """A few hundred KB of zip declaring 100 MiB of zeros in index.npy (the member the size check used to skip)."""
    import io
    import zipfile

    from pyrobust.data.load import load_npz
    from pyrobust.errors import DataError

    p = tmp_path / "bomb.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in (("x", np.zeros((5, 28, 28), np.uint8)), ("y", np.zeros(5, np.int64))):
            buf = io.BytesIO()
            np.save(buf, arr)
            z.writestr(f"{name}.npy", buf.getvalue())
        header = io.BytesIO()
        n = 100 * 2**20 // 8
        np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
        with z.open("index.npy", "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            for _ in range(100):
                fh.write(bytes(2**20))
    assert p.stat().st_size < 2**20
    with pytest.raises(DataError, match=r"holds 100 MiB of images, more than the 50 MiB"):
        load_npz(p, max_bytes=50 * 2**20)
