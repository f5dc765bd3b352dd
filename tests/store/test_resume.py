"""Interrupted runs: SIGKILL at several points, Ctrl-C and SIGTERM, then --resume; results bit-identical to an
uninterrupted run. Resumes with other settings, model or data are refused; two runs cannot share a folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.errors import InvalidInput, OutputError
from pyrobust.store.results import load_results
from pyrobust.store.rundir import RunLock, load_checkpoint
from pyrobust.types import Outcome

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier

SETTINGS = ["--max-steps", "150", "--seed", "3", "--batch-size", "64", "--no-report"]


@pytest.fixture(scope="module")
def reference(bundled_model):
    """The uninterrupted run."""
    return pyrobust.evaluate(bundled_model, "sample", max_steps=150, seed=3).outcome


def _start(bundled_model, out, *extra):
    """A real ``pyrobust evaluate`` process; its stderr goes to a file beside ``out`` (``proc.err()`` reads it)."""
    log = out.parent / f"{out.name}.stderr.{time.monotonic_ns()}"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pyrobust", "evaluate", str(bundled_model), "--dataset",
                                 "sample", *SETTINGS, "--checkpoint-every", "0.02", "--out", str(out), *extra],
                                stdout=subprocess.DEVNULL, stderr=fh)
    proc.err = log.read_text
    return proc


def _done_in_checkpoint(out) -> int:
    try:
        with np.load(out / "checkpoint.npz", allow_pickle=False) as z:
            return int(z["done"].sum())
    except (OSError, ValueError, KeyError):
        return -1


def _wait_until(proc, out, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {at_least} images were checkpointed: {proc.err()}")
        done = _done_in_checkpoint(out)
        if done >= at_least:
            return done
        time.sleep(0.005)
    pytest.fail("timed out waiting for a checkpoint")


def _assert_same(out, reference: Outcome):
    outcome, summary = load_results(out)
    for name in Outcome.ARRAYS:
        assert np.array_equal(getattr(outcome, name), getattr(reference, name)), name
    return summary


@pytest.mark.parametrize("kill_points", [(1,), (120,), (380,), (60, 300)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, bundled_model, reference, kill_points, capsys):
    out = tmp_path / "run"
    for point in kill_points:
        proc = _start(bundled_model, out, *(["--resume"] if (out / "checkpoint.npz").exists() else []))
        seen = _wait_until(proc, out, point)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert seen < 500 and not (out / "summary.json").exists()
    # an unfinished run is refused without --resume, and says how to continue
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", *SETTINGS, "--out", str(out)]) == 2
    assert "unfinished run (checkpoint.npz)" in capsys.readouterr().err
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", *SETTINGS, "--out", str(out),
                 "--resume"]) == 0
    assert "resumed the run" in capsys.readouterr().err
    summary = _assert_same(out, reference)
    assert summary["settings"]["resumed_sessions"] == len(kill_points) + 1
    assert not (out / "checkpoint.npz").exists()


def _interrupted(bundled_model, out, sig, attempts: int = 4):
    """A run stopped by ``sig`` once 100 images are checkpointed. On a loaded machine the run can finish between
    the check and the signal (a race of the test, not a fault of the run: it then exits 0 with complete results);
    that attempt is set aside and the run started again in a fresh folder."""
    for attempt in range(attempts):
        folder = out.with_name(f"{out.name}-{attempt}")
        proc = _start(bundled_model, folder)
        _wait_until(proc, folder, 100)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        if proc.returncode == 0 and (folder / "results.npz").is_file() and not (folder / "checkpoint.npz").exists():
            continue
        return proc, folder
    pytest.fail(f"the run finished before the signal in each of {attempts} attempts")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_cleanly(tmp_path, bundled_model, reference, sig):
    proc, out = _interrupted(bundled_model, tmp_path / "run", sig)
    err = proc.err()
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert re_match(r"pyrobust: error: interrupted after \d+ of 500 images; checkpoint saved in .*: run the same "
                    r"command with --resume to continue", line), err
    assert "Traceback" not in err
    saved = _done_in_checkpoint(out)
    assert 100 <= saved < 500
    proc = _start(bundled_model, out, "--resume")
    assert proc.wait(timeout=120) == 0, proc.err()
    _assert_same(out, reference)


def re_match(pattern, text):
    import re

    return re.fullmatch(pattern, text) is not None


def test_resume_refuses_other_settings_model_or_data(tmp_path, bundled_model, models, capsys):
    out = tmp_path / "run"
    proc = _start(bundled_model, out)
    _wait_until(proc, out, 50)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    base = ["evaluate", str(bundled_model), "--dataset", "sample", *SETTINGS, "--out", str(out), "--resume"]
    for args, match in [
        (base + ["--pixels", "10"], "cannot resume the run in .*: pixels 28 → 10"),
        (base + ["--seed", "4"], "seed 3 → 4"),
        (base + ["--scheme", "salt-pepper"], "scheme 'uniform' → 'salt-pepper'"),
        (base + ["--limit", "400"], "the data changed"),
        (["evaluate", str(models["linear_nchw"]), *base[2:]], "the model changed"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert re_match(f"pyrobust: error: .*{match}.*", err.strip()), err
    with pytest.raises(InvalidInput, match="Resume with the same model, data and settings, or pass overwrite=True"):
        pyrobust.evaluate(bundled_model, "sample", max_steps=149, seed=3, out=out, resume=True)
    # batch size and threads are free to change on resume
    assert main(base[:-1] + ["--batch-size", "17", "--threads", "1", "--resume"]) == 0


def test_resume_of_a_finished_run_does_nothing(tmp_path, bundled_model, capsys):
    args = ["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "20", "--max-steps", "5", "--out",
            str(tmp_path)]
    assert main(args) == 0
    before = (tmp_path / "results.npz").stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert "already holds the finished run" in capsys.readouterr().err
    assert (tmp_path / "results.npz").stat().st_mtime_ns == before
    assert main(args[:-4] + ["--max-steps", "6", "--out", str(tmp_path), "--resume"]) == 2
    assert "holds a finished run of another model, data or settings" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_starts_fresh(tmp_path, bundled_model):
    ev = pyrobust.evaluate(bundled_model, "sample", limit=10, max_steps=3, out=tmp_path, resume=True)
    assert not ev.resumed and (tmp_path / "summary.json").exists()


def test_a_second_run_on_the_same_folder_refuses(tmp_path, bundled_model, capsys):
    tmp_path.mkdir(exist_ok=True)
    with RunLock(tmp_path):
        with pytest.raises(OutputError, match=r"another pyrobust run \(pid \d+\) is writing there"):
            pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2, out=tmp_path)
        assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "5", "--out",
                     str(tmp_path)]) == 2
        assert "another pyrobust run" in capsys.readouterr().err
    # a real second process, while the first is running
    out = tmp_path / "two"
    first = _start(bundled_model, out)
    _wait_until(first, out, 1)
    second = subprocess.run([sys.executable, "-m", "pyrobust", "evaluate", str(bundled_model), "--dataset", "sample",
                             "--out", str(out), "--resume"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "another pyrobust run" in second.stderr
    assert first.wait(timeout=120) == 0
    assert (out / "summary.json").exists()


def test_corrupt_checkpoint(tmp_path, bundled_model):
    (tmp_path / "checkpoint.npz").write_bytes(b"garbage")
    with pytest.raises(pyrobust.DataError, match="unreadable checkpoint"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2, out=tmp_path, resume=True)
    ev = pyrobust.evaluate(bundled_model, "sample", limit=5, max_steps=2, out=tmp_path, overwrite=True)
    assert ev.outcome.n == 5


def test_checkpoint_roundtrip_in_process(tmp_path, bundled_model, reference):
    """A KeyboardInterrupt raised from inside the engine leaves a checkpoint that resumes to the same results."""
    from pyrobust.types import fingerprint

    calls = {"n": 0}

    def interrupt(done, total, inferences):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt

    with pytest.raises(pyrobust.PyRobustError, match="interrupted after"):
        pyrobust.evaluate(bundled_model, "sample", max_steps=150, seed=3, out=tmp_path, progress=interrupt,
                          batch_size=32, sessions=1)
    ds = pyrobust.load_dataset("sample")
    m = pyrobust.engine.runtime.OnnxModel(bundled_model)
    fp = fingerprint(model_sha256=m.sha256, dataset_sha256=ds.sha256, count=ds.n,
                     spec=pyrobust.NoiseSpec(max_steps=150, seed=3).to_dict())
    state = load_checkpoint(tmp_path, fp)
    assert 0 < state.n_done < 500 and state.sessions == 1
    done = state.done
    assert np.array_equal(state.first_failure[done], reference.first_failure[done])
    ev = pyrobust.evaluate(bundled_model, "sample", max_steps=150, seed=3, out=tmp_path, resume=True)
    assert ev.resumed
    _assert_same(tmp_path, reference)


def test_parallel_sessions_interrupt_and_resume(tmp_path, bundled_model, reference):
    """Ctrl-C while several sessions work: the checkpoint holds the finished shards; resume is bit-identical."""
    calls = {"n": 0}

    def interrupt(done, total, inferences):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(pyrobust.PyRobustError, match="interrupted after"):
        pyrobust.evaluate(bundled_model, "sample", max_steps=150, seed=3, out=tmp_path, progress=interrupt,
                          sessions=2, threads=2, shard_size=40)
    ev = pyrobust.evaluate(bundled_model, "sample", max_steps=150, seed=3, out=tmp_path, resume=True, sessions=2,
                           threads=2, shard_size=64)
    assert ev.resumed and ev.summary["settings"]["parallel"]["sessions"] == 2
    _assert_same(tmp_path, reference)
