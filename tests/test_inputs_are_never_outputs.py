"""An input is never an output: every command refuses, before any work, an output that is one of its inputs by
path, symbolic link or hard link (exit 2, the input untouched)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pyrobust.cli import main
from pyrobust.files import file_sha256
from tests.builders import save_npz, synthetic

RUN = ["--limit", "10", "--max-steps", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, bundled_model, sample):
    d = tmp_path_factory.mktemp("io")
    model = d / "model.onnx"
    shutil.copy(bundled_model, model)
    config = d / "gate.toml"
    config.write_text('[gate]\ndataset = "sample"\nmin_robust = "10%"\nmax_steps = 2\nlimit = 10\n')
    data = d / "train.npz"
    save_npz(data, synthetic(n=30, label=[k % 10 for k in range(30)]))
    results = d / "results"
    assert main(["evaluate", str(model), "--dataset", str(data), "--max-steps", "2", "--no-report",
                 "--out", str(results)]) == 0
    return {"model": model, "config": config, "data": data, "results": results}


def _same_as(kind: str, target: Path, tmp_path: Path) -> Path:
    if kind == "path":
        return target
    link = tmp_path / f"{kind}-{target.name}"
    if kind == "symlink":
        link.symlink_to(target)
    else:
        os.link(target, link)
    return link


def _refused(capsys, args, protected: Path):
    before = file_sha256(protected)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "would overwrite" in err and "an input is never an output" in err, err
    assert file_sha256(protected) == before


KINDS = ["path", "symlink", "hardlink"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_gate_reports_never_replace_the_model_or_config(capsys, tmp_path, files, kind, monkeypatch):
    m, cfg = files["model"], files["config"]
    _refused(capsys, ["gate", m, "--config", cfg, "--junit", _same_as(kind, m, tmp_path)], m)
    _refused(capsys, ["gate", m, "--config", cfg, "--summary", _same_as(kind, cfg, tmp_path)], cfg)
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(_same_as(kind, m, tmp_path / "env")))
    _refused(capsys, ["gate", m, "--config", cfg], m)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_select_never_replaces_its_own_dataset(capsys, tmp_path, files, kind):
    _refused(capsys, ["select", files["results"], "--per-class", "1", "--allow-test-split",
                      "--out", _same_as(kind, files["data"], tmp_path)], files["data"])


def test_evaluate_never_writes_over_a_model_in_its_folder(capsys, tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    named = out / "summary.json"
    shutil.copy(files["model"], named)
    _refused(capsys, ["evaluate", named, "--dataset", "sample", *RUN, "--out", out], named)


@pytest.mark.slow
def test_replay_never_replaces_its_model(capsys, tmp_path, files):
    r = files["results"]
    _refused(capsys, ["replay", r, "--index", "0", "--step", "1", "--model", files["model"],
                      "--out", files["model"]], files["model"])
    _refused(capsys, ["replay", r, "--index", "0", "--step", "1", "--model", files["model"],
                      "--out", _same_as("symlink", files["model"], tmp_path)], files["model"])


@pytest.mark.slow
@pytest.mark.torch
def test_train_and_retrain_never_replace_their_inputs(capsys, tmp_path, files):
    pytest.importorskip("torch")
    _refused(capsys, ["train", "--dataset", files["data"], "--epochs", "1", "--out", files["data"]], files["data"])
    subset = tmp_path / "subset.npz"
    shutil.copy(files["data"], subset)
    _refused(capsys, ["retrain", subset, "--like", files["model"], "--out", files["model"]], files["model"])
    _refused(capsys, ["retrain", subset, "--like", files["model"], "--out", _same_as("hardlink", subset, tmp_path)],
             subset)


@pytest.mark.slow
def test_distinct_outputs_still_work(capsys, tmp_path, files):
    code = main(["gate", str(files["model"]), "--config", str(files["config"]), "--junit", str(tmp_path / "j.xml"),
                 "--summary", str(tmp_path / "s.md")])
    assert code in (0, 1), capsys.readouterr().err
    assert (tmp_path / "j.xml").exists() and (tmp_path / "s.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_compare_and_agreement_never_write_over_a_results_file(capsys, tmp_path, files, kind):
    r = files["results"]
    for command, name in (("compare", "compare.json"), ("agreement", "agreement.json")):
        out = tmp_path / command
        out.mkdir()
        target = r / "summary.json"
        if kind == "symlink":
            (out / name).symlink_to(target)
        else:
            os.link(target, out / name)
        copy = tmp_path / f"{command}-copy"
        shutil.copytree(r, copy)
        _refused(capsys, [command, r, copy, "--out", out], target)
