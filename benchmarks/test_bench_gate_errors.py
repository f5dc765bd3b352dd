"""The gate's error rates and power over the issue's full grid, by Monte-Carlo simulation of its whole decision
logic (``tests/gate_sim.py``: the gate's own plan, looks, error spending and decision object).

Every scenario puts the truth exactly at the threshold, where wrong verdicts are most likely: a pass there is a
wrong pass (a bad model released), a fail is a wrong fail. Nominal: (1 - 0.95)/2 = 2.5 % per side. Each rate must be
at or below nominal plus three Monte-Carlo standard errors. Power rows put the truth 1 point on the good side.

Run: ``python -m pytest benchmarks/test_bench_gate_errors.py`` (about a minute); writes ``last_gate_errors.json``
and ``last_gate_errors.md`` (the table in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyrobust.gate.policy import GatePolicy
from tests.gate_sim import Scenario, mc_bound, scenario_seed, simulate

REPS = 10000
NOMINAL = 0.025
BASES = (0.3, 0.5, 0.6, 0.88)
SIZES = (500, 2000, 10000)
ROWS: list[dict] = []
HERE = Path(__file__).parent


def _row(check, truth, n, early_stop, r, **extra):
    ROWS.append({"check": check, "truth": truth, "n": n, "early_stop": early_stop, "wrong_pass": r["pass"],
                 "wrong_fail": r["fail"], "images_used": r["images"], "replicates": r["replicates"], **extra})
    bound = mc_bound(NOMINAL, r["replicates"])
    assert r["pass"] <= bound and r["fail"] <= bound, ROWS[-1]


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("mix", ["loss-only", "mixed"])
def test_drop(base, n, early_stop, mix):
    lost, gained = (0.01, 0.0) if mix == "loss-only" else (0.03, 0.02)
    r = simulate(GatePolicy(max_robust_drop=0.01, early_stop=early_stop),
                 Scenario("max_robust_drop", n, base=base, lost=lost, gained=gained), replicates=REPS,
                 seed=scenario_seed(("drop", base, n, early_stop, mix)))
    _row(f"max_robust_drop 1% ({mix})", f"baseline {base:.0%}, drop 1 point", n, early_stop, r)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", BASES)
@pytest.mark.parametrize("kind", ["min_robust", "min_class_robust"])
def test_minimum(kind, p, n, early_stop):
    r = simulate(GatePolicy(**{kind: p}, early_stop=early_stop), Scenario(kind, n, p=p), replicates=REPS,
                 seed=scenario_seed((kind, p, n, early_stop)))
    _row(kind + (" (class 0 of 10)" if kind == "min_class_robust" else ""), f"{p:.0%}", n, early_stop, r)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", BASES + (0.97,))
def test_accuracy(p, n):
    r = simulate(GatePolicy(min_accuracy=p), Scenario("min_accuracy", n, p=p), replicates=REPS,
                 seed=scenario_seed(("acc", p, n)))
    _row("min_accuracy (clean pass)", f"{p:.0%}", n, None, r)


@pytest.mark.parametrize("spending", ["equal", "obrien-fleming", "one look"])
@pytest.mark.parametrize("n", SIZES)
def test_power(spending, n):
    """A model 1 point better than a 60 % threshold: how often it passes, and the images used."""
    kw = {"early_stop": False} if spending == "one look" else {"spending": spending}
    r = simulate(GatePolicy(min_robust=0.6, **kw), Scenario("min_robust", n, p=0.61), replicates=REPS, seed=n)
    ROWS.append({"power": spending, "n": n, "pass": r["pass"], "images_used": r["images"]})


def test_write_table():
    (HERE / "last_gate_errors.json").write_text(json.dumps(ROWS, indent=1) + "\n")
    errs = [r for r in ROWS if "check" in r]
    lines = ["| check | truth (at the threshold) | images | early stop | wrong pass | wrong fail | images used |",
             "|---|---|---|---|---|---|---|"]
    for r in errs:
        es = "-" if r["early_stop"] is None else "on" if r["early_stop"] else "off"
        lines.append(f"| {r['check']} | {r['truth']} | {r['n']:,} | {es} | {r['wrong_pass']:.2%} | "
                     f"{r['wrong_fail']:.2%} | {r['images_used']:,.0f} |")
    lines += ["", "| spending | images | passes (truth 61 %, threshold 60 %) | images used |", "|---|---|---|---|"]
    for r in ROWS:
        if "power" in r:
            lines.append(f"| {r['power']} | {r['n']:,} | {r['pass']:.1%} | {r['images_used']:,.0f} |")
    worst_pass = max(r["wrong_pass"] for r in errs)
    worst_fail = max(r["wrong_fail"] for r in errs)
    lines += ["", f"{len(errs)} scenarios, {REPS:,} replicates each; worst wrong pass {worst_pass:.2%}, worst wrong "
              f"fail {worst_fail:.2%} (nominal 2.50 %, bound with 3 Monte-Carlo SE "
              f"{mc_bound(NOMINAL, REPS):.2%})."]
    (HERE / "last_gate_errors.md").write_text("\n".join(lines) + "\n")
    assert worst_pass <= mc_bound(NOMINAL, REPS) and worst_fail <= mc_bound(NOMINAL, REPS)
