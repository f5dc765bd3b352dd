import json

import numpy as np
import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.errors import InvalidInput, ModelError
from pyrobust.study.selection import random_subset, select_robust
from pyrobust.types import Outcome

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier


def _outcome(first_failure, labels):
    n = len(labels)
    ff = np.asarray(first_failure, np.int32)
    return Outcome(index=np.arange(1000, 1000 + n), label=np.asarray(labels), clean_prediction=np.zeros(n, np.int32),
                   first_failure=ff, failure_label=np.where(ff == -1, -1, 0).astype(np.int32))


@pytest.fixture
def outcome():
    # class 0: 6 robust; class 1: 2 robust, 3 fooled (steps 5, 9, 9), 1 wrong; class 2: nothing robust
    ff = [-1] * 6 + [-1, -1, 5, 9, 9, 0] + [3, 0]
    labels = [0] * 6 + [1] * 6 + [2, 2]
    return _outcome(ff, labels)


def test_counts_and_the_shortfall_table(outcome):
    sel = select_robust(outcome, per_class=4, seed=1)
    assert [(r["asked"], r["available"], r["taken"]) for r in sel.table] == [(4, 6, 4), (4, 2, 2), (4, 0, 0)]
    assert sel.short_classes == [1, 2] and sel.n == 6
    assert set(outcome.first_failure[sel.positions]) == {-1}
    assert np.array_equal(np.bincount(outcome.label[sel.positions], minlength=3), [4, 2, 0])


def test_seeds(outcome):
    a = select_robust(outcome, per_class=3, seed=1).positions
    assert np.array_equal(a, select_robust(outcome, per_class=3, seed=1).positions)
    assert any(not np.array_equal(a, select_robust(outcome, per_class=3, seed=s).positions) for s in range(2, 6))


def test_classes_draw_independently():
    labels = [0] * 50 + [1] * 50
    base = select_robust(_outcome([-1] * 100, labels), per_class=10, seed=7)
    ff = [-1] * 50 + [-1 if i % 2 else 4 for i in range(50)]  # class 1 changes
    other = select_robust(_outcome(ff, labels), per_class=10, seed=7)
    assert np.array_equal(base.positions[:10], other.positions[:10])


def test_shortfall_replace_and_fill(outcome):
    rep = select_robust(outcome, per_class=4, seed=0, shortfall="replace")
    assert [r["taken"] for r in rep.table] == [4, 4, 0] and rep.table[1]["replaced"]
    assert set(rep.positions[4:8]) <= {6, 7}
    fill = select_robust(outcome, per_class=4, seed=0, shortfall="fill")
    cls1 = fill.positions[4:8]
    # the 2 robust, then the most robust fooled ones: steps 9, 9 (ties by original index), never the wrong one
    assert cls1.tolist() == [6, 7, 9, 10] and fill.table[1]["filled"] == 2
    assert fill.table[2]["taken"] == 1 and fill.table[2]["filled"] == 1  # class 2: only the one fooled at step 3


@pytest.mark.parametrize("kwargs,match", [({"per_class": 0}, r"per_class must be an integer in \[1, "),
                                          ({"per_class": 2, "seed": -1}, "seed must be an integer >= 0"),
                                          ({"per_class": 2, "shortfall": "x"}, "shortfall must be one of")])
def test_bad_options(outcome, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        select_robust(outcome, **kwargs)


def test_random_subset():
    labels = np.repeat(np.arange(3), 20)
    pos = random_subset(labels, {0: 5, 1: 0, 2: 20}, seed=3)
    assert np.array_equal(np.bincount(labels[pos], minlength=3), [5, 0, 20])
    assert np.array_equal(pos, random_subset(labels, {0: 5, 1: 0, 2: 20}, seed=3))
    with pytest.raises(InvalidInput, match="class 0 has 20 images; cannot sample 21"):
        random_subset(labels, {0: 21}, seed=0)


def test_select_cli_writes_a_traceable_subset(capsys, tmp_path, bundled_model, sample):
    ev = pyrobust.evaluate(bundled_model, "sample", start=100, stop=400, max_steps=30, out=tmp_path / "run",
                           report=False)
    # the sample is test data: selecting training images from it is refused unless asked for
    assert main(["select", str(tmp_path / "run"), "--per-class", "12", "--out", str(tmp_path / "subset.npz")]) == 2
    err = capsys.readouterr().err
    assert "evaluated a test split (sample)" in err and "--allow-test-split" in err
    assert not (tmp_path / "subset.npz").exists()
    code = main(["select", str(tmp_path / "run"), "--per-class", "12", "--seed", "5", "--out",
                 str(tmp_path / "subset.npz"), "--allow-test-split"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "selection (" in out and "wrote" in out
    with np.load(tmp_path / "subset.npz", allow_pickle=False) as z:
        x, y, src = z["x"], z["y"], z["source_index"]
    meta = json.loads((tmp_path / "subset.json").read_text())
    assert meta["per_class"] == 12 and meta["seed"] == 5 and sum(r["taken"] for r in meta["table"]) == len(y)
    # every selected image traces back to its original index, with its label, pixels and robustness
    pos = np.searchsorted(ev.outcome.index, src)
    assert np.array_equal(ev.outcome.index[pos], src)
    assert (ev.outcome.first_failure[pos] == -1).all()
    assert np.array_equal(y, ev.outcome.label[pos])
    assert np.array_equal(x, sample.images[src][..., 0])
    ds = pyrobust.load_dataset(str(tmp_path / "subset.npz"))
    assert ds.n == len(y)
    assert main(["select", str(tmp_path / "run"), "--per-class", "500", "--out", str(tmp_path / "s2"),
                 "--allow-test-split"]) == 0
    assert "have fewer robust images than asked; took all of them" in capsys.readouterr().err
    assert (tmp_path / "s2" / "subset.npz").exists() and (tmp_path / "s2" / "selection.json").exists()
    assert main(["select", str(tmp_path / "nothing"), "--per-class", "5", "--out", str(tmp_path / "s3")]) == 3


def test_retrain_reuses_recorded_settings(capsys, tmp_path, sample):
    pytest.importorskip("torch")
    from pyrobust.training import train, training_settings

    train(sample.select(limit=200), out=tmp_path / "m.onnx", architecture="mlp", epochs=1, seed=4, batch_size=64,
          learning_rate=2e-3)
    assert training_settings(tmp_path / "m.onnx") == {"architecture": "mlp", "epochs": 1, "seed": 4, "n_classes": 10,
                                                      "batch_size": 64, "learning_rate": 2e-3}
    from tests.builders import save_npz

    save_npz(tmp_path / "sub.npz", sample.select(start=200, stop=300))
    assert main(["retrain", str(tmp_path / "sub.npz"), "--like", str(tmp_path / "m.onnx"), "--out",
                 str(tmp_path / "r.onnx")]) == 0
    assert "(mlp, 1 epochs, seed 4, 100 images" in capsys.readouterr().out
    assert training_settings(tmp_path / "r.onnx")["learning_rate"] == 2e-3


def test_retrain_needs_a_pyrobust_model(tmp_path, models):
    from pyrobust.training import training_settings

    with pytest.raises(ModelError, match="has no pyrobust training metadata"):
        training_settings(models["linear_nchw"])
