"""Files pyrobust writes or reads inside an output folder: never through a symbolic link, never a FIFO, never a
predictable temporary name; an earlier run's results are replaced only once the new run has succeeded."""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.errors import DataError, Interrupted, OutputError
from pyrobust.results import load_results

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
    from pyrobust import distributed

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
