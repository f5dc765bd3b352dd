"""Failure counts (``count_failures``) and clean margins: the counting protocol against its naive reference, the same
results on every layout and after a resume, the K-th failure replayed, and the read-back checks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import DataError, InvalidInput, PyRobustError
from pyrobust.store.results import RESULTS_FILE, load_results, result_arrays
from pyrobust.types import ROBUST, FailureTarget, NoiseSpec, Outcome
from tests import naive
from tests.engine.test_engine import _predict_one

COUNTED = ("clean_prediction", "first_failure", "failure_label", "failures")


def _same(a: Outcome, b: Outcome) -> None:
    for name in COUNTED:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.clean_margin, b.clean_margin, equal_nan=True)


@pytest.fixture(scope="module")
def counted(bundled_model, sample):
    spec = NoiseSpec(max_steps=40, seed=2, count_failures=True)
    ds = sample.select(limit=120)
    return spec, ds, run_protocol(OnnxModel(bundled_model, threads=1), ds, spec, batch_size=64)


def test_counting_matches_the_naive_protocol(bundled_model, sample):
    ds = sample.select(start=40, stop=80)  # wrong before noise, fooled and robust images
    spec = NoiseSpec(pixels=28, max_steps=25, seed=3, count_failures=True)
    got = run_protocol(OnnxModel(bundled_model, threads=1), ds, spec, batch_size=16)
    first, fail, count = naive.failure_counts(_predict_one(bundled_model), ds.float_images(), ds.labels, ds.index,
                                              seed=3, pixels=28, max_steps=25)
    assert np.array_equal(got.first_failure, first)
    assert np.array_equal(got.failure_label, fail)
    assert np.array_equal(got.failures, count)
    assert (count > 1).any() and (got.first_failure == 0).any() and (got.first_failure == ROBUST).any()


def test_counting_keeps_the_first_failures_of_the_plain_protocol(bundled_model, counted):
    spec, ds, got = counted
    plain = run_protocol(OnnxModel(bundled_model, threads=1), ds, NoiseSpec(max_steps=40, seed=2), batch_size=64)
    for name in ("clean_prediction", "first_failure", "failure_label"):
        assert np.array_equal(getattr(got, name), getattr(plain, name)), name
    assert plain.failures is None
    assert np.array_equal(got.clean_margin, plain.clean_margin, equal_nan=True)
    # the work: every step of every correctly classified image
    assert got.noisy_inferences >= 40 * int(got.correct.sum())


@pytest.mark.parametrize("batch_size,chunk_size,threads", [(1, 4096, 1), (7, 37, 2), (256, 4096, 2)])
def test_counts_do_not_depend_on_batch_chunk_or_threads(bundled_model, counted, batch_size, chunk_size, threads):
    spec, ds, ref = counted
    part = ds if batch_size > 1 else ds.select(limit=30)
    got = run_protocol(OnnxModel(bundled_model, threads=threads), part, spec, batch_size=batch_size,
                       chunk_size=chunk_size)
    _same(got, ref.take(np.arange(part.n)))


def test_clean_margins_are_the_models_own(bundled_model, counted):
    _, ds, got = counted
    sess = ort.InferenceSession(str(bundled_model), providers=["CPUExecutionProvider"])
    x = ds.float_images().reshape(ds.n, 1, 28, 28).astype(np.float32)
    scores = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = np.array([naive.margin(scores[i], int(ds.labels[i])) for i in range(ds.n)])
    assert np.allclose(got.clean_margin, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got.clean_margin > 0, got.correct)


STUDY_M_R = Path(__file__).resolve().parents[2] / "docs" / "results" / "mnist" / "models" / "M_R.onnx"


SESSIONS, DASK = dict(sessions=2, threads=2, shard_size=7), dict(scheduler="local:2", shard_size=37)


@pytest.mark.slow
@pytest.mark.parametrize("which,layout", [("bundled", SESSIONS), ("bundled", DASK), ("study M_R", SESSIONS)],
                         ids=["bundled-sessions", "bundled-dask", "study-sessions"])
def test_counts_are_bit_identical_across_sessions_and_dask(bundled_model, layout, which):
    model = bundled_model if which == "bundled" else STUDY_M_R  # the study's model: fooled more, counted more
    ref = pyrobust.evaluate(model, "sample", limit=150, max_steps=30, seed=4, count_failures=True,
                            sessions=1, batch_size=64).outcome
    got = pyrobust.evaluate(model, "sample", limit=150, max_steps=30, seed=4, count_failures=True,
                            batch_size=32, **layout).outcome
    _same(got, ref)
    assert (got.failures > 1).any()


def test_the_margin_block_is_json_safe():
    from pyrobust.store.results import margin_block

    n = 6
    o = Outcome(index=np.arange(n), label=np.zeros(n, np.int64), clean_prediction=np.zeros(n, np.int32),
                first_failure=np.array([-1, -1, 3, -1, 2, 0], np.int32),
                failure_label=np.array([-1, -1, 1, -1, 1, 1], np.int32), clean_margin=np.full(n, np.inf))
    block = margin_block(o)  # a one-class model: every margin +inf
    json.dumps(block, allow_nan=False)
    assert block["median_robust"] is None and block["images"] == 5
    assert margin_block(Outcome(**{k: getattr(o, k) for k in Outcome.ARRAYS})) is None  # not recorded


@pytest.mark.slow
def test_an_interrupted_counting_run_resumes_bit_identically(tmp_path, bundled_model):
    kw = dict(limit=200, max_steps=60, seed=3, count_failures=True, batch_size=16, sessions=1)
    ref = pyrobust.evaluate(bundled_model, "sample", **kw).outcome
    calls = {"n": 0}

    def interrupt(done, total, inferences):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt

    with pytest.raises(PyRobustError, match="interrupted after"):
        pyrobust.evaluate(bundled_model, "sample", out=tmp_path, progress=interrupt, checkpoint_every=0.01, **kw)
    ev = pyrobust.evaluate(bundled_model, "sample", out=tmp_path, resume=True, **{**kw, "batch_size": 64})
    assert ev.resumed and not ev.already_complete
    _same(load_results(tmp_path).outcome, ref)


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory, bundled_model):
    out = tmp_path_factory.mktemp("counted")
    ev = pyrobust.evaluate(bundled_model, "sample", limit=100, max_steps=50, seed=1, count_failures=True, out=out,
                           report=False)
    return out, ev


def test_the_kth_failure_is_replayed_exactly(counted_run):
    out, ev = counted_run
    pos = int(np.argmax(ev.failures))
    index, k = int(ev.index[pos]), int(ev.failures[pos])
    assert k >= 3
    steps = [pyrobust.replay(out, index=index, failure=j) for j in range(1, k + 1)]
    assert all(r.matches for r in steps)
    assert [r.step for r in steps] == sorted({r.step for r in steps})  # increasing, distinct
    assert steps[0].step == ev.first_failure[pos] and steps[0].recorded_label == ev.outcome.failure_label[pos]
    assert all(r.prediction != r.label for r in steps)
    # the same input as a replay by step
    again = pyrobust.replay(out, index=index, step=steps[-1].step)
    assert np.array_equal(again.perturbed, steps[-1].perturbed)


def test_replay_by_failure_refuses_what_cannot_be(counted_run, tmp_path, bundled_model):
    out, ev = counted_run
    pos = int(np.argmax(ev.failures))
    index, k = int(ev.index[pos]), int(ev.failures[pos])
    with pytest.raises(InvalidInput, match=rf"failed at {k} step\(s\) .*pick a failure in 1..{k}"):
        pyrobust.replay(out, index=index, failure=k + 1)
    with pytest.raises(InvalidInput, match="give a step or a failure number, not both"):
        pyrobust.replay(out, index=index, failure=1, step=3)
    robust = int(ev.index[np.flatnonzero(ev.robust)[0]])
    with pytest.raises(InvalidInput, match="has no failing step \\(never fooled in 50 steps\\)"):
        pyrobust.replay(out, index=robust, failure=1)
    with pytest.raises(InvalidInput, match="failure must be an integer >= 1"):
        pyrobust.replay(out, index=index, failure=0)
    # a plain run knows only the first failure
    plain = tmp_path / "plain"
    pyrobust.evaluate(bundled_model, "sample", limit=100, max_steps=50, seed=1, out=plain, report=False)
    assert pyrobust.replay(plain, index=index, failure=1).matches
    with pytest.raises(InvalidInput, match="evaluate with --count-failures"):
        pyrobust.replay(plain, index=index, failure=2)


def _rewrite(folder, **changes):
    record = load_results(folder)
    outcome = record.outcome
    for name, value in changes.items():
        outcome = type(outcome)(**{**{f: getattr(outcome, f) for f in (*Outcome.ARRAYS, *Outcome.OPTIONAL)},
                                   name: value})
    buf = io.BytesIO()
    np.savez(buf, **result_arrays(outcome, record.noise.max_steps))
    (folder / RESULTS_FILE).write_bytes(buf.getvalue())


def test_a_count_the_model_does_not_give_is_found_out(counted_run, tmp_path):
    import shutil

    out, ev = counted_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    pos = int(np.argmax(ev.failures))
    failures = ev.failures.copy()
    failures[pos] -= 1  # consistent on its face (derived arrays recomputed), but not the model's
    _rewrite(copy, failures=failures)
    with pytest.raises(DataError, match=rf"the model now fails at {ev.failures[pos]} step\(s\).*recorded "
                                        rf"{failures[pos]}"):
        pyrobust.replay(copy, index=int(ev.index[pos]), failure=2)


@pytest.mark.parametrize("damage,message", [
    ("too_many", r"failure counts outside \[0, 50\]"),
    ("robust_fails", "failure counts do not match the first-failure steps"),
    ("past_the_end", "more failures than steps from the first failure on"),
    ("derived", "'failure_high' is not what the failure counts give"),
    ("dropped", "the settings say failures were counted but results.npz has no counts"),
    ("margin", "'clean_margin' is not a float array of 100 entries"),
])
def test_damaged_counts_are_refused(counted_run, tmp_path, damage, message):
    import shutil

    out, ev = counted_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    z = dict(np.load(copy / RESULTS_FILE))
    fooled = int(np.flatnonzero(ev.first_failure > 0)[-1])
    robust = int(np.flatnonzero(ev.robust)[0])
    if damage == "too_many":
        z["failures"][fooled] = 51
    elif damage == "robust_fails":
        z["failures"][robust] = 1
    elif damage == "past_the_end":
        z["failures"][fooled] = 50 - int(ev.first_failure[fooled]) + 2
    elif damage == "derived":
        z["failure_high"][fooled] = 0.5 * z["failure_high"][fooled]
    elif damage == "dropped":
        del z["failures"]
        for name in ("failure_probability", "failure_low", "failure_high"):
            del z[name]
    elif damage == "margin":
        z["clean_margin"] = z["clean_margin"][:-1]
    buf = io.BytesIO()
    np.savez(buf, **z)
    (copy / RESULTS_FILE).write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=message):
        load_results(copy)


def test_counts_without_the_setting_are_refused(counted_run, tmp_path):
    import shutil

    out, _ = counted_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    summary = json.loads((copy / "summary.json").read_text())
    del summary["noise"]["count_failures"]
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="results.npz has failure counts but the settings say none were counted"):
        load_results(copy)


# ---------------------------------------------------------------------------------------- the result object
def test_the_result_object_gives_probabilities_and_exact_intervals(counted_run):
    from pyrobust.stats import clopper_pearson

    out, ev = counted_run
    p = ev.failure_probability
    ok = ev.outcome.correct
    assert np.all(np.isnan(p[~ok])) and np.allclose(p[ok], ev.failures[ok] / 50)
    lo, hi = ev.failure_interval()
    want_lo, want_hi = clopper_pearson(ev.failures[ok], np.full(ok.sum(), 50), 0.025)
    assert np.allclose(lo[ok], want_lo) and np.allclose(hi[ok], want_hi)
    _, upper = ev.failure_interval(side="upper")
    assert np.allclose(upper[ev.robust], 1 - 0.05 ** (1 / 50))
    _, family = ev.failure_interval(side="upper", familywise=True)
    assert np.allclose(family[ev.robust], 1 - (0.05 / ok.sum()) ** (1 / 50))
    with pytest.raises(InvalidInput, match="side must be 'two' or 'upper'"):
        ev.failure_interval(side="lower")
    with pytest.raises(InvalidInput, match="confidence must be a confidence in \\(0, 1\\)"):
        ev.failure_interval(1.5)
    df = ev.to_dataframe()
    assert {"failures", "p_hat", "p_low", "p_high", "p_upper95", "clean_margin"} <= set(df.columns)
    assert np.allclose(df["p_hat"].to_numpy(), p, equal_nan=True)
    # read back: the same numbers
    back = load_results(out)
    assert np.array_equal(back.outcome.failures, ev.failures)
    assert np.array_equal(back.outcome.clean_margin, ev.clean_margin, equal_nan=True)


def test_summary_reports_the_per_image_block(counted_run):
    _, ev = counted_run
    block = ev.summary["failure_probability"]
    assert block["method"] == "failure counts, clopper-pearson" and block["probes_per_image"] == 50
    assert sum(block["histogram"]["counts"]) == block["images"] == int(ev.outcome.correct.sum())
    worst = block["most_fragile"][0]
    assert worst["p_hat"] == float(np.nanmax(ev.failure_probability))
    assert worst["interval"][0] <= worst["p_hat"] <= worst["interval"][1]
    assert ev.summary["clean_margin"]["auc"] > 0.5
    m = ev.summary["metrics"]
    assert m["robust_of_correct"]["of"] == m["accuracy"]["count"]


# ------------------------------------------------------------------------------------------ a budget from a target
def test_a_target_sets_the_step_budget(bundled_model):
    ev = pyrobust.evaluate(bundled_model, "sample", limit=20, target=FailureTarget(0.05), report=False)
    assert ev.noise.max_steps == 59 and 0.95**59 <= 0.05 < 0.95**58
    assert ev.summary["budget"]["max_steps"] == 59
    assert "<= 5% at 95% confidence for each image" in ev.summary["budget"]["claim"]
    fam = pyrobust.evaluate(bundled_model, "sample", limit=20, target=FailureTarget(0.05, familywise=True),
                            report=False)
    assert fam.noise.max_steps == 117 and 0.95**117 <= 0.05 / 20 < 0.95**116
    with pytest.raises(InvalidInput, match="give max_steps or a failure-probability target"):
        pyrobust.evaluate(bundled_model, "sample", limit=20, target=FailureTarget(0.05), max_steps=10)
    with pytest.raises(InvalidInput, match="max_failure_prob must be a probability in \\(0, 0.5\\)"):
        FailureTarget(0.7)
    with pytest.raises(InvalidInput, match="needs 4,605,168 steps, more than the 100,000 allowed"):
        FailureTarget(1e-6, 0.99).steps(1)


def test_the_cli_budget_options(bundled_model, tmp_path, capsys):
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "10", "--max-failure-prob", "1%",
                 "--out", str(tmp_path / "a"), "--no-report", "--batch-size", "32", "--sessions", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "299 steps" in out
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["noise"]["max_steps"] == 299
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--max-failure-prob", "1%", "--max-steps",
                 "10", "--out", str(tmp_path / "b")]) == 2
    assert "give --max-steps or --max-failure-prob" in capsys.readouterr().err
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--familywise", "--out",
                 str(tmp_path / "c")]) == 2
    assert "qualify --max-failure-prob" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
