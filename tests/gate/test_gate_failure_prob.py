"""The gate's per-image and multi-budget checks: a golden set decided on exact per-image bounds
(``max_failure_prob``/``max_fragile``), robust fractions at several budgets from one run (``min_robust_at``), and
minimums as a share of the correctly classified images (``robust_of="correct"``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom

import pyrobust
from pyrobust.cli import main
from pyrobust.errors import InvalidInput
from pyrobust.gate.policy import GatePolicy, GoldenSpec, golden_check, parse_robust_at, plan_golden
from pyrobust.gate.run import run_gate
from pyrobust.stats import clopper_pearson, robust_at, steps_for_bound
from pyrobust.types import ROBUST


def test_parse_robust_at():
    assert parse_robust_at("250:80%, 10:95%,50:0.9") == ((10, 0.95), (50, 0.9), (250, 0.8))
    assert parse_robust_at([(5, 0.5)]) == ((5, 0.5),)
    for bad, match in (("10", "STEPS:FRACTION pairs"), ("x:90%", "STEPS:FRACTION"), ("0:90%", "steps >= 1"),
                       ("10:120%", "fraction in \\[0, 1\\]"), ("10:90%,10:80%", "names a budget twice"),
                       ("", "at least one"), ([(True, 0.5)], "STEPS:FRACTION")):
        with pytest.raises(InvalidInput, match=match):
            parse_robust_at(bad)


def test_policy_refusals():
    with pytest.raises(InvalidInput, match="max_fragile counts the images allowed above max_failure_prob"):
        GatePolicy(min_robust=0.5, max_fragile=2)
    with pytest.raises(InvalidInput, match="robust_of=correct applies to min_robust"):
        GatePolicy(max_robust_drop=0.01, robust_of="correct")
    with pytest.raises(InvalidInput, match="robust_of must be one of all, correct"):
        GatePolicy(min_robust=0.5, robust_of="some")
    with pytest.raises(InvalidInput, match="allows every one of the 5 images to fail"):
        plan_golden(GatePolicy(max_failure_prob=0.01, max_fragile=5), 5)
    with pytest.raises(InvalidInput, match="more than the 100,000 allowed"):
        plan_golden(GatePolicy(max_failure_prob=1e-5), 1000)
    g = plan_golden(GatePolicy(max_failure_prob=0.01), 100)
    assert g.steps == steps_for_bound(0.01, 0.975, 100) == 826 and 0.99**826 <= 0.00025 < 0.99**825
    assert g.alpha_side == pytest.approx(0.025 / 100)


def _golden(images=10, k=0, q=0.05):
    alpha_side = 0.025 / images
    return GoldenSpec(q, k, images, alpha_side, steps_for_bound(q, 0.975, images))


def test_golden_verdicts():
    g = _golden()
    n = g.images
    ff = np.full(n, ROBUST)
    f = np.zeros(n, np.int32)
    every = np.ones(n, bool)
    c = golden_check(g, ff, f, every, n)
    assert c.verdict == "pass" and c.value <= 0.05  # zero failures in the budget: each image clears it
    assert golden_check(g, ff, f, np.arange(n) < 5, 5).verdict == "inconclusive"  # unseen images could fail
    ff2, f2 = ff.copy(), f.copy()
    ff2[3], f2[3] = 2, g.steps // 2  # one image fails half its steps: shown above 5 %
    c = golden_check(g, ff2, f2, every, n)
    assert c.verdict == "fail" and c.interval[0] > 0.05 and "1 shown above it" in c.message
    assert golden_check(_golden(k=1), ff2, f2, every, n).verdict == "pass"  # one image allowed
    ff3 = ff.copy()
    ff3[0] = 0  # wrong before any noise: fails every step
    assert golden_check(g, ff3, f, every, n).verdict == "fail"
    ff4, f4 = ff.copy(), f.copy()
    ff4[1], f4[1] = 7, 1  # one failure: not shown below 5 %, not shown above
    c = golden_check(g, ff4, f4, every, n)
    assert c.verdict == "inconclusive" and "a larger set does not settle it" in c.message


@pytest.mark.parametrize("images,k", [(10, 0), (100, 0), (1000, 2), (10_000, 0)])
def test_the_golden_check_passes_wrongly_at_most_alpha_over_two(images, k):
    """At the threshold (k+1 images with p just above q, the rest never failing), the chance of a pass, computed
    exactly from the binomial law of each image's failures, is at most (1 - 0.95)/2 = 2.5 %."""
    q = 0.01
    g = _golden(images, k, q)
    # the largest failure count at which an image still clears q
    f = np.arange(g.steps + 1)
    _, hi = clopper_pearson(f, np.full(f.size, g.steps), g.alpha_side)
    clears = int(np.max(np.flatnonzero(hi <= q)))
    p_clear = float(binom.cdf(clears, g.steps, q))  # one bad image wrongly shown below q
    # the check passes only if at least one of the k+1 bad images clears (at most k may stay unshown)
    wrong_pass = 1 - (1 - p_clear) ** (k + 1)
    assert wrong_pass <= 0.025, wrong_pass
    # and a simulation of the whole check agrees
    rng = np.random.default_rng(images)
    reps, passes = 400, 0
    for _ in range(reps):
        fails = np.zeros(images, np.int64)
        fails[: k + 1] = rng.binomial(g.steps, q * (1 + 1e-9), k + 1)
        ff = np.where(fails > 0, 1, ROBUST)
        passes += golden_check(g, ff, fails, np.ones(images, bool), images).verdict == "pass"
    assert passes / reps <= 0.025 + 3 * math.sqrt(0.025 * 0.975 / reps)


@pytest.mark.slow
def test_min_robust_at_and_robust_of_correct_match_an_evaluation(bundled_model):
    budgets = "10:50%,40:50%"
    policy = GatePolicy(min_robust_at=budgets, min_robust=0.5, robust_of="correct", early_stop=False)
    res = run_gate(bundled_model, "sample", policy=policy, max_steps=40, seed=3, limit=200, batch_size=64,
                   sessions=1)
    ev = pyrobust.evaluate(bundled_model, "sample", max_steps=40, seed=3, limit=200, report=False, batch_size=64,
                           sessions=1)
    ff = ev.first_failure
    correct = ff != 0
    by = {c.name: c for c in res.checks}
    for t in (10, 40):
        c = by[f"min_robust_at[{t}]"]
        assert c.value == pytest.approx(np.mean(robust_at(ff, t)[correct]))
        assert c.verdict == "pass" and "share of the correctly classified images" in c.message
        assert f"not fooled within {t} steps" in c.message
    assert by["min_robust"].value == pytest.approx(ev.robust_of_correct)
    curve = np.array(ev.summary["survival"]["fraction"])  # of all images; the check is of correct ones
    assert curve[10] * ev.outcome.n == pytest.approx(by["min_robust_at[10]"].value * correct.sum())
    with pytest.raises(InvalidInput, match="beyond the step budget \\(40\\); raise max_steps to 50"):
        run_gate(bundled_model, "sample", policy=GatePolicy(min_robust_at="50:90%"), max_steps=40, limit=50)


@pytest.mark.slow
def test_a_golden_set_passes_or_fails_on_its_exact_bounds(bundled_model, regressed, tmp_path, capsys):
    # the verdict is the one the per-image bounds of an evaluation with the same budget give
    policy = GatePolicy(max_failure_prob=0.2, max_fragile=2)
    res = run_gate(bundled_model, "sample", policy=policy, limit=40, batch_size=64, sessions=1)
    g = plan_golden(policy, 40)
    assert res.settings["noise"]["max_steps"] == g.steps and res.settings["noise"]["count_failures"] is True
    ev = pyrobust.evaluate(bundled_model, "sample", limit=40, max_steps=g.steps, count_failures=True,
                           report=False, batch_size=64, sessions=1)
    lo, hi = clopper_pearson(ev.failures, np.full(40, g.steps), g.alpha_side)
    hi = np.where(ev.outcome.correct, hi, 1.0)
    not_shown = int(np.sum(hi > 0.2))
    c = res.checks[-1]
    assert c.name == "max_failure_prob" and f"{not_shown} of 40 images not shown" in c.message
    assert c.verdict == ("pass" if not_shown <= 2 else c.verdict)
    # a fragile model fails at the first look, on images shown above the threshold, and stops there
    code = main(["gate", str(regressed), "--dataset", "sample", "--max-failure-prob", "5%", "--batch-size", "64",
                 "--sessions", "1", "--out", str(tmp_path / "g"), "--junit", str(tmp_path / "g.xml")])
    out = capsys.readouterr().out
    assert code == 1 and "gate FAIL" in out and "stopped early" in out
    rep = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert rep["settings"]["golden"]["steps"] == steps_for_bound(0.05, 0.975, 500)
    assert rep["images_evaluated"] < 500 and rep["checks"][-1]["verdict"] == "fail"
    assert 'classname="pyrobust.gate.max_failure_prob"' in (tmp_path / "g.xml").read_text()
    assert main(["gate", str(regressed), "--dataset", "sample", "--max-failure-prob", "5%", "--max-steps",
                 "100"]) == 2
    assert "leave out --max-steps" in capsys.readouterr().err


# ------------------------------------------------------------------------- every verdict path says what is true
def test_the_settle_count_is_where_the_exact_bounds_decide():
    from pyrobust.gate.policy import settle_images
    from pyrobust.sequential import CheckSpec, _fails, _passes, bounds

    for spec, counts in ((CheckSpec("min_robust", "min_robust", 0.8), (85, 100)),
                         (CheckSpec("min_robust", "min_robust", 0.8), (76, 100)),
                         (CheckSpec("max_robust_drop", "max_robust_drop", 0.01), (6, 1, 200))):
        need = settle_images(spec, counts, 0.0125)
        n = counts[-1]
        assert need is not None and need > n

        def decided(m, spec=spec, counts=counts, n=n):
            _, lo, hi = bounds(spec, (*(round(v * m / n) for v in counts[:-1]), m), 0.0125)
            return bool(_passes(spec, lo, hi) or _fails(spec, lo, hi))

        assert decided(need) and not decided(need - 1)
    assert settle_images(CheckSpec("min_robust", "min_robust", 0.5), (50, 100), 0.0125) is None  # on the threshold


@pytest.mark.slow
def test_the_gates_words_match_its_verdicts(bundled_model, regressed, tmp_path, capsys):
    import xml.etree.ElementTree as ET

    # a gain is a gain, not a negative drop
    code = main(["gate", str(regressed), "--dataset", "sample", "--limit", "200", "--max-steps", "40",
                 "--baseline", str(bundled_model), "--max-robust-drop", "50%", "--batch-size", "64", "--sessions", "1",
                 "--no-early-stop"])
    out = capsys.readouterr().out
    assert code == 0 and "robust fraction drop" in out and "drop -" not in out
    code = main(["gate", str(bundled_model), "--dataset", "sample", "--limit", "200", "--max-steps", "40",
                 "--baseline", str(regressed), "--max-robust-drop", "50%", "--batch-size", "64", "--sessions", "1",
                 "--no-early-stop"])
    out = capsys.readouterr().out
    assert code == 0 and "robust fraction gain" in out and "drop -" not in out
    # an accuracy check left open on the clean pass is named by every look, so no look claims all is decided
    code = main(["gate", str(bundled_model), "--dataset", "sample", "--limit", "200", "--max-steps", "20",
                 "--min-accuracy", "98.5%", "--min-robust", "50%", "--batch-size", "64", "--sessions", "1",
                 "--junit", str(tmp_path / "j.xml")])
    captured = capsys.readouterr()
    assert code == 1 and "gate INCONCLUSIVE" in captured.out
    looks = [line for line in captured.err.splitlines() if "look " in line]
    assert looks and all("left inconclusive on the clean pass: min_accuracy" in line for line in looks)
    assert "0 check(s) undecided" not in captured.err
    assert "about 0 more" not in captured.out and re_more(captured.out)
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert float(suite.get("time")) > 0
    assert all(float(case.get("time")) >= 0 for case in suite.findall("testcase"))
    assert any(float(case.get("time")) > 0 for case in suite.findall("testcase"))


def re_more(text: str) -> bool:
    import re

    return bool(re.search(r"min_accuracy: .*inconclusive; about [1-9][\d,]* more images at the same shares would "
                          r"settle it", text))


@pytest.mark.parametrize("value,lost,gained,words", [
    (0.002, 1, 0, "robust fraction drop 0.20% (1 image lost, 0 gained of 500, paired)"),
    (0.0, 1, 1, "robust fraction unchanged on balance (1 image lost, 1 gained of 500, paired)"),
    (0.0, 0, 0, "robust fraction unchanged (0 images lost, 0 gained of 500, paired)"),
    (-0.004, 0, 2, "robust fraction gain 0.40% (0 images lost, 2 gained of 500, paired)"),
    (0.006, 3, 0, "robust fraction drop 0.60% (3 images lost, 0 gained of 500, paired)"),
])
def test_a_drop_reads_as_what_happened(value, lost, gained, words):
    from pyrobust.gate.policy import Check, _message

    c = Check("max_robust_drop", "max_robust_drop", 0.01, value, (-0.01, 0.012), "inconclusive", 500, 0.99, "noise")
    assert _message(c, (lost, gained, 500)).startswith(f"max_robust_drop: {words}, 99.00% interval [-1.00%, +1.20%]")
