"""``pyrobust compare``: two runs image by image, what became fragile or robust, per class, and which runs cannot
be compared."""

from __future__ import annotations

import json

import pytest

from pyrobust.cli import main


@pytest.mark.slow
def test_compare(capsys, tmp_path, bundled_model, regressed, shared_data):
    for name, model in (("a", bundled_model), ("b", regressed)):
        assert main(["evaluate", str(model), "--dataset", "mnist:test", "--data-dir", str(shared_data), "--limit",
                     "1000", "--max-steps", "30", "--no-report", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "diff")]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "diff" / "compare.json").read_text())
    assert rep["newly_fragile"]["count"] > rep["newly_robust"]["count"]
    assert rep["robust"]["change"] < 0 and rep["robust"]["lost"] == rep["newly_fragile"]["count"]
    assert sum(r["newly_fragile"] for r in rep["per_class"]) == rep["newly_fragile"]["count"]
    assert f"newly fragile {rep['newly_fragile']['count']}" in out
    assert (tmp_path / "diff" / "compare.md").read_text().startswith("# pyrobust compare")
    assert (tmp_path / "diff" / "survival_compare.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(regressed), "--dataset", "mnist:test", "--data-dir", str(shared_data), "--limit",
                 "1000", "--max-steps", "30", "--seed", "1", "--no-report", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "cannot be compared image by image: seed 0 → 1" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 3


@pytest.mark.slow
def test_compare_gives_both_denominators_and_the_intervals_that_moved(tmp_path, bundled_model, regressed, capsys):
    import numpy as np

    import pyrobust
    from pyrobust.compare import compare_runs
    from pyrobust.stats import paired_ratio_difference

    kw = dict(limit=300, max_steps=60, seed=2, report=False, batch_size=64, sessions=1)
    a = pyrobust.evaluate(bundled_model, "sample", out=tmp_path / "a", **kw)
    b = pyrobust.evaluate(regressed, "sample", out=tmp_path / "b", count_failures=True, **kw)  # counts pair too
    rep = compare_runs(tmp_path / "a", tmp_path / "b", out=tmp_path / "diff")
    rc = rep["robust_of_correct"]
    assert rc["a"] == pytest.approx(a.robust_of_correct) and rc["b"] == pytest.approx(b.robust_of_correct)
    assert rc["change"] == pytest.approx(b.robust_of_correct - a.robust_of_correct)
    assert rc["ci95"][0] <= rc["change"] <= rc["ci95"][1]
    assert rep["robust"]["change"] == pytest.approx(b.robust_fraction - a.robust_fraction)
    mv = rep["intervals_moved"]
    assert mv["method"] == ["first-failure step", "failure counts"]
    assert mv["count"] == mv["more_fragile"] + mv["more_robust"] and mv["more_fragile"] > 0
    for row in mv["largest"]:  # disjoint exact intervals
        assert row["interval_b"][0] > row["interval_a"][1] or row["interval_b"][1] < row["interval_a"][0]
    md = (tmp_path / "diff" / "compare.md").read_text()
    assert "robust, of correctly classified images" in md and "interval moved clear" in md
    # the bootstrap interval of a ratio change covers in simulation: two models on 400 images, 400 replicates
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(400):
        ca = rng.random(400) < 0.9
        cb = ca & (rng.random(400) < 0.95)
        ra = ca & (rng.random(400) < 0.5)
        rb = cb & (ra | (rng.random(400) < 0.2))
        truth = (0.9 * 0.95 * (0.5 + 0.5 * 0.2)) / (0.9 * 0.95) - 0.5  # robust of correct: 0.6 vs 0.5
        _, lo, hi = paired_ratio_difference(ra, ca, rb, cb, resamples=500)
        hits += lo <= truth <= hi
    assert hits / 400 >= 0.925, hits / 400
