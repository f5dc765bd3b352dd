import json

import numpy as np
import pytest

from pyrobust.errors import DataError, OutputError
from pyrobust.files import make_out_dir
from pyrobust.stats import survival_curve, wilson_interval
from pyrobust.store.results import build_summary, clear_run_files, load_results, run_files, write_results
from pyrobust.types import NoiseSpec, Outcome
from tests import naive


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(81, 263)  # Wikipedia-style check value, computed by hand
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo99, hi99 = wilson_interval(81, 263, confidence=0.99)
    assert lo99 < lo and hi99 > hi
    with pytest.raises(ValueError, match=r"successes must be in \[0, 10\]"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        wilson_interval(1, 10, confidence=1.0)


def test_survival_curve_matches_reference():
    ff = np.array([-1, 0, 1, 3, 3, -1, 7, 0, 2])
    got = survival_curve(ff, 7)
    np.testing.assert_allclose(got, naive.survival(ff, 7))
    assert got[0] == pytest.approx(7 / 9)  # accuracy
    assert got[-1] == pytest.approx(2 / 9)  # robust fraction
    assert np.all(np.diff(got) <= 0)


def _outcome():
    return Outcome(index=np.arange(6), label=np.array([0, 1, 1, 0, 2, 2]),
                   clean_prediction=np.array([0, 1, 0, 0, 2, 2], np.int32),
                   first_failure=np.array([-1, 4, 0, -1, -1, 1], np.int32),
                   failure_label=np.array([-1, 0, 0, -1, -1, -2], np.int32), inferences=100, noisy_inferences=94,
                   seconds=2.0)


def test_summary_numbers():
    s = build_summary(_outcome(), spec=NoiseSpec(max_steps=5), model={"name": "m"}, dataset={"name": "d"},
                      settings={"batch_size": 4}, n_classes=3)
    m = s["metrics"]
    assert s["schema_version"] == 2
    assert m["accuracy"]["count"] == 5 and m["accuracy"]["fraction"] == pytest.approx(5 / 6)
    assert m["robust"]["fraction"] == pytest.approx(3 / 6)
    assert m["robust_of_correct"]["fraction"] == pytest.approx(3 / 5)
    assert m["robust"]["ci95"] == list(wilson_interval(3, 6))
    assert m["nonfinite_outputs"] == 1 and m["fooled"] == 2 and m["wrong_before_noise"] == 1
    assert m["first_failure_step"] == {"mean": 2.5, "median": 2.5}
    assert s["survival"]["fraction"] == pytest.approx([5 / 6, 4 / 6, 4 / 6, 4 / 6, 3 / 6, 3 / 6])
    assert [c["robust"] for c in s["per_class"]] == [2, 0, 1]
    assert [c["images"] for c in s["per_class"]] == [2, 2, 2]
    assert s["per_class"][1]["robust_rate_of_correct"] == 0.0
    assert s["performance"]["inferences_per_second"] == 50.0
    assert s["noise"]["pixels"] == 28 and s["settings"]["batch_size"] == 4
    assert set(s["versions"]) >= {"python", "numpy", "numba", "onnxruntime"}
    json.dumps(s, allow_nan=False)


def test_write_and_load_roundtrip(tmp_path):
    o = _outcome()
    s = build_summary(o, spec=NoiseSpec(max_steps=5), model={"sha256": "a" * 64}, dataset={"sha256": "b" * 64},
                      settings={}, n_classes=3)
    out = make_out_dir(tmp_path / "run")
    write_results(out, o, s)
    got, summary = load_results(out)
    for name in Outcome.ARRAYS:
        assert np.array_equal(getattr(got, name), getattr(o, name))
    assert summary == json.loads(json.dumps(s))
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("tamper,match", [
    (lambda s, a: s["per_class"][0].update(images=-5), "the counts of class 0 are not those of results.npz"),
    (lambda s, a: s["metrics"]["robust"].update(count=10**6), "counts .* are not those of results.npz"),
    (lambda s, a: s["noise"].update(max_steps=0), "invalid noise settings"),
    (lambda s, a: s["model"].update(sha256="not-a-digest"), "model SHA-256 is not a SHA-256 hex digest"),
    (lambda s, a: s.pop("per_class"), "missing or malformed field 'per_class'"),
    (lambda s, a: a.update(first_failure=np.array([9, 4, 0, -1, -1, 1], np.int32)), r"steps outside \[-1, 5\]"),
    (lambda s, a: a.update(failure_label=np.full(6, -1, np.int32)), "failure labels do not match"),
    (lambda s, a: a.update(index=np.array([0, 0, 1, 2, 3, 4])), "repeated image indices"),
    (lambda s, a: a.update(label=np.array([0, 1, 2])), "'label' holds 3 entries, not 6"),
])
def test_crafted_results_are_refused(tmp_path, tamper, match):
    """A results folder is read back as strictly as input: every count must be its arrays'."""
    o = _outcome()
    s = build_summary(o, spec=NoiseSpec(max_steps=5), model={"sha256": "a" * 64}, dataset={"sha256": "b" * 64},
                      settings={}, n_classes=3)
    out = make_out_dir(tmp_path / "run")
    s = json.loads(json.dumps(s))
    arrays = {name: getattr(o, name) for name in Outcome.ARRAYS}
    tamper(s, arrays)
    (out / "summary.json").write_text(json.dumps(s))
    np.savez(out / "results.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_results(out)


def test_out_dir_helpers(tmp_path):
    out = make_out_dir(tmp_path / "a" / "b")
    (out / "summary.json").write_text("{}")
    (out / "results.npz").write_bytes(b"")
    (out / "mine.txt").write_text("kept")
    assert run_files(out) == ["results.npz", "summary.json"]
    clear_run_files(out)
    assert run_files(out) == [] and (out / "mine.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        make_out_dir(tmp_path / "file")


def test_unwritable_out_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path / "file_parent"
            target.write_text("x")
            locked_out = target / "out"
        else:
            locked_out = locked / "out"
        with pytest.raises(OutputError, match="cannot write there|exists and is not a folder"):
            make_out_dir(locked_out)
    finally:
        locked.chmod(0o700)


def test_load_unfinished_and_foreign(tmp_path):
    (tmp_path / "results.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"an unfinished run \(no summary.json\)"):
        load_results(tmp_path)
    with pytest.raises(DataError, match="not a pyrobust results folder"):
        load_results(tmp_path / "empty")
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable results"):
        load_results(tmp_path)


def test_noise_spec_validation():
    from pyrobust.errors import InvalidInput

    for kwargs, match in [({"pixels": 0}, "pixels must be an integer >= 1"),
                          ({"max_steps": 0}, "max_steps must be an integer in \\[1, "),
                          ({"low": 1.0, "high": 0.5}, "finite low < high"),
                          ({"scheme": "x"}, "scheme must be one of uniform, salt-pepper"),
                          ({"mode": "x"}, "mode must be one of restart, cumulative"),
                          ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64 - 1\]"),
                          ({"mean": (0.1,)}, "needs both mean and std"),
                          ({"mean": (0.1,), "std": (0.0,)}, r"std in \[1e-06, 1e\+06\]"),
                          ({"mean": (0.1, 0.2), "std": (1.0,)}, "one value per channel each")]:
        with pytest.raises(InvalidInput, match=match):
            NoiseSpec(**kwargs)
    spec = NoiseSpec(mean=[0.5], std=[0.25], seed=2**64 - 1)
    assert NoiseSpec.from_dict(spec.to_dict()) == spec
