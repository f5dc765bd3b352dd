"""Time, memory and thread limits, and the validation of every number an option or config can carry."""

from __future__ import annotations

import json
import re
import warnings

import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import InvalidInput
from pyrobust.machine import ThreadsCappedWarning, cgroup_cpu_limit, check_threads, default_threads


def test_cgroup_quotas_are_read(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "nowhere") is None


def test_threads_are_capped_at_the_cpus_available(bundled_model):
    n = default_threads()
    with pytest.warns(ThreadsCappedWarning, match=f"999 threads asked for, but this process may use {n}"):
        assert check_threads(999) == n
    with pytest.warns(ThreadsCappedWarning):
        assert OnnxModel(bundled_model, threads=10**20).threads == n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_threads(1) == 1 and check_threads(None) == n
    for bad in (0, -3, 1.5, True, "2"):
        with pytest.raises(InvalidInput, match="threads must be an integer >= 1"):
            check_threads(bad)


@pytest.mark.slow
def test_threads_in_the_cli_and_the_gate_config(capsys, tmp_path, bundled_model):
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "5", "--max-steps", "2",
                 "--threads", "100000000000000000000", "--no-report", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 0 and "warning: 100000000000000000000 threads asked for" in err
    assert main(["gate", str(bundled_model), "--dataset", "sample", "--min-robust", "0.5", "--threads", "-3"]) == 2
    assert "threads must be an integer >= 1; got -3" in capsys.readouterr().err
    cfg = tmp_path / "gate.toml"
    cfg.write_text('dataset = "sample"\nmin-robust = "50%"\nthreads = 0\n')
    assert main(["gate", str(bundled_model), "--config", str(cfg)]) == 2
    assert "threads must be an integer >= 1; got 0" in capsys.readouterr().err
    code = main(["gate", str(bundled_model), "--dataset", "sample", "--min-robust", "0.5", "--max-steps", "10",
                 "--threads", "999", "--out", str(tmp_path / "g")])
    assert code == 0 and "warning: 999 threads asked for" in capsys.readouterr().err
    assert json.loads((tmp_path / "g" / "gate.json").read_text())["settings"]["threads"] == default_threads()


def test_evaluate_caps_threads_in_python(bundled_model):
    with pytest.warns(ThreadsCappedWarning):
        ev = pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2, threads=64, sessions=1)
    assert ev.summary["settings"]["threads"] == default_threads()


@pytest.mark.parametrize("args,match", [
    (["--std", "1e-50", "--mean", "0.1"], r"std in \[1e-06, 1e\+06\]"),
    (["--low", "-1e308", "--high", "1e308"], r"noise values must lie within ±1e\+06"),
    (["--mean", "inf", "--std", "1"], r"mean must be within"),
    (["--max-steps", "100000000"], r"max_steps must be an integer in \[1, 100,000\]"),
])
def test_numbers_that_can_only_be_mistakes_are_refused(capsys, tmp_path, bundled_model, args, match):
    for command in (["evaluate", str(bundled_model), "--dataset", "sample", "--out", str(tmp_path / "o")],
                    ["gate", str(bundled_model), "--dataset", "sample", "--min-robust", "0.5"]):
        assert main([*command, *args]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gate_outputs_are_checked_before_any_work(capsys, tmp_path, monkeypatch, bundled_model):
    base = ["gate", str(bundled_model), "--dataset", "sample", "--min-robust", "0.5", "--max-steps", "10"]
    # a report into a folder that does not exist yet: created
    assert main([*base, "--junit", str(tmp_path / "new" / "gate.xml"), "--out", str(tmp_path / "o1")]) == 0
    assert (tmp_path / "new" / "gate.xml").is_file() and (tmp_path / "o1" / "gate.json").is_file()
    capsys.readouterr()
    (tmp_path / "adir").mkdir()
    assert main([*base, "--junit", str(tmp_path / "adir"), "--out", str(tmp_path / "o2")]) == 2
    out, err = capsys.readouterr()
    assert "--junit" in err and "is a directory" in err and "gate PASS" not in out  # refused before deciding
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "adir"))
    assert main(base) == 2
    assert "$GITHUB_STEP_SUMMARY" in capsys.readouterr().err
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "missing-folder" / "summary.md"))
    assert main(base) == 2
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")


@pytest.mark.slow
def test_a_report_that_cannot_be_written_after_the_decision_keeps_the_verdict(capsys, tmp_path, monkeypatch,
                                                                             bundled_model):
    import errno

    import pyrobust.gate.reports as gate

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "gate.json"))

    monkeypatch.setattr(gate, "write_outputs", full_disk)
    code = main(["gate", str(bundled_model), "--dataset", "sample", "--min-robust", "0.5", "--max-steps", "10",
                 "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 2 and "gate PASS" in out
    assert "the gate decided PASS (above), but its reports could not be written: No space left on device" in err


def test_an_explicit_data_dir_that_does_not_exist_is_an_error(capsys, tmp_path, bundled_model):
    with pytest.raises(pyrobust.DataError, match="data_dir .*: no such folder"):
        pyrobust.load_dataset("mnist:test", data_dir=tmp_path / "nope")
    assert main(["evaluate", str(bundled_model), "--dataset", "mnist:test", "--data-dir", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 3
    assert "--data-dir" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_corrupt_tuning_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, bundled_model, capsys):
    from pyrobust.engine.tuning import TuningCacheWarning, cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2)  # measures and caches
    good = json.loads(cache_path().read_text())
    assert good["batch_size"] and good["layout"]
    for content in ("{not json", "[]", '{"batch_size": 5}'):
        cache_path().write_text(content)
        with pytest.warns(TuningCacheWarning, match="not a pyrobust tuning cache"):
            ev = pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2)
        assert ev.summary["settings"]["batch_size_choice"] == "measured"
        assert json.loads(cache_path().read_text())["batch_size"]  # rewritten whole
    crafted = {section: {k: {f: -5 for f in v} for k, v in entries.items()} for section, entries in good.items()}
    cache_path().write_text(json.dumps(crafted))
    with pytest.warns(TuningCacheWarning, match="malformed"):
        ev = pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2)
    assert ev.summary["settings"]["batch_size"] > 0
    cache_path().write_text("{not json")
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "5", "--max-steps", "2",
                 "--out", str(tmp_path / "o")]) == 0
    assert "warning:" in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--max-memory", "inf"], "max_memory must be a number of MiB in \\(0, "),
    (["--max-memory", "nan"], "max_memory must be a number of MiB in \\(0, "),
    (["--scheduler", "tcp://"], r"scheduler takes local:N or tcp://HOST:PORT"),
    (["--scheduler", "foo://bar"], r"scheduler takes local:N or tcp://HOST:PORT"),
    (["--scheduler", "tcp://host:99999"], r"scheduler takes local:N or tcp://HOST:PORT"),
    (["--scheduler", "local:0"], r"local:N needs a number of workers in \[1, 1024\]"),
])
def test_bad_option_values_exit_2_before_any_work(capsys, tmp_path, bundled_model, args, match):
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("toml,match", [
    ('gate = "x"\n', r"\[gate\] must be a table"),
    ('dataset = "sample"\nmin-robust = "50%"\nlimit = inf\n', r"'inf' is not a valid integer"),
    ('dataset = "sample"\nmin-robust = "50%"\nlimit = [1]\n', r"limit = \[1\] is not a valid value"),
    ('dataset = "sample"\nmin-robust = "50%"\nearly-stop = "no"\n', r"\(true or false\)"),
    ('dataset = "mnist:test"\nmin-robust = "50%"\ndata-dir = 5\n', r"--data-dir 5: no such folder"),
])
def test_gate_config_values_are_checked_like_options(capsys, tmp_path, bundled_model, toml, match):
    cfg = tmp_path / "gate.toml"
    cfg.write_text(toml)
    code = main(["gate", str(bundled_model), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code in (2, 3) and len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    if match:
        assert re.search(match, err), err


@pytest.mark.slow
def test_outputs_that_cannot_be_written_are_refused_up_front(capsys, tmp_path, bundled_model):
    run = tmp_path / "run"
    pyrobust.evaluate(bundled_model, "sample", limit=30, max_steps=5, out=run, report=False)
    (tmp_path / "file").write_text("x")
    blocked = tmp_path / "file" / "sub"  # a path under a regular file can never be created
    assert main(["compare", str(run), str(run), "--out", str(blocked)]) == 2
    assert main(["select", str(run), "--per-class", "3", "--allow-test-split", "--out", str(blocked / "s.npz")]) == 2
    assert main(["replay", str(run), "--index", "1", "--step", "1", "--out", str(blocked / "r.npy")]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and err.count("pyrobust: error:") == 3
    assert main(["select", str(run), "--per-class", "100000000000", "--allow-test-split", "--out",
                 str(tmp_path / "s.npz")]) == 2
    assert "per_class must be an integer in [1, 1,000,000]" in capsys.readouterr().err


@pytest.mark.slow
def test_huge_label_values_keep_the_outputs_small(tmp_path):
    """Labels up to 99,999 on 20 images: the summary lists the classes present, the figure the least robust."""
    import time

    import numpy as np
    from onnx import TensorProto, helper

    from tests.builders import save_model

    k = 100_000
    row = np.zeros((1, k), np.float32)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m2"]),
             helper.make_node("Mul", ["m2", "zero"], ["z"]), helper.make_node("Add", ["z", "row"], ["y"])]
    inits = [helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("row", TensorProto.FLOAT, [1, k], row.ravel())]
    model = save_model(tmp_path / "wide.onnx", nodes,
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])], inits)
    x = np.zeros((20, 28, 28), np.uint8)
    y = np.array([0, 99_999] * 10)
    t0 = time.monotonic()
    ev = pyrobust.evaluate(model, x, y, max_steps=3, out=tmp_path / "o", sessions=1, batch_size=16)
    assert time.monotonic() - t0 < 60
    assert [r["class"] for r in ev.summary["per_class"]] == [0, 99_999]
    assert (tmp_path / "o" / "summary.json").stat().st_size < 200_000 and (tmp_path / "o" / "per_class.png").exists()
    from pyrobust.gate.policy import GatePolicy, plan_gate

    assert [s.name for s in plan_gate(GatePolicy(min_class_robust=0.5), 20, np.unique(y)).noise] == \
        ["min_class_robust[0]", "min_class_robust[99999]"]


@pytest.mark.slow
def test_tuning_is_measured_again_when_asked_or_when_a_run_was_far_slower(tmp_path, monkeypatch, bundled_model):
    from pyrobust.engine.tuning import _batch_key, _load, _store, auto_batch_size, cache_path, check_run_rate

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = OnnxModel(bundled_model, threads=1)
    m = m.bind((28, 28, 1), n_classes=10)
    size, how = auto_batch_size(m)
    assert how == "measured" and auto_batch_size(m) == (size, "cached")
    assert auto_batch_size(m, retune=True)[1] == "measured"  # --retune
    _store("batch_size", _batch_key(m), {"batch_size": size, "rates": {str(size): 1e9}})
    assert check_run_rate(m, size, achieved=1e9, seconds=10) is None
    assert check_run_rate(m, size, achieved=10.0, seconds=2) is None  # a short run proves nothing
    msg = check_run_rate(m, size, achieved=10.0, seconds=10)
    assert "under half the 1,000,000,000/s measured" in msg and _batch_key(m) not in _load()["batch_size"]
    assert auto_batch_size(m)[1] == "measured" and cache_path().exists()
    assert "numba=" in _batch_key(m) and "onnxruntime=" in _batch_key(m)  # new libraries: measured again


@pytest.mark.slow
def test_the_memory_check_counts_the_models_working_memory(capsys, tmp_path, bundled_model):
    """The issue's case: --max-memory 600 --batch-size 16384 peaked at 5.3 GB; the model's own memory (measured on
    two small batches and scaled) is now part of the check, made before any work."""
    m = OnnxModel(bundled_model, threads=1)
    m = m.bind((28, 28, 1), n_classes=10)
    per_image = m.memory_per_image()
    assert 10_000 < per_image < 10_000_000  # the CNN's activations: tens to hundreds of KiB an image
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--max-memory", "600", "--batch-size",
                 "16384", "--sessions", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 3 and "the model's working memory" in err and "use a smaller --batch-size" in err
    assert not (tmp_path / "o").exists()
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "20", "--max-steps", "2",
                 "--max-memory", "600", "--batch-size", "256", "--sessions", "1", "--out", str(tmp_path / "p")]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_fifo_or_device_as_the_tuning_cache_is_ignored_not_waited_on(tmp_path, bundled_model, kind):
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache" / "pyrobust"
    cache.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(cache / "tuning.json")  # nobody writes it: a plain read would wait for ever
    else:
        (cache / "tuning.json").symlink_to("/dev/zero")  # a read would never end
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "pyrobust", "evaluate", str(bundled_model), "--dataset", "sample",
                        "--limit", "5", "--max-steps", "2", "--out", str(tmp_path / "o")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "not a pyrobust tuning cache" in r.stderr
    assert (cache / "tuning.json").is_file() and not (cache / "tuning.json").is_symlink()  # rewritten as a file
