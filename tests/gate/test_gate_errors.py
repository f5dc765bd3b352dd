"""The gate's error rates, checked where users stand: a seeded Monte-Carlo run of the whole decision logic (plan,
looks, error spending, early stop on and off) with the truth exactly at the threshold, where a wrong pass and a wrong
fail are both most likely. Each rate must stay at or below its nominal (1 - confidence)/2 plus three Monte-Carlo
standard errors. The full table, with more replicates, is ``benchmarks/test_bench_gate_errors.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from pyrobust.gate.policy import GatePolicy
from pyrobust.sequential import CheckSpec, SequentialDecision, look_alphas
from pyrobust.stats import clopper_pearson, look_schedule, paired_difference_interval, paired_drop_bounds
from tests.gate_sim import Scenario, mc_bound, scenario_seed, simulate

REPS = 2000
NOMINAL = 0.025  # one side of a 95 % gate
BASES = (0.3, 0.5, 0.6, 0.88)
SIZES = (500, 2000, 10000)


def _assert_rates(r: dict, what: str) -> None:
    bound = mc_bound(NOMINAL, r["replicates"])
    assert r["pass"] <= bound, f"{what}: wrong passes {r['pass']:.4f} > {bound:.4f}"
    assert r["fail"] <= bound, f"{what}: wrong fails {r['fail']:.4f} > {bound:.4f}"


# -------------------------------------------------------------------------------------------- exact pieces
def test_newcombe_matches_the_fagerland_lydersen_laake_reference():
    """Their worked example (Cavo data, Fagerland, Lydersen & Laake 2014, table 7): -0.1186 to -0.0046."""
    diff, lo, hi = paired_difference_interval(59, 6, 16, 80)
    assert diff == pytest.approx(-10 / 161)
    assert lo == pytest.approx(-0.1186, abs=5e-5) and hi == pytest.approx(-0.0046, abs=5e-5)


def test_clopper_pearson_is_the_inverted_binomial_tail():
    x, n, a = np.array([0, 1, 37, 250, 250]), np.array([250, 250, 250, 250, 1000]), 0.0025
    lo, hi = clopper_pearson(x, n, a)
    for xi, ni, low, h in zip(x, n, lo, hi, strict=True):
        if xi > 0:
            assert sps.binom.sf(xi - 1, ni, low) == pytest.approx(a, rel=1e-6)  # P(X >= x | lower) = a
        else:
            assert low == 0
        if xi < ni:
            assert sps.binom.cdf(xi, ni, h) == pytest.approx(a, rel=1e-6)  # P(X <= x | upper) = a
        else:
            assert h == 1
    assert hi[0] == pytest.approx(1 - a ** (1 / 250))
    with pytest.raises(ValueError, match="alpha_side"):
        clopper_pearson(1, 10, 0.5)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(11, 10, 0.05)
    assert [float(v) for v in clopper_pearson(0, 0, 0.05)] == [0.0, 1.0]


def test_zero_discordant_images_give_the_exact_bound_not_a_zero_width_interval():
    """The issue's case: 250 images, none lost or gained, at the first look of a 99.5 % per-look gate. The old
    asymptotic interval was [-0.15 %, +0.15 %]; the exact bound on the lost cell is about 2.4 %."""
    d, lo, hi = paired_drop_bounds(0, 0, 250, 0.0025)
    assert float(d) == 0 and float(hi) == pytest.approx(1 - 0.0025 ** (1 / 250)) and 0.023 < float(hi) < 0.025
    assert float(lo) == pytest.approx(-float(hi))
    # vectorised, and the drop is lost minus gained
    d, lo, hi = paired_drop_bounds(np.array([30, 5]), np.array([10, 5]), np.array([1000, 1000]), 0.025)
    assert np.allclose(d, [0.02, 0.0]) and np.all(lo < d) and np.all(d < hi)
    assert [float(v) for v in paired_drop_bounds(0, 0, 0, 0.025)] == [0.0, -1.0, 1.0]


def test_error_spending_adds_up_and_obrien_fleming_spends_little_early():
    looks = look_schedule(10000)
    eq, obf = look_alphas(looks, 0.05), look_alphas(looks, 0.05, "obrien-fleming")
    assert eq.sum() == pytest.approx(0.05) and obf.sum() == pytest.approx(0.05)
    assert np.allclose(eq, 0.05 / len(looks)) and obf[:4].sum() < eq[0] / 100 and obf.max() > 5 * eq.max()
    assert np.all(obf >= 0)
    with pytest.raises(ValueError, match="spending"):
        look_alphas(looks, 0.05, "greedy")


def test_holm_steps_down_between_bonferroni_and_per_check_control():
    """Three checks at a 50 % threshold on 1,000 images each; one-sided binomial p-values of 463, 465 and 466
    robust images are 0.0105, 0.0145 and 0.0170. Holm (levels 0.0083, 0.0125, 0.025) rejects what Bonferroni
    (0.0083 each) rejects and, step by step, more; per-check control (0.025 each) rejects everything."""
    specs = [CheckSpec(f"c{i}", "min_robust", 0.5) for i in range(3)]

    def verdicts(xs, family):
        d = SequentialDecision(specs, np.array([0.05]), family=family)
        d.look([(np.array([x]), np.array([1000])) for x in xs])
        return d.verdict[0].tolist()

    assert verdicts([400, 463, 466], "bonferroni") == [-1, 0, 0]
    assert verdicts([400, 463, 466], "holm") == [-1, -1, -1]  # 463 clears 0.0125, then 466 clears 0.025
    assert verdicts([400, 465, 466], "holm") == [-1, 0, 0]  # 465 misses 0.0125: the step-down stops
    assert verdicts([400, 465, 466], "none") == [-1, -1, -1]
    with pytest.raises(ValueError, match="family"):
        SequentialDecision(specs, np.array([0.05]), family="sidak")


def test_a_decided_check_keeps_its_verdict_and_its_bounds():
    spec = CheckSpec("r", "min_robust", 0.5)
    d = SequentialDecision([spec], look_alphas([100, 200], 0.05))
    d.look([(np.array([90]), np.array([100]))])
    assert d.verdict[0, 0] == 1 and d.decided_at[0, 0] == 0 and d.stopped[0]
    lo = d.lower[0, 0]
    d.look([(np.array([90]), np.array([200]))])  # would fail now; the pass made at look 1 stands
    assert d.verdict[0, 0] == 1 and d.lower[0, 0] == lo and d.n[0, 0] == 100


# ---------------------------------------------------------------------------------- the whole logic, simulated
@pytest.mark.slow
@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("mix", ["loss-only", "mixed"])
def test_drop_check_error_rates_at_the_threshold(base, n, early_stop, mix):
    """True drop exactly 1 point: loss-only (1 % lost, none gained: often zero discordant images at the first look)
    or mixed (3 % lost, 2 % gained)."""
    lost, gained = (0.01, 0.0) if mix == "loss-only" else (0.03, 0.02)
    policy = GatePolicy(max_robust_drop=0.01, early_stop=early_stop)
    r = simulate(policy, Scenario("max_robust_drop", n, base=base, lost=lost, gained=gained),
                 replicates=REPS, seed=scenario_seed((base, n, early_stop, mix)))
    _assert_rates(r, f"drop base={base} n={n} early_stop={early_stop} {mix}")


@pytest.mark.slow
@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", BASES)
@pytest.mark.parametrize("kind", ["min_robust", "min_class_robust"])
def test_minimum_check_error_rates_at_the_threshold(kind, p, n, early_stop):
    policy = GatePolicy(**{kind: p}, early_stop=early_stop)
    r = simulate(policy, Scenario(kind, n, p=p), replicates=REPS, seed=scenario_seed((kind, p, n, early_stop)))
    _assert_rates(r, f"{kind} p={p} n={n} early_stop={early_stop}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", BASES + (0.97,))
def test_accuracy_check_error_rates_at_the_threshold(p, n):
    r = simulate(GatePolicy(min_accuracy=p), Scenario("min_accuracy", n, p=p), replicates=REPS,
                 seed=scenario_seed(("acc", p, n)))
    _assert_rates(r, f"min_accuracy p={p} n={n}")


def test_accuracy_drop_error_rates_at_the_threshold():
    for base, lost, gained in ((0.97, 0.005, 0.0), (0.6, 0.02, 0.015)):
        policy = GatePolicy(max_accuracy_drop=0.005)
        r = simulate(policy, Scenario("max_accuracy_drop", 2000, base=base, lost=lost, gained=gained),
                     replicates=REPS, seed=int(base * 1000))
        _assert_rates(r, f"accuracy drop base={base}")


def test_the_simulation_can_see_a_bad_rule():
    """The same harness flags a rule that is too liberal: a 90 % gate read as if it were 95 % (nominal 2.5 %,
    actual 5 % per side) fails the bound at the largest size."""
    r = simulate(GatePolicy(min_robust=0.6, confidence=0.90, early_stop=False), Scenario("min_robust", 10000, p=0.6),
                 replicates=REPS, seed=7)
    assert r["pass"] > mc_bound(NOMINAL, REPS)


@pytest.mark.slow
def test_family_control_across_per_class_checks():
    """Ten classes all exactly at the threshold: with Holm (the default) the chance that *any* class fails wrongly
    stays at the nominal rate; controlled per check it is several times larger."""
    scenario = Scenario("min_class_robust", 5000, p=0.6, other_gap=0.0)
    rates = {family: simulate(GatePolicy(min_class_robust=0.6, family=family), scenario, replicates=REPS,
                              seed=11)["any_fail"] for family in ("holm", "bonferroni", "none")}
    assert rates["holm"] <= mc_bound(NOMINAL, REPS) and rates["bonferroni"] <= mc_bound(NOMINAL, REPS)
    assert rates["none"] > 2 * rates["holm"]


def test_early_stop_power_trade_is_what_the_readme_says():
    """A model 1 point above a 60 % threshold on 10,000 images: early stop with equal spending passes it less often
    than one look at all images (README: about 27 % against 53 %); O'Brien-Fleming spending recovers most of it."""
    s = Scenario("min_robust", 10000, p=0.61)
    power = {name: simulate(GatePolicy(min_robust=0.6, **kw), s, replicates=REPS, seed=3)["pass"]
             for name, kw in (("early", {}), ("obf", {"spending": "obrien-fleming"}), ("one", {"early_stop": False}))}
    assert power["early"] + 0.1 < power["obf"] < power["one"] + 0.03
    # one look: a one-sided exact test at 2.5 %, close to the normal approximation of its power
    z = 0.01 / math.sqrt(0.6 * 0.4 / 10000) - 1.959964
    assert math.isclose(power["one"], 0.5 * (1 + math.erf(z / math.sqrt(2))), abs_tol=0.05)
