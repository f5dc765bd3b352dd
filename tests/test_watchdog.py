"""Ctrl-C, SIGTERM and --timeout reach a run even inside a model whose inference never ends; a run stopped that way
saves its checkpoint (fresh, with parallel sessions too) and resumes to the same results."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pyrobust
from pyrobust.engine.watchdog import Watchdog

CLI = [sys.executable, "-m", "pyrobust"]


@pytest.fixture(scope="module")
def hanging_model(tmp_path_factory):
    """Scores = a Loop adding 1 to zeros 10**12 times: a valid classifier whose every inference runs for hours."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "one"],
                                                                                    ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["y0"]),
         helper.make_node("Loop", ["M", "c", "y0"], ["y"], body=body)],
        "hang", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor("W", TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32)),
         helper.make_tensor("M", TensorProto.INT64, [], [10**12]),
         helper.make_tensor("c", TensorProto.BOOL, [], [True])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("hang") / "hang.onnx"
    onnx.save(model, str(path))
    return path


def test_timeout_stops_a_model_that_never_returns(hanging_model, tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([*CLI, "evaluate", str(hanging_model), "--dataset", "sample", "--timeout", "2", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 130 and "timed out after 2 s (--timeout)" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "\x1b[" not in r.stderr and "onnxruntime" not in r.stderr  # one clean line
    assert took < 60


def test_sigterm_stops_a_model_that_never_returns(hanging_model):
    proc = subprocess.Popen([*CLI, "gate", str(hanging_model), "--dataset", "sample", "--min-robust", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # well inside the first inference
    assert proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10, err


def test_timeout_mid_run_saves_a_fresh_checkpoint_with_sessions_and_resumes(tmp_path, bundled_model, shared_data):
    common = ["evaluate", str(bundled_model), "--dataset", "mnist:test", "--data-dir", str(shared_data), "--limit",
              "3000", "--sessions", "2", "--threads", "2", "--batch-size", "64", "--no-report", "--out",
              str(tmp_path / "o")]
    r = subprocess.run([*CLI, *common, "--timeout", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130 and "timed out after 2 s (--timeout); interrupted after" in r.stderr, r.stderr
    saved = int(r.stderr.split("interrupted after ")[1].split(" ")[0])
    assert 0 < saved < 3000  # merged image by image, not only when a whole shard finishes
    r = subprocess.run([*CLI, *common, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = pyrobust.load_results(tmp_path / "o")[0]
    whole = pyrobust.evaluate(bundled_model, "mnist:test", data_dir=shared_data, limit=3000, report=False,
                              sessions=1)
    assert np.array_equal(resumed.first_failure, whole.first_failure)


def test_watchdog_deadline_interrupts_python_code_too():
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), Watchdog() as dog:
        dog.set_timeout(0.3)
        while time.monotonic() - t0 < 10:
            time.sleep(0.01)
    assert dog.reason == "timeout" and time.monotonic() - t0 < 3
    assert signal.set_wakeup_fd(-1) == -1  # the wake-up descriptor was given back
