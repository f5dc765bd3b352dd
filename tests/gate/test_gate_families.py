"""The gate under a noise family: from the command line and from a TOML config, recorded in gate.json, and a
baseline run under another noise refused."""

from __future__ import annotations

import json

from pyrobust.cli import main


def test_the_gate_checks_a_family_from_the_cli_and_from_toml(bundled_model, tmp_path, capsys):
    args = ["gate", str(bundled_model), "--dataset", "sample", "--limit", "120", "--max-steps", "20",
            "--sessions", "1"]
    code = main([*args, "--noise", "gaussian:sigma=0.3", "--min-robust", "20%", "--out", str(tmp_path / "a")])
    assert code == 0 and "gate PASS" in capsys.readouterr().out
    g = json.loads((tmp_path / "a" / "gate.json").read_text())
    assert g["settings"]["noise"]["corruption"] == "gaussian:sigma=0.3"
    config = tmp_path / "gate.toml"
    config.write_text('[gate]\nnoise = "patch:size=12,fill=random"\nmin_robust = "99%"\n')
    code = main([*args, "--config", str(config), "--out", str(tmp_path / "b")])
    assert code == 1 and "gate FAIL" in capsys.readouterr().out
    g = json.loads((tmp_path / "b" / "gate.json").read_text())
    assert g["settings"]["noise"]["corruption"] == "patch:size=12,fill=random,value=0"
    config.write_text('[gate]\nnoise = "patch:size=99"\nmin_robust = "99%"\n')
    code = main([*args, "--config", str(config), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "patch: size must be an integer in [1, 28] for 28x28 images; got 99" in err


# ------------------------------------------------------------------------------------ checks under more families
import math  # noqa: E402

import pytest  # noqa: E402

from pyrobust.errors import InvalidInput  # noqa: E402
from pyrobust.gate.policy import GatePolicy, NoiseCheck, parse_noise_check  # noqa: E402
from pyrobust.gate.run import run_gate, run_gates  # noqa: E402
from pyrobust.types import NoiseSpec  # noqa: E402

GATE = ["--dataset", "sample", "--limit", "120", "--max-steps", "20", "--sessions", "1"]


def test_a_noise_check_reads_the_same_from_text_and_from_a_table():
    a = parse_noise_check("gaussian:sigma=0.1 min_robust=80% min_robust_at=5:90%,20:0.85 max_steps=40")
    b = parse_noise_check({"family": "gaussian", "sigma": 0.1, "min_robust": "80%", "min_robust_at": "5:90%,20:85%",
                           "max_steps": 40})
    c = parse_noise_check({"noise": "gaussian:sigma=0.1", "min_robust": 0.8, "min_robust_at": "5:0.9,20:0.85",
                           "max_steps": "40"})
    assert a == b == c and a.noise.text() == "gaussian:sigma=0.1"
    assert a.min_robust == 0.8 and a.min_robust_at == ((5, 0.9), (20, 0.85)) and a.max_steps == 40
    assert parse_noise_check(a.text()) == a  # the text form reads back to the same check
    golden = parse_noise_check("patch:size=4 max_failure_prob=1% max_fragile=2")
    assert golden.max_failure_prob == 0.01 and golden.max_fragile == 2 and parse_noise_check(golden.text()) == golden
    pol = a.policy(GatePolicy(min_robust=0.5, confidence=0.9, family="bonferroni"), 0.975)
    assert (pol.min_robust, pol.confidence, pol.family, pol.min_accuracy) == (0.8, 0.975, "bonferroni", None)


@pytest.mark.parametrize("value, message", [
    ("", "needs a family and a threshold"),
    ("gaussian:sigma=0.1", "has no threshold"),
    ("gaussian:sigma=0.1 min_robust", "'min_robust' is not KEY=VALUE"),
    ("gaussian:sigma=0.1 min_robust=80% min_robust=90%", "min_robust is given twice"),
    ("gaussian:sigma=0.1 min_robustness=80%", "unknown key(s) min_robustness"),
    ("gaussian:sigma=0.1 min_robust=180%", "min_robust must be between 0 and 1"),
    ("gaussian:sigma=0.1 min_robust=high", "min_robust must be a fraction like 0.85"),
    ("gaussian:sigma=0.1 min_robust=80% max_steps=0", "max_steps must be a whole number >= 1"),
    ("gaussian:sigma=0.1 max_failure_prob=1% max_steps=50", "max_failure_prob sets the step budget"),
    ("gaussian:sigma=0.1 max_failure_prob=60%", "max_failure_prob must be"),
    ("gaussian:sigma=0.1 min_robust_at=5", "min_robust_at takes STEPS:FRACTION pairs"),
    ("defocus-blur max_failure_prob=1%", "is a severity sweep"),
    ("gaussian:sigma=-1 min_robust=80%", "sigma"),
    ("nosuch min_robust=80%", "nosuch"),
    ({"family": "gaussian", "noise": "gaussian", "min_robust": 0.8}, "names its noise once"),
    ({"min_robust": 0.8}, "names its noise once"),
    ({"family": 3, "min_robust": 0.8}, "must be text"),
    ({"noise": "gaussian", "sigma": 0.2, "min_robust": 0.8}, "unknown key(s) sigma"),
    ({"family": "gaussian", "min_robust": True}, "min_robust must be a fraction"),
    (3, "is text such as"),
])
def test_a_bad_noise_check_is_refused_in_one_line(value, message):
    with pytest.raises(InvalidInput, match=None) as exc:
        parse_noise_check(value)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_the_gate_checks_several_families_from_the_cli_with_the_error_split(bundled_model, tmp_path, capsys):
    code = main(["gate", str(bundled_model), *GATE, "--min-accuracy", "90%",
                 "--noise-check", "gaussian:sigma=0.3 min_robust=20%",
                 "--noise-check", "patch:size=12,fill=random min_robust=99%",
                 "--out", str(tmp_path / "g"), "--junit", str(tmp_path / "g.xml"), "--summary", str(tmp_path / "g.md")])
    out = capsys.readouterr().out
    assert code == 1 and "gate FAIL: 3 noise conditions" in out
    assert "under gaussian:sigma=0.3: pass, 100 of 120 images" in out
    assert "under no noise: pass, the clean pass only, 120 inferences" in out
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    names = [c["name"] for c in g["checks"]]
    assert names == ["min_accuracy", "min_robust@gaussian:sigma=0.3", "min_robust@patch:size=12,fill=random,value=0"]
    assert [c["verdict"] for c in g["checks"]] == ["pass", "pass", "fail"]
    assert [r["noise"] for r in g["conditions"]] == ["no noise", "gaussian:sigma=0.3",
                                                     "patch:size=12,fill=random,value=0"]
    assert math.isclose(g["settings"]["confidence_per_condition"], 1 - 0.05 / 3)
    assert all(math.isclose(r["policy"]["confidence"], 1 - 0.05 / 3) for r in g["conditions"])
    assert g["conditions"][1]["settings"]["noise"]["corruption"] == "gaussian:sigma=0.3"
    assert g["inferences"] == sum(r["inferences"] for r in g["conditions"])
    # the throughput adds up over the conditions (no baseline: the candidate ran every inference)
    tp = g["work"]["throughput"]
    assert tp["candidate"]["inferences"] == g["inferences"] == sum(
        r["throughput"]["candidate"]["inferences"] for r in g["conditions"])
    assert tp["candidate_vs_baseline"] is None and "baseline" not in tp
    assert g["policy"]["min_accuracy"] == 0.9 and g["policy"]["confidence"] == 0.95
    xml = (tmp_path / "g.xml").read_text()
    assert 'name="min_robust@gaussian:sigma=0.3"' in xml and xml.count("<failure") == 1
    md = (tmp_path / "g.md").read_text()
    assert "3 noise conditions, each at 98.33% (Bonferroni)" in md and "`gaussian:sigma=0.3` pass" in md


def test_each_condition_is_the_gate_of_its_noise_at_its_share_of_the_error(bundled_model):
    """Every number of a condition is what a gate of that noise alone decides at confidence 1 - alpha/K."""
    ds = dict(limit=120, max_steps=20, sessions=1)
    both = run_gates(bundled_model, "sample", policy=GatePolicy(min_robust=0.3),
                     noise_checks=["gaussian:sigma=0.3 min_robust=20%"], **ds)
    alone = run_gate(bundled_model, "sample", policy=GatePolicy(min_robust=0.2, confidence=0.975),
                     noise=NoiseSpec(corruption="gaussian:sigma=0.3", max_steps=20), limit=120, sessions=1)
    main = run_gate(bundled_model, "sample", policy=GatePolicy(min_robust=0.3, confidence=0.975), **ds)
    got = {c.name: (c.value, c.interval, c.verdict, c.n) for c in both.checks}
    assert got["min_robust"] == (main.checks[0].value, main.checks[0].interval, main.checks[0].verdict,
                                 main.checks[0].n)
    c = alone.checks[0]
    assert got["min_robust@gaussian:sigma=0.3"] == (c.value, c.interval, c.verdict, c.n)
    assert both.inferences == alone.inferences + main.inferences


def test_a_gate_of_noise_checks_only_from_toml(bundled_model, tmp_path, capsys):
    config = tmp_path / "gate.toml"
    config.write_text('[gate]\nconfidence = 0.9\n\n[[gate.noise_check]]\nfamily = "gaussian"\nsigma = 0.3\n'
                      'min_robust = "20%"\n\n[[gate.noise_check]]\nnoise = "translate:shift=1"\n'
                      'min_robust = "10%"\nmax_steps = 10\n')
    code = main(["gate", str(bundled_model), *GATE, "--config", str(config), "--out", str(tmp_path / "g")])
    out = capsys.readouterr().out
    assert code == 0 and "gate PASS: 2 noise conditions" in out
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert [c["name"] for c in g["checks"]] == ["min_robust@gaussian:sigma=0.3", "min_robust@translate:shift=1,value=0"]
    assert all(g["policy"][k] is None for k in ("min_robust", "min_accuracy", "max_failure_prob"))
    assert math.isclose(g["settings"]["confidence_per_condition"], 0.95)
    assert g["conditions"][1]["settings"]["noise"]["max_steps"] == 10
    assert g["conditions"][0]["settings"]["noise"]["max_steps"] == 20  # the gate's own budget
    # a sweep gets its five severities; a bad table is refused naming the file and the table
    config.write_text('[[noise_check]]\nfamily = "contrast"\nmin_robust = "10%"\n')
    assert main(["gate", str(bundled_model), *GATE, "--config", str(config), "--out", str(tmp_path / "s")]) in (0, 1)
    g = json.loads((tmp_path / "s" / "gate.json").read_text())
    assert g["conditions"][0]["settings"]["noise"]["max_steps"] == 5
    capsys.readouterr()
    config.write_text('[[gate.noise_check]]\nfamily = "gaussian"\nsigma = 0.3\n\n')
    assert main(["gate", str(bundled_model), *GATE, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "noise_check #1: the check under gaussian:sigma=0.3 has no threshold" in err and str(config) in err


def test_after_a_failed_condition_the_rest_are_not_run(bundled_model, tmp_path, capsys):
    code = main(["gate", str(bundled_model), *GATE, "--noise-check", "patch:size=12,fill=random min_robust=99%",
                 "--noise-check", "gaussian:sigma=0.3 min_robust=20% min_class_robust=1%", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1 and "under gaussian:sigma=0.3: not run (the gate had already failed under another noise)" in out
    g = json.loads((tmp_path / "gate.json").read_text())
    skipped = [c for c in g["checks"] if c["name"].endswith("@gaussian:sigma=0.3")]
    assert [c["name"] for c in skipped] == ["min_robust@gaussian:sigma=0.3", "min_class_robust@gaussian:sigma=0.3"]
    assert all(c["value"] is None and c["verdict"] == "inconclusive" and "not evaluated" in c["message"]
               for c in skipped)
    assert g["conditions"][1]["evaluated"] is False and g["work"]["inferences_full_estimate"] is None
    # without early stop every condition runs
    code = main(["gate", str(bundled_model), *GATE, "--no-early-stop",
                 "--noise-check", "patch:size=12,fill=random min_robust=99%",
                 "--noise-check", "gaussian:sigma=0.3 min_robust=20%", "--out", str(tmp_path / "all")])
    g = json.loads((tmp_path / "all" / "gate.json").read_text())
    assert code == 1 and [c["verdict"] for c in g["checks"]] == ["fail", "pass"]


def test_noise_checks_that_cannot_run_are_refused_before_any_work(bundled_model, tmp_path, capsys):
    def refused(*args) -> str:
        assert main(["gate", str(bundled_model), *GATE, *args]) == 2
        return capsys.readouterr().err

    assert "max_robust_drop under gaussian:sigma=0.3 compares with a baseline" in \
        refused("--noise-check", "gaussian:sigma=0.3 max_robust_drop=1%")
    assert "the noise gaussian:sigma=0.3 has two noise checks" in \
        refused("--noise-check", "gaussian:sigma=0.3 min_robust=1%",
                "--noise-check", "gaussian:sigma=0.3 min_robust=2%")
    assert "patch: size must be an integer in [1, 28] for 28x28 images" in \
        refused("--noise-check", "patch:size=40 min_robust=1%")
    assert "unknown key(s) min_robustness" in refused("--noise-check", "gaussian min_robustness=1%")
    results = tmp_path / "base"
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "120", "--max-steps", "20",
                 "--out", str(results), "--no-report"]) == 0
    capsys.readouterr()
    err = refused("--baseline", str(results), "--baseline-model", str(bundled_model),
                  "--noise-check", "gaussian:sigma=0.3 max_robust_drop=1%")
    assert "max_robust_drop under gaussian:sigma=0.3 needs the baseline model: a results folder" in err
    assert not (tmp_path / "gate.json").exists()


def test_a_drop_check_under_a_family_pairs_the_baseline_model(bundled_model, tmp_path):
    r = run_gates(bundled_model, "sample", policy=None, rules=GatePolicy(min_robust=0.5),
                  noise_checks=[NoiseCheck(NoiseSpec(corruption="gaussian:sigma=0.3").corruption,
                                           max_robust_drop=0.1)],
                  baseline=bundled_model, limit=120, max_steps=20, sessions=1)
    c = r.checks[0]
    assert c.name == "max_robust_drop@gaussian:sigma=0.3" and c.value == 0.0 and c.verdict == "pass"
    assert r.baseline is not None and r.baseline["sha256"] == r.candidate["sha256"]


def test_one_noise_check_as_a_severity_limit_reads_in_the_singular(bundled_model, tmp_path, capsys):
    """'At most k images with a severity at failure of S or less' is a golden-set check at that one level."""
    code = main(["gate", str(bundled_model), *GATE, "--noise-check",
                 "gaussian:sigma=0.1 max_failure_prob=10% max_fragile=5", "--out", str(tmp_path / "g"),
                 "--summary", str(tmp_path / "g.md")])
    cap = capsys.readouterr()
    assert code in (0, 1), cap.err
    assert "1 noise condition, decided at 95.0000% confidence" in cap.err
    assert "noise conditions" not in cap.out + cap.err
    assert f"gate {('PASS' if code == 0 else 'FAIL')}: 1 noise condition," in cap.out
    assert "max_failure_prob@gaussian:sigma=0.1:" in cap.out and "at most 5 allowed" in cap.out
    md = (tmp_path / "g.md").read_text()
    assert "1 noise condition at 95.00%: `gaussian:sigma=0.1`" in md and "Bonferroni" not in md
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert [c["name"] for c in g["checks"]] == ["max_failure_prob@gaussian:sigma=0.1"]
