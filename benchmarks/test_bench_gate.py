"""The gate's early stop and paired comparison on the full MNIST test set (10,000 images, paper settings).

* Work of a sequential gate against a full evaluation, for thresholds 5 and 10 points below and above the model's
  robust fraction (the issue asks for <= 30 % of the work at >= 5 points).
* Paired detection of small injected regressions: the bundled CNN with its class-8 bias raised by 1.0 and 2.0.

Run: ``python -m pytest benchmarks/test_bench_gate.py`` (writes ``last_gate.json``).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from pyrobust import evaluate
from pyrobust.gate import GatePolicy, run_gate

DATA = Path(os.environ.get("PYROBUST_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS: dict = {}


@pytest.fixture(scope="module")
def model():
    with resources.as_file(resources.files("pyrobust") / "assets" / "mnist-cnn.onnx") as p:
        return Path(p)


@pytest.fixture(scope="module")
def full(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    ev = evaluate(model, "mnist:test", data_dir=DATA, out=out, report=False)
    RESULTS["full"] = {"robust": ev.summary["metrics"]["robust"]["fraction"], "inferences": ev.outcome.inferences,
                       "seconds": ev.outcome.seconds}
    return out, ev


@pytest.mark.parametrize("gap", [-0.10, -0.05, 0.05, 0.10])
def test_early_stop_work(benchmark, model, full, gap):
    _, ev = full
    robust = ev.summary["metrics"]["robust"]["fraction"]
    threshold = round(robust - gap, 4)  # gap > 0: threshold below the true value (a pass)
    holder = {}

    def run():
        holder["r"] = run_gate(model, "mnist:test", data_dir=DATA, policy=GatePolicy(min_robust=threshold))

    benchmark.pedantic(run, rounds=1, iterations=1)
    r = holder["r"]
    share = r.inferences / ev.outcome.inferences
    RESULTS[f"gap_{gap:+.2f}"] = {"threshold": threshold, "decision": r.decision, "images": r.images_evaluated,
                                  "inferences": r.inferences, "work_share": share}
    assert r.decision == ("pass" if gap > 0 else "fail")
    assert share <= 0.30


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_paired_regression(benchmark, model, full, tmp_path, shift):
    base_dir, ev = full
    proto = onnx.load(str(model))
    for t in proto.graph.initializer:
        if t.name == "net.9.bias":
            b = numpy_helper.to_array(t).copy()
            b[8] += shift
            t.CopyFrom(numpy_helper.from_array(b, t.name))
    cand = tmp_path / "regressed.onnx"
    onnx.save(proto, str(cand))
    holder = {}

    def run():
        holder["r"] = run_gate(cand, "mnist:test", data_dir=DATA, baseline=base_dir,
                               policy=GatePolicy(max_robust_drop=0.0, early_stop=False))

    benchmark.pedantic(run, rounds=1, iterations=1)
    c = holder["r"].checks[0]
    RESULTS[f"shift_{shift}"] = {"drop": c.value, "interval": c.interval, "verdict": c.verdict}
    assert c.verdict == "fail"  # a real drop is detected: the whole interval is above zero


def test_report_gate(capsys):
    Path(__file__).with_name("last_gate.json").write_text(json.dumps(RESULTS, indent=2) + "\n")
    with capsys.disabled():
        print("\n" + json.dumps(RESULTS, indent=2))
