"""``pyrobust compare``: two runs image by image, what became fragile or robust, per class, and which runs cannot
be compared."""

from __future__ import annotations

import json

import pytest

from pyrobust.cli import main


@pytest.mark.slow
def test_compare(capsys, tmp_path, bundled_model, regressed, shared_data):
    for name, model in (("a", bundled_model), ("b", regressed)):
        assert main(["evaluate", str(model), "--dataset", "mnist:test", "--data-dir", str(shared_data), "--limit",
                     "1000", "--max-steps", "30", "--no-report", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "diff")]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "diff" / "compare.json").read_text())
    assert rep["newly_fragile"]["count"] > rep["newly_robust"]["count"]
    assert rep["robust"]["change"] < 0 and rep["robust"]["lost"] == rep["newly_fragile"]["count"]
    assert sum(r["newly_fragile"] for r in rep["per_class"]) == rep["newly_fragile"]["count"]
    assert f"newly fragile {rep['newly_fragile']['count']}" in out
    assert (tmp_path / "diff" / "compare.md").read_text().startswith("# pyrobust compare")
    assert (tmp_path / "diff" / "survival_compare.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(regressed), "--dataset", "mnist:test", "--data-dir", str(shared_data), "--limit",
                 "1000", "--max-steps", "30", "--seed", "1", "--no-report", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "cannot be compared image by image: seed 0 → 1" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 3
