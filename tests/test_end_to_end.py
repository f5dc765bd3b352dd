"""End to end on the real MNIST files in ../shared/data."""

import numpy as np
import pytest

from pyrobust import evaluate, load_results, replay
from pyrobust.cli import main

pytestmark = pytest.mark.slow


def test_cli_on_real_mnist(capsys, tmp_path, bundled_model, shared_data, sample):
    out = tmp_path / "mnist"
    code = main(["evaluate", str(bundled_model), "--dataset", "mnist:test", "--data-dir", str(shared_data),
                 "--range", "9500:10000", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    outcome, summary = load_results(out)
    assert outcome.index.tolist() == list(range(9500, 10000))
    m = summary["metrics"]
    assert m["accuracy"]["fraction"] > 0.9  # the bundled CNN reaches ~97% on the MNIST test set
    assert 0 < m["robust"]["fraction"] < m["accuracy"]["fraction"]
    assert summary["survival"]["fraction"][0] == m["accuracy"]["fraction"]
    assert summary["survival"]["fraction"][-1] == m["robust"]["fraction"]
    assert summary["dataset"]["source"].endswith("t10k-images-idx3-ubyte.gz")
    fooled = outcome.index[outcome.first_failure > 0]
    for idx in fooled[:5]:
        assert replay(out, index=int(idx)).matches


def test_the_bundled_sample_is_the_start_of_the_mnist_test_set(bundled_model, shared_data, sample):
    """The sample is MNIST test images 0-499, so its per-image results equal those of the full file's first 500."""
    a = evaluate(bundled_model, "mnist:test", data_dir=shared_data, limit=500, max_steps=40)
    b = evaluate(bundled_model, sample, max_steps=40)
    assert a.summary["dataset"]["sha256"] == b.summary["dataset"]["sha256"]
    assert np.array_equal(a.outcome.first_failure, b.outcome.first_failure)


def test_fashion_mnist_files_load(shared_data):
    from pyrobust.data.load import load_dataset

    ds = load_dataset("fashion-mnist:test", data_dir=shared_data, limit=100)
    assert ds.image_shape == (28, 28, 1) and ds.n == 100
