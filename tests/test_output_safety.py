"""Files pyrobust writes or reads inside an output folder: never through a symbolic link, never a FIFO, never a
predictable temporary name; an earlier run's results are replaced only once the new run has succeeded."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.errors import DataError, Interrupted, OutputError
from pyrobust.store.results import load_results

FAST = dict(limit=20, max_steps=3, report=False)


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path, bundled_model, capsys):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".pyrobust.lock").symlink_to(outside)
    with pytest.raises(OutputError, match="is a symbolic link"):
        pyrobust.evaluate(bundled_model, "sample", out=out, **FAST)
    assert outside.read_text() == "keep me\n"
    (out / ".pyrobust.lock").unlink()
    (out / ".pyrobust.lock").symlink_to(tmp_path / "created-elsewhere")  # a dangling link: nothing gets created
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "5", "--max-steps", "2",
                 "--out", str(out)]) == 2
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "created-elsewhere").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["summary.json", "results.npz"])
def test_results_read_back_never_follow_links(tmp_path, bundled_model, name):
    run = tmp_path / "run"
    pyrobust.evaluate(bundled_model, "sample", out=run, **FAST)
    load_results(run)
    real = tmp_path / name
    (run / name).rename(real)
    (run / name).symlink_to(real)
    with pytest.raises(DataError, match="symbolic link"):
        load_results(run)


@pytest.mark.slow
def test_a_fifo_in_a_run_folder_does_not_hang(tmp_path, bundled_model, capsys):
    run = tmp_path / "run"
    pyrobust.evaluate(bundled_model, "sample", out=run, **FAST)
    (run / "summary.json").unlink()
    os.mkfifo(run / "summary.json")
    with pytest.raises(DataError, match="not a regular file"):
        load_results(run)
    assert main(["replay", str(run), "--index", "0"]) == 3
    assert "not a regular file" in capsys.readouterr().err


def test_a_symlinked_checkpoint_is_refused_on_resume(tmp_path, bundled_model):
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        def stop(done, total, inferences):
            raise KeyboardInterrupt

        pyrobust.evaluate(bundled_model, "sample", out=out, progress=stop, batch_size=4, sessions=1, **FAST)
    real = tmp_path / "elsewhere.npz"
    (out / "checkpoint.npz").rename(real)
    (out / "checkpoint.npz").symlink_to(real)
    with pytest.raises(DataError, match="symbolic link"):
        pyrobust.evaluate(bundled_model, "sample", out=out, resume=True, **FAST)


def test_dask_workers_write_the_model_to_a_private_file_and_remove_it(tmp_path, monkeypatch, bundled_model):
    from pyrobust.engine import dask as distributed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = bundled_model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    planted = tmp_path / f"pyrobust-model-{sha}.onnx"  # the name the old code used
    victim = tmp_path / "victim.txt"
    victim.write_text("do not overwrite\n")
    planted.symlink_to(victim)
    monkeypatch.setattr(distributed, "_SESSIONS", {})
    m = distributed._worker_model(data, sha, 1)
    assert m.sha256 == sha and victim.read_text() == "do not overwrite\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([planted.name, "victim.txt"])  # nothing left behind
    assert m.session.get_inputs()[0].name == m.input.name  # the session lives on without its file


def _interrupt(done, total, inferences):
    raise KeyboardInterrupt


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run_only_at_the_end(tmp_path, bundled_model, models):
    out = tmp_path / "out"
    old = pyrobust.evaluate(models["linear_nchw"], "sample", out=out, **FAST)
    before = {f: (out / f).read_bytes() for f in ("summary.json", "results.npz")}
    with pytest.raises(Interrupted):
        pyrobust.evaluate(bundled_model, "sample", out=out, overwrite=True, progress=_interrupt, batch_size=4,
                          sessions=1, **FAST)
    assert {f: (out / f).read_bytes() for f in before} == before  # the earlier run is intact
    assert load_results(out)[1]["model"]["sha256"] == old.summary["model"]["sha256"]
    with pytest.raises(OutputError, match=r"an unfinished run \(checkpoint.npz\) beside an earlier run's results.*"
                                          "resume=True"):
        pyrobust.evaluate(bundled_model, "sample", out=out, **FAST)
    new = pyrobust.evaluate(bundled_model, "sample", out=out, resume=True, **FAST)
    assert new.resumed and load_results(out)[1]["model"]["sha256"] == new.summary["model"]["sha256"]
    assert not (out / "checkpoint.npz").exists()


@pytest.mark.slow
def test_results_are_saved_before_the_figures(tmp_path, monkeypatch, bundled_model, capsys):
    import pyrobust.evaluation as evaluation

    def interrupted_report(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "write_report", interrupted_report)
    out = tmp_path / "out"
    with pytest.raises(Interrupted, match="interrupted while drawing the figures; the results are saved"):
        pyrobust.evaluate(bundled_model, "sample", out=out, limit=20, max_steps=3)
    outcome, summary = load_results(out)
    assert outcome.n == 20 and not (out / "checkpoint.npz").exists()


@pytest.mark.slow
def test_demo_replaces_only_an_earlier_demo(tmp_path, models, bundled_model, capsys):
    out = tmp_path / "d"
    assert main(["demo", "--out", str(out), "--limit", "10"]) == 0
    assert main(["demo", "--out", str(out), "--limit", "10"]) == 0  # an earlier demo: replaced
    other = tmp_path / "other"
    pyrobust.evaluate(models["linear_nchw"], "sample", out=other, **FAST)
    before = (other / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--out", str(other), "--limit", "10"]) == 2
    assert "not a pyrobust demo" in capsys.readouterr().err and (other / "summary.json").read_bytes() == before
    unfinished = tmp_path / "unfinished"
    with pytest.raises(Interrupted):
        pyrobust.evaluate(models["linear_nchw"], "sample", out=unfinished, progress=_interrupt, batch_size=4,
                          sessions=1, **FAST)
    assert main(["demo", "--out", str(unfinished), "--limit", "10"]) == 2
    assert (unfinished / "checkpoint.npz").exists()
    assert main(["demo", "--out", str(other), "--limit", "10", "--overwrite"]) == 0
    assert load_results(other)[1]["dataset"]["spec"] == "sample"


@pytest.mark.slow
def test_no_lock_file_is_left_behind_and_a_second_run_is_still_refused(tmp_path, bundled_model):
    from pyrobust.store.rundir import RunLock

    out = tmp_path / "out"
    pyrobust.evaluate(bundled_model, "sample", out=out, **FAST)
    assert not (out / ".pyrobust.lock").exists()
    with RunLock(out):
        assert (out / ".pyrobust.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=r"another pyrobust run \(pid \d+\) is writing there"):
            pyrobust.evaluate(bundled_model, "sample", out=out, overwrite=True, **FAST)
    assert not (out / ".pyrobust.lock").exists()


def test_a_crafted_checkpoint_is_refused(tmp_path, bundled_model):
    import io
    import json as _json

    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        pyrobust.evaluate(bundled_model, "sample", out=out, progress=_interrupt, batch_size=4, sessions=1, **FAST)
    with np.load(out / "checkpoint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["first_failure"] = arrays["first_failure"].copy()
    arrays["first_failure"][0] = 10_000  # beyond max_steps (3)
    arrays["done"] = arrays["done"].copy()
    arrays["done"][0] = True
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (out / "checkpoint.npz").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"steps outside \[-1, 3\]"):
        pyrobust.evaluate(bundled_model, "sample", out=out, resume=True, **FAST)
    meta = _json.loads(arrays["meta"].tobytes().decode())
    meta["inferences"] = -7
    arrays["meta"] = np.frombuffer(_json.dumps(meta).encode(), np.uint8)
    arrays["first_failure"][0] = -1
    np.savez(out / "checkpoint.npz", **arrays)
    with pytest.raises(DataError, match="malformed counters"):
        pyrobust.evaluate(bundled_model, "sample", out=out, resume=True, **FAST)


@pytest.mark.slow
def test_an_error_mid_run_leaves_a_resumable_checkpoint_or_nothing(tmp_path, bundled_model, monkeypatch):
    import pyrobust.engine.runtime as runtime
    from pyrobust.errors import ModelError

    calls = {"n": 0}
    real = runtime.BoundModel._run_once

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] > limit:
            raise ModelError("onnxruntime failed to run the model (simulated)")
        return real(self, x)

    monkeypatch.setattr(runtime.BoundModel, "_run_once", flaky)
    limit = 1  # fails at once (the first call is the probe): nothing finished, nothing left behind
    with pytest.raises(ModelError, match="simulated"):
        pyrobust.evaluate(bundled_model, "sample", out=tmp_path / "a", batch_size=4, sessions=1, **FAST)
    assert not (tmp_path / "a" / "checkpoint.npz").exists()
    calls["n"], limit = 0, 20  # fails after some images finished: they are saved, and the message says so
    with pytest.raises(ModelError, match=r"images finished before it are saved in .*run it again with resume=True"):
        pyrobust.evaluate(bundled_model, "sample", out=tmp_path / "b", batch_size=4, sessions=1, **FAST)
    assert (tmp_path / "b" / "checkpoint.npz").exists()
    monkeypatch.setattr(runtime.BoundModel, "_run_once", real)
    ev = pyrobust.evaluate(bundled_model, "sample", out=tmp_path / "b", resume=True, **FAST)
    assert ev.resumed and ev.outcome.n == 20


@pytest.mark.slow
def test_a_full_disk_at_the_end_is_an_output_error_with_nothing_half_written(tmp_path):
    """A 120 KiB file system fills while the figures are drawn: exit 2 and one line, every file there is whole
    (results first, then figures), no temporary file left behind."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m to mount a small file system (CI runs as root, where it works)")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=120k tmpfs {disk} && {sys.executable} -m pyrobust evaluate "
              f"pyrobust/assets/mnist-cnn.onnx --dataset sample --max-steps 5 --out {disk}/run; rc=$?; "
              f"ls -a {disk}/run; python3 -c 'import numpy, sys; numpy.load(sys.argv[1])' {disk}/run/results.npz "
              "&& echo results-ok; exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2, r.stderr
    assert "No space left on device" in r.stderr and "every file already in the output is complete" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    listed = r.stdout.split()
    assert "results.npz" in listed and "summary.json" in listed and "results-ok" in listed
    assert not [n for n in listed if n.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_planted_where_a_run_writes_a_file_is_refused_before_work(tmp_path, bundled_model, capsys, flags):
    from pyrobust.cli import main

    out = tmp_path / "run"
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "20", "--max-steps", "2",
                 "--no-report", "--out", str(out)]) == 0
    (out / "checkpoint.npz").mkdir()
    capsys.readouterr()
    code = main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "20", "--max-steps", "2",
                 "--no-report", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code in (2, 3) and "internal error" not in err, err
    if flags == ["--overwrite"]:
        assert code == 2 and "is a folder where pyrobust writes a file" in err
