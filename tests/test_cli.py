import json
import re
import subprocess
import sys

import numpy as np
import pytest

from pyrobust.cli import main
from pyrobust.store.results import load_results


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_evaluate_writes_results_and_report(capsys, tmp_path, bundled_model):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "evaluate", bundled_model, "--dataset", "sample", "--limit", "40",
                                "--max-steps", "20", "--out", out)
    assert code == 0, err
    assert "robust, of all images" in stdout and str(out) in stdout
    for f in ("results.npz", "summary.json", "survival.png", "per_class.png", "examples.png", "failure.png"):
        assert (out / f).stat().st_size > 0
    outcome, summary = load_results(out)
    assert outcome.n == 40 and summary["noise"]["max_steps"] == 20
    assert summary["dataset"]["spec"] == "sample" and summary["dataset"]["count"] == 40


def test_evaluate_json_and_options(capsys, tmp_path, bundled_model):
    code, stdout, _ = run_cli(capsys, "evaluate", bundled_model, "--dataset", "sample", "--range", "100:130",
                              "--max-steps", "5", "--pixels", "10", "--scheme", "salt-pepper", "--mode",
                              "cumulative", "--seed", "9", "--mean", "0", "--std", "1", "--batch-size", "7",
                              "--threads", "1", "--no-report", "--json", "--out", tmp_path / "r")
    assert code == 0
    s = json.loads(stdout)
    assert s["noise"]["scheme"] == "salt-pepper" and s["noise"]["mode"] == "cumulative"
    assert s["noise"]["seed"] == 9 and s["settings"]["batch_size"] == 7 and s["noise"]["mean"] == [0.0]
    assert "pixels" not in s["settings"]  # the noise is recorded once, apart from the run settings
    assert s["dataset"]["first_index"] == 100 and s["dataset"]["count"] == 30
    assert not (tmp_path / "r" / "survival.png").exists()


@pytest.mark.parametrize("args,code,match", [
    (["evaluate", "{model}", "--dataset", "sample", "--pixels", "0", "--out", "{out}"], 2,
     "pixels must be an integer >= 1 or a share of the image such as 3.5%; got 0"),
    (["evaluate", "{model}", "--dataset", "sample", "--pixels", "785", "--out", "{out}"], 2,
     r"pixels must be an integer in \[1, 784\] for 28x28 images; got 785"),
    (["evaluate", "{model}", "--dataset", "sample", "--max-steps", "0", "--out", "{out}"], 2,
     "max_steps must be an integer in \\[1, "),
    (["evaluate", "{model}", "--dataset", "sample", "--low", "1", "--high", "0", "--out", "{out}"], 2,
     "finite low < high"),
    (["evaluate", "{model}", "--dataset", "sample", "--limit", "9999", "--out", "{out}"], 2,
     "limit 9999 is beyond the dataset"),
    (["evaluate", "{model}", "--dataset", "sample", "--range", "x", "--out", "{out}"], 2,
     "an index range is START:STOP"),
    (["evaluate", "{model}", "--dataset", "sample", "--mean", "a", "--std", "1", "--out", "{out}"], 2,
     "--mean takes comma-separated numbers"),
    (["evaluate", "{model}", "--dataset", "sample", "--batch-size", "0", "--out", "{out}"], 2,
     "batch_size must be an integer >= 1"),
    (["evaluate", "{model}", "--dataset", "sample", "--scheme", "gauss", "--out", "{out}"], 2,
     "Invalid value for '--scheme'"),
    (["evaluate", "{model}", "--out", "{out}"], 2, "Missing option '--dataset'"),
    (["frobnicate"], 2, "No such command 'frobnicate'"),
    (["evaluate", "{tmp}/missing.onnx", "--dataset", "sample", "--out", "{out}"], 3, "model file not found"),
    (["evaluate", "{models[five_classes]}", "--dataset", "sample", "--out", "{out}"], 3,
     "outputs 5 classes but the labels need 10"),
    (["evaluate", "{models[two_inputs]}", "--dataset", "sample", "--out", "{out}"], 3, "has 2 inputs"),
    (["evaluate", "{models[size_8x8]}", "--dataset", "sample", "--out", "{out}"], 3, "does not fit the data"),
    (["evaluate", "{models[not_onnx]}", "--dataset", "sample", "--out", "{out}"], 3, "not an ONNX model"),
    (["evaluate", "{model}", "--dataset", "mnist:test", "--data-dir", "{tmp}/none", "--out", "{out}"], 3,
     "--data-dir .*/none: no such folder"),
    (["evaluate", "{model}", "--dataset", "mnist:test", "--data-dir", "{tmp}", "--out", "{out}"], 3,
     "dataset mnist:test not found; looked in"),
    (["evaluate", "{model}", "--dataset", "{tmp}/bad.npz", "--out", "{out}"], 3, "holds pickled objects"),
])
def test_errors_are_one_line_with_exit_code(capsys, tmp_path, bundled_model, models, args, code, match):
    np.savez(tmp_path / "bad.npz", x=np.array([None], dtype=object), y=np.zeros(1, int))
    fmt = {"model": bundled_model, "out": tmp_path / "out", "tmp": tmp_path, "models": models}
    got, stdout, err = run_cli(capsys, *[a.format(**fmt) for a in args])
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrobust: error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_existing_results_need_overwrite(capsys, tmp_path, bundled_model):
    args = ["evaluate", bundled_model, "--dataset", "sample", "--limit", "5", "--max-steps", "2", "--no-report",
            "--out", tmp_path]
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "already holds a run's results" in err and "--overwrite" in err
    assert run_cli(capsys, *args, "--overwrite")[0] == 0


@pytest.mark.slow
def test_non_finite_outputs_warn(capsys, tmp_path, models):
    import numpy as np

    from pyrobust.data.dataset import Dataset
    from tests.builders import save_npz

    zeros = tmp_path / "zeros.npz"
    save_npz(zeros, Dataset("z", None, np.zeros((5, 28, 28, 1), np.uint8), np.zeros(5, np.int64), np.arange(5), "z"))
    code, stdout, err = run_cli(capsys, "evaluate", models["inf_on_one"], "--dataset", zeros, "--scheme",
                                "salt-pepper", "--max-steps", "3", "--no-report", "--out", tmp_path / "r")
    assert code == 0
    assert "warning: 5 image(s) got NaN or infinite model outputs" in err
    assert "non-finite outputs" in stdout
    # every output non-finite: nothing to measure, exit 3 and nothing left behind
    code, stdout, err = run_cli(capsys, "evaluate", models["nan"], "--dataset", "sample", "--limit", "5",
                                "--no-report", "--out", tmp_path / "n")
    assert code == 3 and "every output of the model is NaN or infinite" in err
    assert not any((tmp_path / "n").glob("*.npz")) and not (tmp_path / "n" / "summary.json").exists()


@pytest.mark.slow
def test_internal_errors_are_one_line(capsys, monkeypatch, tmp_path, bundled_model):
    import pyrobust.evaluation

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(pyrobust.evaluation, "evaluate", boom)
    code, _, err = run_cli(capsys, "evaluate", bundled_model, "--dataset", "sample", "--out", tmp_path)
    assert code == 4
    assert err.strip() == ("pyrobust: internal error: RuntimeError: kaput (rerun with --debug for the traceback, "
                           "and report it)")
    code, _, err = run_cli(capsys, "--debug", "evaluate", bundled_model, "--dataset", "sample", "--out",
                           tmp_path / "b")
    assert code == 4 and "Traceback" in err


@pytest.mark.slow
def test_demo_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyrobust", "demo", "--limit", "60", "--out", tmp_path / "demo"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mnist-cnn on sample (60 images)" in proc.stdout
    assert (tmp_path / "demo" / "failure.png").exists()
    again = subprocess.run([sys.executable, "-m", "pyrobust", "demo", "--limit", "60", "--out", tmp_path / "demo"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # the demo replaces its own earlier results


def test_usage_error_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "pyrobust", "evaluate"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pyrobust: error: Missing argument 'MODEL'. (see pyrobust --help)"


@pytest.mark.slow
def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("evaluate", "demo", "train", "replay"))
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and "pyrobust, version 0.1.0" in out


@pytest.mark.slow
def test_progress_bar_when_stderr_is_a_terminal(capsys, monkeypatch, tmp_path, bundled_model):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, stdout, err = run_cli(capsys, "evaluate", bundled_model, "--dataset", "sample", "--limit", "20",
                                "--max-steps", "5", "--no-report", "--out", tmp_path)
    assert code == 0, err
    assert "robust, of all images" in stdout  # results on stdout; the bar went to stderr
    assert "robust" not in err


@pytest.mark.slow
def test_progress_lines_in_a_log_and_quiet(capsys, tmp_path, bundled_model, monkeypatch):
    """stderr is not a terminal here (as in CI): plain progress lines with images, rate and ETA; --quiet: none."""
    monkeypatch.setenv("PYROBUST_PROGRESS_SECONDS", "0")
    args = ["evaluate", bundled_model, "--dataset", "sample", "--limit", "40", "--max-steps", "5", "--batch-size", "8",
            "--sessions", "1", "--no-report"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "a")
    lines = [line for line in err.splitlines() if line.startswith("evaluating: ")]
    assert code == 0 and len(lines) >= 3, err
    pattern = r"evaluating: \d+/40 images \(\d+%\), [\d,]+ inferences/s, elapsed \d+s, ETA \d+s"
    assert any(re.search(pattern, line) for line in lines), lines
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "b", "--quiet")
    assert code == 0 and "evaluating:" not in err
    monkeypatch.setenv("PYROBUST_PROGRESS_SECONDS", "3600")
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "c")
    assert code == 0 and "evaluating:" not in err  # a run shorter than the interval prints no progress line


def test_the_package_face_and_help_are_cheap():
    """`import pyrobust` and `pyrobust --help` load none of the heavy libraries (README: --help in about 0.25 s)."""
    code = ("import sys, pyrobust, pyrobust.cli; "
            "from pyrobust.cli import main; rc = main(['--help']); "
            "heavy = [m for m in ('numpy', 'numba', 'onnxruntime', 'matplotlib', 'scipy', 'torch') "
            "if m in sys.modules]; "
            "print(rc, heavy, pyrobust.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 [] 0.1.0"
    # and the lazy names resolve to the real objects
    import pyrobust
    from pyrobust.evaluation import evaluate

    assert pyrobust.evaluate is evaluate and "evaluate" in dir(pyrobust) and pyrobust.errors.PyRobustError
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pyrobust.nothing  # noqa: B018
