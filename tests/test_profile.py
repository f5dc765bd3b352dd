"""The robustness profile: every (family, level) run is the evaluation it claims to be, its summary is computed from
those runs, its files are written and read back, and bad requests are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.errors import DataError, InvalidInput
from pyrobust.profiles import PROFILE_FILES, profile

FAST = dict(limit=60, max_steps=15, sessions=1, batch_size=64)
FAMS = ["gaussian", "patch:fill=random", "contrast", "dihedral"]


@pytest.fixture(scope="module")
def prof(tmp_path_factory, bundled_model):
    out = tmp_path_factory.mktemp("profile") / "p"
    return out, profile(bundled_model, "sample", families=FAMS, out=out, **FAST)


def test_each_entry_is_the_evaluation_it_names(prof, bundled_model):
    _, p = prof
    assert p.families == ["gaussian", "patch", "contrast", "dihedral"]
    assert [e["level"] for e in p.entries if e["family"] == "gaussian"] == [1, 2, 3, 4, 5]
    g3 = next(e for e in p.entries if e["family"] == "gaussian" and e["level"] == 3)
    assert g3["noise"] == "gaussian:sigma=0.08" and g3["setting"] == "sigma=0.08"
    ev = pyrobust.evaluate(bundled_model, "sample", noise=g3["noise"], **FAST)
    assert g3["robust"] == int(ev.outcome.robust.sum()) and g3["images"] == 60
    # patch sizes scale with the 28-pixel side: 2, 4, 6, 8, 10 at 32 → 2, 4, 5, 7, 9
    assert [e["setting"] for e in p.entries if e["family"] == "patch"] == [f"size={s}" for s in (2, 4, 5, 7, 9)]
    sweep = pyrobust.evaluate(bundled_model, "sample", noise="contrast", **{k: v for k, v in FAST.items()
                                                                            if k != "max_steps"})
    curve = sweep.summary["survival"]["fraction"]
    assert [e["robust_fraction"] for e in p.entries if e["family"] == "contrast"] == pytest.approx(curve[1:])
    assert len([e for e in p.entries if e["family"] == "dihedral"]) == 1  # no severity: one level


def test_the_summary_is_computed_from_the_entries(prof):
    _, p = prof
    errors = [e["error"] for e in p.entries]
    assert p.summary["mean_error"] == pytest.approx(np.mean(errors))
    for fam in p.families:
        rows = [e for e in p.entries if e["family"] == fam]
        assert p.summary["per_family"][fam]["sum_error"] == pytest.approx(sum(e["error"] for e in rows))
    for e in p.entries:
        lo, hi = e["interval"]
        assert lo <= e["robust_fraction"] <= hi and e["error"] == pytest.approx(1 - e["robust_fraction"])
    assert p.robust("patch")[0] >= p.robust("patch")[-1]  # larger patches fool more
    with pytest.raises(InvalidInput, match="this profile has no 'rotate'"):
        p.robust("rotate")


def test_the_files_are_written_and_hold_the_same_profile(prof):
    out, p = prof
    for f in PROFILE_FILES:
        assert (out / f).is_file()
    data = json.loads((out / "profile.json").read_text())
    assert data["entries"] == p.entries and data["summary"]["mean_error"] == p.summary["mean_error"]
    html = (out / "profile.html").read_text()
    assert html.count("<tr>") == len(p.entries) + 1 and "data:image/png;base64," in html
    assert "| patch | 5 | size=9 |" in (out / "profile.md").read_text()
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert p._repr_png_()[:4] == b"\x89PNG"


def test_families_that_cannot_apply_are_left_out_of_the_defaults_and_said(bundled_model):
    p = profile(bundled_model, "sample", limit=20, max_steps=2, sessions=1)
    assert "saturate" not in p.families and len(p.families) == len(pyrobust_families()) - 1
    assert p.summary["skipped"] == [{"family": "saturate",
                                     "why": "saturate changes colours: it needs RGB images; these have 1 channel(s)"}]


def pyrobust_families():
    from perturbcore.families import FAMILIES

    return FAMILIES


def test_a_baseline_gives_the_relative_mce(prof, bundled_model, tmp_path):
    out, p = prof
    other = profile(bundled_model, "sample", families=["gaussian", "patch:fill=random"], baseline=out,
                    seed=1, **FAST)
    r = other.summary["relative_mce"]
    want = [other.summary["per_family"][f]["sum_error"] / p.summary["per_family"][f]["sum_error"]
            for f in ("gaussian", "patch")]
    assert r["value"] == pytest.approx(np.mean(want)) and set(r["per_family"]) == {"gaussian", "patch"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "model": {}, "summary": {"per_family": {"x": {"sum_error": 9}}}}))
    with pytest.raises(DataError, match="not a profile.json pyrobust 1 wrote"):
        profile(bundled_model, "sample", families=["gaussian"], baseline=bad, **FAST)
    bad.write_text("{")
    with pytest.raises(DataError, match="not a profile.json"):
        profile(bundled_model, "sample", families=["gaussian"], baseline=bad, **FAST)
    with pytest.raises(InvalidInput, match="shares no family"):
        profile(bundled_model, "sample", families=["rotate"], baseline=out, **FAST)


@pytest.mark.parametrize("kwargs,match", [
    ({"families": ["gaussian", "gaussian:sigma=0.2"]}, "gaussian listed twice"),
    ({"families": ["fog"]}, "unknown noise family 'fog'"),
    ({"families": ["saturate"]}, r"saturate changes colours.*\(drop saturate from the families\)"),
    ({"families": ["gaussian"], "noise": "patch"}, "noise= does not apply to a profile"),
    ({"families": ["gaussian"], "pixels": 3}, "pixels= does not apply to a profile"),
    ({"families": []}, "a profile needs at least one family"),
])
def test_bad_requests_are_refused(bundled_model, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        profile(bundled_model, "sample", limit=5, max_steps=2, **kwargs)


def test_an_existing_profile_is_kept_unless_overwritten(prof, bundled_model):
    out, _ = prof
    before = (out / "profile.json").read_bytes()
    with pytest.raises(InvalidInput, match="already holds a profile .*overwrite=True"):
        profile(bundled_model, "sample", families=["contrast"], out=out, limit=5)
    assert (out / "profile.json").read_bytes() == before


def test_the_cli_prints_the_table_and_refuses_bad_families(bundled_model, tmp_path, capsys):
    code = main(["profile", str(bundled_model), "--limit", "30", "--max-steps", "5", "--family", "gaussian",
                 "--family", "jpeg", "--out", str(tmp_path / "p"), "--sessions", "1"])
    out = capsys.readouterr()
    assert code == 0 and "gaussian" in out.out and "jpeg" in out.out and "mean error" in out.out
    assert "profile: 6/6 runs done (jpeg)" in out.err
    code = main(["profile", str(bundled_model), "--family", "gaussian:sigma=2", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and "gaussian: sigma must be a number in (0, 1]" in err and "Traceback" not in err
    assert main(["families"]) == 0 and "gaussian-blur" in capsys.readouterr().out
    assert main(["families", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in rows} == {"random", "sweep"}


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="the RGB model is exported from torch (pip install pyrobust[train])")
    from pyrobust.training import export_onnx

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(128, 10)).eval()
    path = tmp_path_factory.mktemp("rgb") / "rgb32.onnx"
    export_onnx(net, (32, 32, 3), path)
    x = np.random.default_rng(1).random((40, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).argmax(1).numpy()
    return path, x, y


def test_a_profile_of_an_rgb_32x32_model_runs_every_family(rgb32, tmp_path):
    path, x, y = rgb32
    p = profile(path, x, y, max_steps=4, out=tmp_path / "p", sessions=1, batch_size=64)
    assert len(p.families) == len(pyrobust_families()) and not p.summary["skipped"]
    assert p.accuracy["fraction"] == 1.0
    assert [e["setting"] for e in p.entries if e["family"] == "translate"] == [f"shift={s}" for s in (1, 2, 3, 4, 6)]
    assert next(e for e in p.entries if e["family"] == "gaussian-blur")["setting"] == "sigma=0.4"
