import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pyrobust.cli import main
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import InvalidInput, MissingDependency, ModelError

pytest.importorskip("torch", reason="training needs pyrobust[train]")

from pyrobust.training import train  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier


def _weights(path):
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


@pytest.fixture(scope="module")
def small(sample):
    return sample.select(limit=256)


def test_training_is_reproducible_with_a_seed(tmp_path, small):
    a = train(small, out=tmp_path / "a.onnx", architecture="mlp", epochs=1, seed=1)
    b = train(small, out=tmp_path / "b.onnx", architecture="mlp", epochs=1, seed=1)
    c = train(small, out=tmp_path / "c.onnx", architecture="mlp", epochs=1, seed=2)
    wa, wb, wc = _weights(a.out), _weights(b.out), _weights(c.out)
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(wa, wc, strict=True))
    assert a.losses == b.losses and a.parity_max_abs_diff < 1e-4


def test_cnn_export_has_dynamic_batch_and_metadata(tmp_path, small):
    r = train(small, out=tmp_path / "cnn.onnx", architecture="cnn", epochs=2, seed=0)
    assert r.losses[1] < r.losses[0]
    m = OnnxModel(r.out)
    assert m.input.name == "image" and m.input_shape[0] is None and m.input_shape[1:] == [1, 28, 28]
    m = m.bind((28, 28, 1), n_classes=10)
    assert m.binding.fixed_batch is None
    assert m.run(m.to_flat(small.float_images(0, 13))).shape == (13, 10)
    meta = {p.key: p.value for p in onnx.load(str(r.out)).metadata_props}
    assert meta["pyrobust.architecture"] == "cnn" and meta["pyrobust.seed"] == "0"
    assert meta["pyrobust.dataset_sha256"] == small.sha256
    import torch

    assert meta["pyrobust.torch_version"] == torch.__version__ and int(meta["pyrobust.threads"]) >= 1
    assert "use_deterministic_algorithms(True)" in meta["pyrobust.deterministic"]


def test_same_seed_threads_and_torch_give_the_same_bytes(tmp_path, small):
    """What the README promises, no more: the same seed, data, settings, thread count and torch version give the
    same file, byte for byte."""
    a = train(small, out=tmp_path / "a.onnx", architecture="cnn", epochs=1, seed=3, threads=1)
    b = train(small, out=tmp_path / "b.onnx", architecture="cnn", epochs=1, seed=3, threads=1)
    assert a.sha256 == b.sha256
    meta = {p.key: p.value for p in onnx.load(str(a.out)).metadata_props}
    assert meta["pyrobust.threads"] == "1"


@pytest.mark.parametrize("kwargs,match", [
    ({"architecture": "resnet"}, "architecture must be one of cnn, mlp"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"learning_rate": 0}, "learning_rate must be a number > 0"),
])
def test_training_rejects_bad_options(tmp_path, small, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        train(small, out=tmp_path / "m.onnx", **kwargs)


def test_training_output_path_checks(tmp_path, small):
    with pytest.raises(InvalidInput, match="--out must end in .onnx"):
        train(small, out=tmp_path / "m.pt")
    with pytest.raises(InvalidInput, match="folder does not exist"):
        train(small, out=tmp_path / "no" / "m.onnx")


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path, small):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependency, match=r"training needs torch: pip install torch==2.13.0 'pyrobust\[train\]'"):
        train(small, out=tmp_path / "m.onnx")


def test_train_cli(capsys, tmp_path):
    code = main(["train", "--dataset", "sample", "--limit", "200", "--arch", "mlp", "--epochs", "1",
                 "--test-dataset", "sample", "--out", str(tmp_path / "m.onnx")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "wrote" in out and "test accuracy on mnist-sample:test" in out and "epoch 1/1" in err
    assert main(["evaluate", str(tmp_path / "m.onnx"), "--dataset", "sample", "--limit", "10", "--max-steps", "3",
                 "--no-report", "--out", str(tmp_path / "run")]) == 0


def test_fine_tuning_and_the_same_number_of_updates(tmp_path, small, sample, capsys):
    from pyrobust.cli import main
    from pyrobust.training import retrain, training_updates
    from tests.builders import save_npz

    m = train(small, out=tmp_path / "m.onnx", architecture="mlp", epochs=2, seed=3, batch_size=32)
    assert training_updates(m.out) == 2 * 8  # 256 images in batches of 32, twice
    sub = sample.select(start=300, stop=340)  # 40 images: 2 steps an epoch at batch 32
    fresh = retrain(sub, like=m.out, out=tmp_path / "fresh.onnx")
    same = retrain(sub, like=m.out, out=tmp_path / "same.onnx", same_updates=True)
    assert training_updates(fresh.out) == 2 * 2 and training_updates(same.out) == 16 and same.epochs == 8
    tuned = retrain(sub, like=m.out, out=tmp_path / "tuned.onnx", finetune=True)
    # fine-tuning starts from M: after 4 small steps its weights are far nearer M's than a fresh start's are
    near = sum(float(np.abs(a - b).mean()) for a, b in zip(_weights(tuned.out), _weights(m.out), strict=True))
    far = sum(float(np.abs(a - b).mean()) for a, b in zip(_weights(fresh.out), _weights(m.out), strict=True))
    assert near < far / 2
    meta = {p.key: p.value for p in onnx.load(str(tuned.out)).metadata_props}
    assert meta["pyrobust.init_from_sha256"] == m.sha256
    save_npz(tmp_path / "sub.npz", sub)
    assert main(["retrain", str(tmp_path / "sub.npz"), "--like", str(m.out), "--from", str(m.out), "--same-updates",
                 "--out", str(tmp_path / "cli.onnx")]) == 0
    assert "fine-tuned from" in capsys.readouterr().out and training_updates(tmp_path / "cli.onnx") == 16
    cnn = train(small, out=tmp_path / "cnn.onnx", architecture="cnn", epochs=1, seed=0)
    with pytest.raises(ModelError, match="weights do not fit this architecture"):
        retrain(sub, like=m.out, out=tmp_path / "x.onnx", init_from=cnn.out)
