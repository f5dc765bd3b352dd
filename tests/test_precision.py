"""``evaluate(precision=...)``: stop once the robust fraction and the accuracy are known to ± precision, with
sequential intervals that cover at their stated rate (checked by simulation), results identical to a full run's
on the images used, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyrobust import evaluate
from pyrobust.cli import main
from pyrobust.errors import Interrupted, InvalidInput, ModelError
from pyrobust.evaluation import precision_alpha_side
from pyrobust.sequential import precision_bounds
from pyrobust.stats import look_schedule
from tests.gate_sim import mc_bound

SPEC = dict(max_steps=30, report=False)


@pytest.fixture(scope="module")
def full(bundled_model):
    return evaluate(bundled_model, "sample", **SPEC)


@pytest.mark.slow
def test_stops_at_the_first_look_that_is_precise_enough(bundled_model, full):
    ev = evaluate(bundled_model, "sample", precision=0.15, **SPEC)
    prec = ev.summary["precision"]
    assert prec["reached"] and prec["stopped_early"] and prec["images_evaluated"] == 100 == ev.outcome.n
    assert prec["looks_planned"] == look_schedule(500) and prec["images_total"] == 500
    assert prec["confidence_per_look"] == pytest.approx(1 - 0.05 / 5)
    for name in ("robust", "accuracy"):
        lo, hi = prec[name]["interval"]
        assert lo <= prec[name]["fraction"] <= hi and prec[name]["half_width"] <= 0.15
    assert "after 100 of 500 images" in prec["reason"]
    # the images used are a seeded random 100, and their results are the full run's, bit for bit
    pos = np.searchsorted(full.outcome.index, ev.outcome.index)
    assert np.array_equal(full.outcome.index[pos], ev.outcome.index) and not np.array_equal(pos, np.arange(100))
    for name in ("first_failure", "clean_prediction", "failure_label"):
        assert np.array_equal(getattr(full.outcome, name)[pos], getattr(ev.outcome, name))
    assert ev.summary["metrics"]["images"] == 100 and ev.outcome.inferences < 0.4 * full.outcome.inferences
    # the same order with the same seed; another seed takes other images
    again = evaluate(bundled_model, "sample", precision=0.15, **SPEC)
    assert np.array_equal(again.outcome.index, ev.outcome.index)
    other = evaluate(bundled_model, "sample", precision=0.15, seed=1, **SPEC)
    assert not np.array_equal(other.outcome.index, ev.outcome.index)


@pytest.mark.slow
def test_says_when_the_data_run_out(bundled_model, full):
    ev = evaluate(bundled_model, "sample", precision=0.01, **SPEC)
    prec = ev.summary["precision"]
    assert not prec["reached"] and not prec["stopped_early"] and ev.outcome.n == 500
    assert "the data ran out" in prec["reason"] and "short of ±1.00%" in prec["reason"]
    assert np.array_equal(ev.outcome.first_failure, full.outcome.first_failure)
    assert "precision" not in full.summary


@pytest.mark.parametrize("bad", [0, 0.5, -0.1, 2, True, "1%"])
def test_bad_precision_is_refused(bundled_model, bad):
    with pytest.raises(InvalidInput, match="precision must be a half-width in"):
        evaluate(bundled_model, "sample", precision=bad, **SPEC)


@pytest.mark.slow
def test_cli(capsys, tmp_path, bundled_model):
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--max-steps", "30", "--precision", "15%",
                 "--no-report", "--out", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 0 and "│ precision" in out and "both intervals within ±15.00%" in out
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["precision"]["target"] == 0.15 and s["dataset"]["count"] == 100
    for bad in ("60%", "zero"):
        assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--precision", bad, "--out",
                     str(tmp_path / "q")]) == 2
        assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_same_result(tmp_path, bundled_model):
    ref = evaluate(bundled_model, "sample", precision=0.07, **SPEC)
    assert 100 < ref.outcome.n < 500  # needs several looks
    calls = {"n": 0}

    def stop_in_look_two(done, total, inferences):
        calls["n"] += 1
        if done >= 40 and total != 100:  # inside the second look's new images
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="checkpoint saved"):
        evaluate(bundled_model, "sample", precision=0.07, out=tmp_path / "r", batch_size=16, sessions=1,
                 checkpoint_every=1e-9, progress=stop_in_look_two, **SPEC)
    ev = evaluate(bundled_model, "sample", precision=0.07, out=tmp_path / "r", resume=True, batch_size=16, **SPEC)
    assert ev.resumed and np.array_equal(ev.outcome.index, ref.outcome.index)
    assert np.array_equal(ev.outcome.first_failure, ref.outcome.first_failure)
    assert ev.summary["precision"]["images_evaluated"] == ref.summary["precision"]["images_evaluated"]


@pytest.mark.slow
def test_a_model_that_gives_only_nan_is_an_error(tmp_path, models, sample):
    with pytest.raises(ModelError, match="every output of the model is NaN or infinite"):
        evaluate(models["nan"], sample, **SPEC)
    with pytest.raises(ModelError, match="NaN or infinite"):
        evaluate(models["nan"], sample, precision=0.05, **SPEC)
    assert main(["evaluate", str(models["nan"]), "--dataset", "sample", "--max-steps", "5", "--out",
                 str(tmp_path / "nan")]) == 3
    assert not (tmp_path / "nan" / "checkpoint.npz").exists() and not (tmp_path / "nan" / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("total", [500, 2000, 10000])
@pytest.mark.parametrize("precision", [0.01, 0.02, 0.05])
def test_sequential_intervals_cover_at_their_stated_rate(total, precision):
    """Simulated runs with the stopping rule evaluate uses (robust fraction 0.3 to 0.9): each reported interval
    holds the true value in at least 95 % of runs, less three Monte-Carlo standard errors."""
    reps = 2000
    looks = look_schedule(total)
    side = precision_alpha_side(len(looks))
    rng = np.random.default_rng(total + int(precision * 1000))
    for robust, accuracy in ((0.3, 0.9), (0.6, 0.9), (0.88, 0.97), (0.9, 0.99)):
        cells = np.array([robust, accuracy - robust, 1 - accuracy])
        cum = np.zeros((reps, 3), np.int64)
        stopped = np.zeros(reps, np.bool_)
        cover = {"robust": np.zeros(reps, np.bool_), "accuracy": np.zeros(reps, np.bool_)}
        done = 0
        for n in looks:
            live = ~stopped
            cum[live] += rng.multinomial(n - done, cells, size=int(live.sum()))
            done = n
            r = precision_bounds(cum[:, 0], n, side)
            a = precision_bounds(cum[:, 0] + cum[:, 1], n, side)
            stop_now = live & (((r[3] <= precision) & (a[3] <= precision)) | (n == total))
            cover["robust"][stop_now] = ((r[1] <= robust) & (robust <= r[2]))[stop_now]
            cover["accuracy"][stop_now] = ((a[1] <= accuracy) & (accuracy <= a[2]))[stop_now]
            stopped |= stop_now
        for name, hit in cover.items():
            miss = 1 - hit.mean()
            assert miss <= mc_bound(0.05, reps), f"{name} at {robust}/{accuracy}: misses {miss:.3f}"
