import hashlib

import numpy as np
import onnx
import pytest

from pyrobust import evaluate, replay
from pyrobust.cli import main
from pyrobust.engine.runtime import BoundModel, OnnxModel
from pyrobust.errors import DataError, InvalidInput, ModelError


@pytest.fixture
def fed(monkeypatch) -> set[bytes]:
    """A digest of every input row the engine feeds any bound model, from here on."""
    seen: set[bytes] = set()
    real = BoundModel.run

    def recording(self, flat):
        for row in flat:
            seen.add(hashlib.sha256(row.tobytes()).digest())
        return real(self, flat)

    monkeypatch.setattr(BoundModel, "run", recording)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("mode,norm", [("restart", None), ("cumulative", None), ("restart", ((0.13,), (0.31,)))])
def test_replay_rebuilds_the_exact_failing_input(tmp_path, bundled_model, sample, mode, norm, fed):
    model = OnnxModel(bundled_model)
    mean, std = norm if norm else (None, None)
    ev = evaluate(model, sample, start=50, stop=110, max_steps=40, mode=mode, mean=mean, std=std, seed=4,
                  out=tmp_path, report=False)
    fooled = ev.outcome.index[ev.outcome.first_failure > 0]
    assert fooled.size >= 2
    for idx in fooled:
        r = replay(tmp_path, index=int(idx))
        assert r.matches, (idx, r.prediction, r.recorded_label)
        x = r.perturbed[None] if mean is None else (r.perturbed[None] - np.float32(mean)) / np.float32(std)
        row = np.ascontiguousarray(x, np.float32).reshape(-1)
        assert hashlib.sha256(row.tobytes()).digest() in fed
        changed = int((r.perturbed != r.original).any(axis=2).sum())
        assert 1 <= changed <= (28 if mode == "restart" else 28 * r.step)  # a random walk accumulates


@pytest.mark.slow
def test_replay_any_step_and_errors(tmp_path, bundled_model, sample):
    ev = evaluate(bundled_model, sample, limit=80, max_steps=30, out=tmp_path, report=False)
    o = ev.outcome
    robust = int(o.index[o.first_failure == -1][0])
    fooled = int(o.index[o.first_failure > 1][0])
    r = replay(tmp_path, index=robust, step=30)
    assert r.recorded_label == r.label and r.matches
    assert replay(tmp_path, index=fooled, step=0).matches
    with pytest.raises(InvalidInput, match=f"image {robust} is robust .* pass step=S"):
        replay(tmp_path, index=robust)
    with pytest.raises(InvalidInput, match=r"image 400 was not evaluated .* \(original indices 0..79\)"):
        replay(tmp_path, index=400)
    ff = int(o.first_failure[o.index == fooled][0])
    with pytest.raises(InvalidInput, match=f"left play at step {ff}"):
        replay(tmp_path, index=fooled, step=ff + 1)
    with pytest.raises(InvalidInput, match=r"step must be an integer in \[0, 30\]"):
        replay(tmp_path, index=robust, step=31)
    proto = onnx.load(str(bundled_model))
    proto.doc_string = "changed"
    onnx.save(proto, str(tmp_path / "other.onnx"))
    with pytest.raises(ModelError, match="differs from the model the run evaluated"):
        replay(tmp_path, index=fooled, model=tmp_path / "other.onnx")


@pytest.mark.slow
def test_replay_refuses_changed_data(tmp_path, bundled_model, sample):
    from pyrobust.data.dataset import Dataset
    from tests.builders import save_npz

    ds = sample.select(limit=30)
    save_npz(tmp_path / "d.npz", ds)
    evaluate(bundled_model, str(tmp_path / "d.npz"), max_steps=5, out=tmp_path / "run", report=False)
    changed = Dataset(ds.name, ds.split, 255 - ds.images, ds.labels, ds.index, ds.source)
    save_npz(tmp_path / "d.npz", changed)
    with pytest.raises(DataError, match="now has SHA-256 .* but the run evaluated"):
        replay(tmp_path / "run", index=0, step=0)


@pytest.mark.slow
def test_replay_cli(capsys, tmp_path, bundled_model, sample):
    ev = evaluate(bundled_model, sample, limit=60, max_steps=30, out=tmp_path / "run", report=False)
    fooled = int(ev.outcome.index[ev.outcome.first_failure > 0][0])
    code = main(["replay", str(tmp_path / "run"), "--index", str(fooled), "--out", str(tmp_path / "f.npy")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "matches the record" in out
    assert np.load(tmp_path / "f.npy").shape == (28, 28, 1)
    assert main(["replay", str(tmp_path / "run"), "--index", str(fooled), "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "run"), "--index", "0", "--out", str(tmp_path / "f.txt")]) == 2
    assert "--out must end in .npy or .png" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "nothing"), "--index", "0"]) == 3


@pytest.mark.slow
def test_replay_without_the_model_fails_unless_told(capsys, tmp_path, bundled_model, sample):
    import shutil

    model = tmp_path / "m.onnx"
    shutil.copy(bundled_model, model)
    ev = evaluate(model, sample, limit=60, max_steps=30, out=tmp_path / "run", report=False)
    fooled = str(int(ev.outcome.index[ev.outcome.first_failure > 0][0]))
    model.unlink()
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "run"), "--index", fooled, "--out", str(tmp_path / "f.npy")]) == 3
    assert "could not be checked; pass --model FILE, or --no-check" in capsys.readouterr().err
    assert (tmp_path / "f.npy").exists()  # the input was rebuilt and written all the same
    assert main(["replay", str(tmp_path / "run"), "--index", fooled, "--no-check"]) == 0
    assert main(["replay", str(tmp_path / "run"), "--index", fooled, "--model", str(bundled_model)]) == 0
