"""The gate under a noise family: from the command line and from a TOML config, recorded in gate.json, and a
baseline run under another noise refused."""

from __future__ import annotations

import json

from pyrobust.cli import main


def test_the_gate_checks_a_family_from_the_cli_and_from_toml(bundled_model, tmp_path, capsys):
    args = ["gate", str(bundled_model), "--dataset", "sample", "--limit", "120", "--max-steps", "20",
            "--sessions", "1"]
    code = main([*args, "--noise", "gaussian:sigma=0.3", "--min-robust", "20%", "--out", str(tmp_path / "a")])
    assert code == 0 and "gate PASS" in capsys.readouterr().out
    g = json.loads((tmp_path / "a" / "gate.json").read_text())
    assert g["settings"]["noise"]["corruption"] == "gaussian:sigma=0.3"
    config = tmp_path / "gate.toml"
    config.write_text('[gate]\nnoise = "patch:size=12,fill=random"\nmin_robust = "99%"\n')
    code = main([*args, "--config", str(config), "--out", str(tmp_path / "b")])
    assert code == 1 and "gate FAIL" in capsys.readouterr().out
    g = json.loads((tmp_path / "b" / "gate.json").read_text())
    assert g["settings"]["noise"]["corruption"] == "patch:size=12,fill=random,value=0"
    config.write_text('[gate]\nnoise = "patch:size=99"\nmin_robust = "99%"\n')
    code = main([*args, "--config", str(config), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "patch: size must be an integer in [1, 28] for 28x28 images; got 99" in err
