"""``pyrobust gate`` and ``pyrobust compare``: statistical decisions, exit codes, reports, early stop, pairing."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pyrobust.cli import main
from pyrobust.data.dataset import Dataset
from pyrobust.errors import InvalidInput
from pyrobust.files import file_sha256
from pyrobust.gate.policy import GatePolicy
from pyrobust.gate.reports import append_github_summary
from pyrobust.gate.run import run_gate
from pyrobust.stats import look_schedule, paired_difference_interval
from pyrobust.types import NoiseSpec
from tests.builders import save_npz


def _npz(path, images, labels):
    n = len(labels)
    save_npz(path, Dataset("d", None, images, np.asarray(labels, np.int64), np.arange(n), str(path)))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    zeros = np.zeros((60, 28, 28, 1), np.uint8)
    ones = np.full((60, 28, 28, 1), 255, np.uint8)
    return {
        # constant3 says 3 whatever the input: every image robust
        "all_robust": _npz(d / "threes.npz", zeros, [3] * 60),
        # any_noise on black images labelled 0: every image fooled at step 1
        "none_robust": _npz(d / "black.npz", zeros, [0] * 60),
        # any_noise on 20 black (fooled) and 20 white (robust) images: exactly 50 % robust
        "half_robust": _npz(d / "half.npz", np.concatenate([zeros[:20], ones[:20]]), [0] * 20 + [1] * 20),
    }


def gate(capsys, *args):
    code = main(["gate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- statistics
def test_look_schedule():
    looks = look_schedule(10000)
    assert looks[0] == 250 and looks[-1] == 10000 and all(b > a for a, b in zip(looks, looks[1:], strict=False))
    assert look_schedule(50) == [50] and look_schedule(500) == [100, 150, 225, 338, 500]


def test_paired_interval_basics():
    diff, lo, hi = paired_difference_interval(800, 30, 10, 160)
    assert diff == pytest.approx(0.02) and lo < diff < hi
    # agreement narrows the interval: same marginals, fewer discordant pairs
    _, lo2, hi2 = paired_difference_interval(810, 20, 0, 170)
    assert hi2 - lo2 < hi - lo
    assert paired_difference_interval(0, 0, 0, 0) == (0.0, -1.0, 1.0)


def test_paired_interval_coverage():
    """Newcombe's interval covers the true paired difference at about its nominal rate (seeded simulation)."""
    rng = np.random.default_rng(0)
    p = np.array([0.80, 0.05, 0.02, 0.13])  # both, only first, only second, neither: true diff 0.03
    hits = 0
    for _ in range(400):
        a, b, c, d = rng.multinomial(500, p)
        _, lo, hi = paired_difference_interval(a, b, c, d)
        hits += lo <= 0.03 <= hi
    assert hits / 400 >= 0.92


# ---------------------------------------------------------------------------------------- verdicts and codes
@pytest.mark.slow
def test_pass_fail_inconclusive(capsys, tmp_path, models, data):
    code, out, _ = gate(capsys, models["constant3"], "--dataset", data["all_robust"], "--min-robust", "90%",
                        "--max-steps", "20")
    assert code == 0 and "gate PASS" in out
    code, out, _ = gate(capsys, models["any_noise"], "--dataset", data["none_robust"], "--min-robust", "0.1",
                        "--low", "0.5")
    assert code == 1 and "gate FAIL" in out and "min_robust: robust 0.00%" in out
    code, out, _ = gate(capsys, models["any_noise"], "--dataset", data["half_robust"], "--min-robust", "0.5",
                        "--low", "0.5", "--max-steps", "10")
    assert code == 1 and "gate INCONCLUSIVE" in out
    assert "no number of images at these shares settles it" in out  # 50.00 % measured against a 50 % threshold
    code, out, _ = gate(capsys, models["any_noise"], "--dataset", data["half_robust"], "--min-robust", "0.45",
                        "--low", "0.5", "--max-steps", "10")
    assert code == 1 and re_search(r"about [\d,]+ more images at the same shares would settle it \(the dataset has "
                                   r"no more\)", out)
    code, _, _ = gate(capsys, models["any_noise"], "--dataset", data["half_robust"], "--min-robust", "0.45",
                      "--low", "0.5", "--max-steps", "10", "--inconclusive", "pass")
    assert code == 0


def re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None


@pytest.mark.slow
def test_exit_code_does_not_depend_on_output_options(capsys, tmp_path, models, data):
    base = [models["any_noise"], "--dataset", data["none_robust"], "--min-robust", "0.1", "--low", "0.5"]
    codes = {gate(capsys, *base)[0],
             gate(capsys, *base, "--out", tmp_path / "o", "--junit", tmp_path / "j.xml",
                  "--summary", tmp_path / "s.md")[0]}
    assert codes == {1}


@pytest.mark.parametrize("args,match", [
    ([], "the gate has nothing to check"),
    (["--min-robust", "150%"], "must be between 0 and 1"),
    (["--min-robust", "lots"], "expected a fraction like 0.85"),
    (["--max-robust-drop", "0.01"], "compare with a baseline: give --baseline"),
    (["--min-robust", "0.5", "--confidence", "1.5"], r"confidence must be a number in \[0.5, 1\)"),
    (["--min-robust", "0.5", "--inconclusive", "maybe"], "Invalid value for '--inconclusive'"),
])
def test_usage_errors_exit_2(capsys, bundled_model, args, match):
    code, _, err = gate(capsys, bundled_model, "--dataset", "sample", *args)
    assert code == 2 and re_search(match, err) and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_bad_input_exits_3_and_internal_errors_4(capsys, monkeypatch, tmp_path, bundled_model, models):
    assert gate(capsys, tmp_path / "nope.onnx", "--dataset", "sample", "--min-robust", "0.5")[0] == 3
    assert gate(capsys, models["five_classes"], "--dataset", "sample", "--min-robust", "0.5")[0] == 3
    assert gate(capsys, bundled_model, "--dataset", "mnist:test", "--data-dir", tmp_path, "--min-robust",
                "0.5")[0] == 3
    import pyrobust.gate.run

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(pyrobust.gate.run, "run_gate", boom)
    code, _, err = gate(capsys, bundled_model, "--dataset", "sample", "--min-robust", "0.5")
    assert code == 4 and "internal error: RuntimeError: kaput" in err


# -------------------------------------------------------------------------------------------------- outputs
@pytest.mark.slow
def test_reports(capsys, monkeypatch, tmp_path, bundled_model):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, _, _ = gate(capsys, bundled_model, "--dataset", "sample", "--min-accuracy", "0.9", "--min-robust", "0.5",
                      "--min-class-robust", "0.3", "--max-steps", "30", "--out", tmp_path / "g", "--junit",
                      tmp_path / "gate.xml", "--summary", tmp_path / "gate.md")
    assert code == 0
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert g["schema_version"] == 4 and g["conditions"] == [] and g["decision"] == "pass" and g["exit_code"] == 0
    assert g["settings"]["noise"]["max_steps"] == 30 and "max_steps" not in g["settings"]  # one noise block
    assert len(g["checks"]) == 2 + 10
    for c in g["checks"]:
        assert set(c) >= {"name", "value", "interval", "threshold", "verdict", "n", "confidence", "stage", "power"}
        assert c["power"]["images"] > 0 and "80% power" in c["power"]["message"]
    assert [c["stage"] for c in g["checks"]][:2] == ["clean", "noise"]
    assert g["policy"]["family"] == "holm" and g["policy"]["spending"] == "equal"
    assert g["work"]["inferences"] == g["inferences"] and g["work"]["inferences_full_estimate"] >= g["inferences"]
    assert g["candidate"]["sha256"] and g["dataset"]["sha256"]
    suite = ET.parse(tmp_path / "gate.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 12 and suite.get("tests") == "12" and suite.get("failures") == "0"
    assert {c.get("name") for c in cases} >= {"min_accuracy", "min_robust", "min_class_robust[9]"}
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "### pyrobust gate passed" in text and "| `min_robust` |" in text
    assert (tmp_path / "gate.md").read_text() in text


@pytest.mark.slow
def test_junit_failure_messages_carry_the_numbers(capsys, tmp_path, models, data):
    gate(capsys, models["any_noise"], "--dataset", data["none_robust"], "--min-robust", "0.1", "--min-accuracy",
         "0.5", "--low", "0.5", "--junit", tmp_path / "j.xml")
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    fails = {c.get("name"): c.find("failure") for c in suite.findall("testcase")}
    assert fails["min_accuracy"] is None  # clean accuracy is 100 %
    msg = fails["min_robust"].get("message")
    assert "robust 0.00% (0/60)" in msg and "threshold >= 10.00%: fail" in msg


def test_github_summary_stays_under_the_limit(tmp_path):
    p = tmp_path / "s.md"
    p.write_bytes(b"x" * (1024 * 1024 - 200))
    assert append_github_summary("y" * 500, p)
    assert p.stat().st_size <= 1024 * 1024 and b"summary omitted" in p.read_bytes()
    p.write_bytes(b"x" * (1024 * 1024 - 10))
    assert not append_github_summary("y" * 500, p)
    assert p.stat().st_size == 1024 * 1024 - 10


@pytest.mark.slow
def test_config_file_and_overrides(capsys, tmp_path, bundled_model):
    cfg = tmp_path / "gate.toml"
    cfg.write_text('[gate]\ndataset = "sample"\nmin-robust = "50%"\nmax_steps = 30\nearly_stop = true\n')
    assert gate(capsys, bundled_model, "--config", cfg)[0] == 0
    code, out, _ = gate(capsys, bundled_model, "--config", cfg, "--min-robust", "0.99")
    assert code == 1 and "threshold >= 99.00%" in out
    cfg.write_text('[gate]\ndataset = "sample"\nmin-robust = "50%"\nmax_steps = 30\nfamily = "bonferroni"\n'
                   'spending = "obrien-fleming"\n')
    code, _, _ = gate(capsys, bundled_model, "--config", cfg, "--out", tmp_path / "g")
    policy = json.loads((tmp_path / "g" / "gate.json").read_text())["policy"]
    assert code == 0 and policy["family"] == "bonferroni" and policy["spending"] == "obrien-fleming"
    cfg.write_text('min_robust = 0.5\nfrobnicate = 1\n')
    code, _, err = gate(capsys, bundled_model, "--config", cfg, "--dataset", "sample")
    assert code == 2 and "unknown key 'frobnicate'" in err
    cfg.write_text("min_robust = [")
    assert gate(capsys, bundled_model, "--config", cfg, "--dataset", "sample")[0] == 2


@pytest.mark.parametrize("text, message", [
    ('min_robust = "99%"\n[gate]\ndataset = "sample"\n',
     "key(s) 'min_robust' stand outside the [gate] table and would be ignored"),
    ('[gate]\nmin-robust = "10%"\nmin_robust = "99%"\n', "'min-robust' and 'min_robust' set the same option"),
    ('[gate]\nmin_robust = "10%"\n[gate.extra]\nx = 1\n', "unknown key 'extra'"),
    ('[gate]\nmin_robust = ["10%"]\n', "min_robust = ['10%'] is not a valid value"),
    ('[other]\nmin_robust = 0.5\n', "unknown key 'other'"),
])
def test_config_keys_are_never_dropped_silently(capsys, tmp_path, bundled_model, text, message):
    """A check that vanished from the policy would pass a gate it should fail."""
    cfg = tmp_path / "gate.toml"
    cfg.write_text(text)
    code, _, err = gate(capsys, bundled_model, "--config", cfg, "--dataset", "sample")
    assert code == 2 and message in err, err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(capsys, tmp_path, bundled_model, kind):
    import os

    path = tmp_path / "gate.toml"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes it: reading would wait for ever
    elif kind == "folder":
        path.mkdir()
    else:
        path = "/dev/zero"
    code, _, err = gate(capsys, bundled_model, "--config", path, "--dataset", "sample")
    assert code == 2 and ("not a regular file" in err or "is a directory" in err), err


# ----------------------------------------------------------------------------------- early stop and pairing
@pytest.mark.slow
def test_early_stop_takes_less_work_with_the_same_verdict(bundled_model):
    spec = NoiseSpec(max_steps=60)
    for threshold, verdict in ((0.6, "pass"), (0.97, "fail")):  # the sample is ~87 % robust at 60 steps
        policy = GatePolicy(min_robust=threshold)
        early = run_gate(bundled_model, "sample", policy=policy, noise=spec)
        full = run_gate(bundled_model, "sample", policy=GatePolicy(min_robust=threshold, early_stop=False), noise=spec)
        assert early.decision == full.decision == verdict
        assert early.images_evaluated < full.images_evaluated == 500
        assert early.inferences < 0.5 * full.inferences


@pytest.mark.slow
def test_paired_baseline_detects_an_injected_regression(tmp_path, capsys, bundled_model, regressed, shared_data):
    common = ["--dataset", "mnist:test", "--data-dir", shared_data, "--limit", "2000", "--max-steps", "30",
              "--no-early-stop"]
    code, out, _ = gate(capsys, regressed, *common, "--baseline", bundled_model, "--max-robust-drop", "0.005")
    assert code == 1 and "max_robust_drop: robust fraction drop 2.80%" in out and ": fail" in out
    # the same decision from the baseline's saved results (no second model run)
    assert main(["evaluate", str(bundled_model), "--dataset", "mnist:test", "--data-dir", str(shared_data),
                 "--limit", "2000", "--max-steps", "30", "--no-report", "--out", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    code, out, _ = gate(capsys, regressed, *common, "--baseline", tmp_path / "base", "--baseline-model",
                        bundled_model, "--max-robust-drop", "0.005")
    assert code == 1 and "drop 2.80%" in out
    # the unchanged model against itself passes a 0.5-point budget
    code, out, _ = gate(capsys, bundled_model, *common, "--baseline", tmp_path / "base", "--baseline-sha256",
                        file_sha256(bundled_model), "--max-robust-drop", "0.005", "--max-accuracy-drop", "0.005")
    assert code == 0, out
    # saved results of other settings cannot be paired
    code, _, err = gate(capsys, regressed, *common[:-3], "--max-steps", "31", "--baseline", tmp_path / "base",
                        "--max-robust-drop", "0.01")
    assert code == 2 and "cannot be paired with this gate: max_steps 30 → 31 (there → here)" in err


def test_pairing_settles_what_independent_samples_cannot():
    """A 2.8-point drop on 2000 images (63 lost, 7 gained) against a 1.5-point budget: the paired interval fails
    it; the unpaired one (Newcombe's method without the agreement term) cannot tell."""
    from pyrobust.stats import wilson_interval

    n, base, cand = 2000, 1803, 1747
    p1, p2 = base / n, cand / n
    l1, u1 = wilson_interval(base, n)
    l2, u2 = wilson_interval(cand, n)
    unpaired_lo = (p1 - p2) - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    diff, paired_lo, _ = paired_difference_interval(1740, 63, 7, 190)
    assert math.isclose(diff, 0.028) and math.isclose(p1 - p2, 0.028)
    assert unpaired_lo < 0.015 < paired_lo


# ------------------------------------------------------------------------------- order of work and fail fast
@pytest.mark.slow
def test_accuracy_checks_cost_one_clean_pass(bundled_model):
    """min_accuracy alone needs no noise at all: one inference per image, decided in one look."""
    r = run_gate(bundled_model, "sample", policy=GatePolicy(min_accuracy=0.9), noise=NoiseSpec(max_steps=60))
    assert r.decision == "pass" and r.inferences == 500 and r.images_evaluated == 0
    assert r.checks[0].stage == "clean" and r.checks[0].n == 500 and r.looks[0]["stage"] == "clean"
    # with a robustness check beside it, the noise looks run only for that check
    both = run_gate(bundled_model, "sample", policy=GatePolicy(min_accuracy=0.9, min_robust=0.6),
                    noise=NoiseSpec(max_steps=60))
    alone = run_gate(bundled_model, "sample", policy=GatePolicy(min_robust=0.6), noise=NoiseSpec(max_steps=60))
    assert both.decision == alone.decision == "pass"
    assert both.inferences == alone.inferences + 500 and both.images_evaluated == alone.images_evaluated < 500


@pytest.mark.slow
def test_a_failed_accuracy_check_stops_before_any_noise(bundled_model):
    r = run_gate(bundled_model, "sample", policy=GatePolicy(min_accuracy=0.995, min_robust=0.5))
    assert r.decision == "fail" and r.inferences == 500 and r.stopped_early
    assert "clean pass" in r.stop_reason and r.checks[1].verdict == "inconclusive" and r.checks[1].n == 0
    assert "not evaluated" in r.checks[1].message
    g = json.loads(json.dumps(r.to_dict(), allow_nan=False))  # strict JSON: the unevaluated check has nulls
    assert g["checks"][1]["value"] is None and g["checks"][1]["interval"] is None and g["work"]["stopped_early"]
    assert g["work"]["inferences_full_estimate"] is None  # no noise look ran: its cost is unknown
    full = run_gate(bundled_model, "sample", policy=GatePolicy(min_accuracy=0.995, min_robust=0.5, early_stop=False),
                    noise=NoiseSpec(max_steps=20))
    assert full.decision == "fail" and full.images_evaluated == 500 and not full.stopped_early


@pytest.mark.slow
def test_fail_fast_with_a_baseline_model(bundled_model, regressed, shared_data, capsys, tmp_path):
    """A clear regression fails at an early look: the rest of the images, for both models, are never run."""
    r = run_gate(regressed, "mnist:test", data_dir=shared_data, limit=2000, baseline=bundled_model,
                 policy=GatePolicy(max_robust_drop=0.0), noise=NoiseSpec(max_steps=30))
    assert r.decision == "fail" and r.stopped_early and "failed at look" in r.stop_reason
    assert r.images_evaluated < 2000 and r.inferences < 0.7 * r.inferences_full_estimate
    g = r.to_dict()["work"]
    assert g["stopped_early"] and g["inferences_saved"] == r.inferences_full_estimate - r.inferences


@pytest.mark.slow
def test_nonfinite_outputs_are_named(capsys, models, data):
    code, out, err = gate(capsys, models["nan"], "--dataset", data["all_robust"], "--min-robust", "0.5")
    assert code == 3 and "every output of the model is NaN or infinite" in err and len(err.strip().splitlines()) == 1
    code, out, err = gate(capsys, models["nan"], "--dataset", data["all_robust"], "--min-accuracy", "0.5")
    assert code == 3 and "NaN or infinite" in err
    # some non-finite outputs: the gate goes on and says so
    code, out, err = gate(capsys, models["inf_on_one"], "--dataset", data["none_robust"], "--min-robust", "0.5",
                          "--scheme", "salt-pepper", "--max-steps", "20")
    assert "warning: the candidate returned NaN or infinite outputs for 0 clean image(s) and" in err, err


@pytest.mark.slow
def test_family_and_spending_options(capsys, bundled_model, tmp_path):
    code, out, _ = gate(capsys, bundled_model, "--dataset", "sample", "--min-robust", "0.5", "--max-steps", "30",
                        "--family", "none", "--spending", "obrien-fleming", "--out", tmp_path / "g")
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert code == 0 and g["policy"]["family"] == "none" and g["policy"]["spending"] == "obrien-fleming"
    assert g["settings"]["alpha_per_look"][0] < 1e-4 and math.isclose(sum(g["settings"]["alpha_per_look"]), 0.05)
    assert gate(capsys, bundled_model, "--dataset", "sample", "--min-robust", "0.5", "--family", "sidak")[0] == 2
    with pytest.raises(InvalidInput, match="family must be one of"):
        GatePolicy(min_robust=0.5, family="sidak")
    with pytest.raises(InvalidInput, match="spending must be one of"):
        GatePolicy(min_robust=0.5, spending="fast")


@pytest.mark.slow
def test_partial_results_cannot_be_a_baseline_or_compared(capsys, tmp_path, bundled_model):
    """A --precision run holds some of the images: pairing it image by image would misalign them."""
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--max-steps", "20", "--precision", "0.2",
                 "--no-report", "--out", str(tmp_path / "part")]) == 0
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--max-steps", "20", "--no-report",
                 "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert part["precision"]["stopped_early"] and part["metrics"]["images"] < 500
    code, _, err = gate(capsys, bundled_model, "--dataset", "sample", "--max-steps", "20", "--baseline",
                        tmp_path / "part", "--max-robust-drop", "0.01")
    assert code == 2 and "cover" in err and "of this gate's 500 images" in err
    assert main(["compare", str(tmp_path / "full"), str(tmp_path / "part")]) == 2
    assert "evaluated different images" in capsys.readouterr().err
