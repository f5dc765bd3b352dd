"""One run path: the CLI's options are the dataclasses' fields, evaluate and gate share the plan and its options,
the noise is recorded once, and records read back are typed and compared in one place."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest

import pyrobust
from pyrobust.cli import cli, config_keys, main
from pyrobust.engine.plan import RunOptions
from pyrobust.errors import InvalidInput, ResumeMismatch
from pyrobust.gate.policy import GatePolicy
from pyrobust.gate.run import run_gate
from pyrobust.types import NoiseSpec, RunRecord, differences, fingerprint

FAST = dict(limit=60, max_steps=20, batch_size=64, sessions=1)


def _options(command: str) -> set[str]:
    return {p.name for p in cli.commands[command].params}


@pytest.mark.parametrize("command", ["evaluate", "gate", "reproduce"])
def test_every_protocol_command_has_every_noise_field(command):
    assert {f.name for f in fields(NoiseSpec) if not f.metadata.get("derived")} <= _options(command)


def test_evaluate_and_gate_have_every_run_option():
    run = {f.name for f in fields(RunOptions)}
    assert run <= _options("evaluate")
    assert run - {"checkpoint_every"} <= _options("gate")  # a gate writes no run folder to checkpoint


@pytest.mark.slow
def test_gate_config_keys_follow_the_command_options(capsys, tmp_path, bundled_model):
    keys = config_keys(cli.commands["gate"])
    assert {"sessions", "max_memory", "custom_ops", "chunk_size", "scheduler", "range", "early_stop",
            "no_early_stop"} <= set(keys)
    assert not {"config", "quiet", "timeout"} & set(keys)
    cfg = tmp_path / "gate.toml"
    cfg.write_text('[gate]\ndataset = "sample"\nlimit = 60\nmin-robust = "10%"\nmax_steps = 20\nsessions = 1\n'
                   f'max-memory = 4000\nchunk-size = 16\nout = "{tmp_path / "g"}"\n')
    assert main(["gate", str(bundled_model), "--config", str(cfg), "--quiet"]) == 0
    settings = json.loads((tmp_path / "g" / "gate.json").read_text())["settings"]
    assert settings["chunk_size"] == 16 and settings["parallel"]["sessions"] == 1


@pytest.mark.slow
def test_the_gate_runs_on_parallel_sessions_with_the_same_numbers(bundled_model):
    policy = GatePolicy(min_robust=0.2, early_stop=False)
    one = run_gate(bundled_model, "sample", policy=policy, **FAST)
    two = run_gate(bundled_model, "sample", policy=policy, **{**FAST, "sessions": 2, "threads": 2})
    assert [(c.value, c.interval, c.verdict) for c in one.checks] == [(c.value, c.interval, c.verdict)
                                                                      for c in two.checks]
    assert two.settings["parallel"]["sessions"] == 2


@pytest.mark.slow
def test_a_gate_with_a_custom_op_model_gets_advice_it_can_follow(capsys, models):
    code = main(["gate", str(models["custom_domain"]), "--dataset", "sample", "--min-robust", "0.5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "--custom-ops" in err
    assert "--custom-ops" in _gate_help(capsys)


def _gate_help(capsys) -> str:
    main(["gate", "--help"])
    return capsys.readouterr().out


def test_noise_given_once_or_field_by_field(bundled_model):
    a = pyrobust.evaluate(bundled_model, "sample", noise=NoiseSpec(pixels=10, max_steps=20, seed=3), limit=60,
                          batch_size=64, sessions=1)
    b = pyrobust.evaluate(bundled_model, "sample", noise=NoiseSpec(pixels=99), pixels=10, max_steps=20, seed=3,
                          limit=60, batch_size=64, sessions=1)
    assert a.noise == b.noise == NoiseSpec(pixels=10, max_steps=20, seed=3, pixel_range=1)  # resolved: [0, 1]
    assert np.array_equal(a.first_failure, b.first_failure)
    assert a.summary["noise"] == a.noise.to_dict() and "pixels" not in a.summary["settings"]
    with pytest.raises(InvalidInput, match="unknown setting.*pixles.*noise settings are pixels"):
        pyrobust.evaluate(bundled_model, "sample", pixles=3)


def test_results_of_schema_1_still_read(tmp_path, bundled_model):
    out = tmp_path / "r"
    ev = pyrobust.evaluate(bundled_model, "sample", out=out, report=False, **FAST)
    s = json.loads((out / "summary.json").read_text())
    s["schema_version"] = 1
    s["settings"] = {**s.pop("noise"), **s["settings"]}  # how pyrobust wrote it before the noise block
    (out / "summary.json").write_text(json.dumps(s))
    record = pyrobust.load_results(out)
    assert isinstance(record, RunRecord) and record.noise == ev.noise
    outcome, summary = record  # still unpacks as before
    assert np.array_equal(outcome.first_failure, ev.first_failure) and summary["schema_version"] == 1
    assert record.fingerprint == fingerprint(model_sha256=ev.summary["model"]["sha256"],
                                             dataset_sha256=ev.summary["dataset"]["sha256"], count=60,
                                             spec=ev.noise.to_dict())


def test_differences_names_each_field():
    a = fingerprint(model_sha256="a" * 64, dataset_sha256="d" * 64, count=10, spec=NoiseSpec().to_dict())
    b = fingerprint(model_sha256="b" * 64, dataset_sha256="d" * 64, count=10, spec=NoiseSpec(pixels=5).to_dict())
    assert differences(a, b) == ["the model changed (SHA-256 aaaaaaaaaaaa… → bbbbbbbbbbbb…)", "pixels 28 → 5"]
    assert differences(a, b, compare=("data", "noise")) == ["pixels 28 → 5"]
    assert differences(a, a) == []


def test_resuming_another_run_is_a_resume_mismatch(tmp_path, bundled_model):
    out = tmp_path / "r"
    with pytest.raises(pyrobust.errors.Interrupted):
        pyrobust.evaluate(bundled_model, "sample", out=out, progress=_stop, **FAST)
    with pytest.raises(ResumeMismatch, match=r"cannot resume the run in .*: max_steps 20 → 21.*overwrite=True"):
        pyrobust.evaluate(bundled_model, "sample", out=out, resume=True, **{**FAST, "max_steps": 21})


def _stop(done, total, inferences):
    raise KeyboardInterrupt
