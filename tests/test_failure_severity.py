"""Severity at failure: each image's reported level is where its counted failure probability first exceeds q on the
ladder (checked by running those levels again), the sequential test at each level matches a naive one built from
plain fixed-budget runs, the result is the same whatever the batch, is saved and read back strictly, compared and
ranked across models, and bad requests are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pyrobust
from pyrobust.errors import InvalidInput
from pyrobust.severity import failure_severity

ROOT = Path(__file__).resolve().parents[1]

KW = dict(limit=40, max_steps=30, sessions=1)


@pytest.mark.parametrize("family", ["gaussian", "patch"])
def test_each_severity_is_where_the_failure_probability_crosses_q(bundled_model, sample, family):
    """With one look the test is the fixed-budget one: every reported level has p-hat > q, every level below it
    tested has p-hat <= q."""
    r = failure_severity(bundled_model, "sample", family=family, q=0.1, batch_size=64, looks=1, **KW)
    assert r.parameter == ("sigma" if family == "gaussian" else "size")
    finite = np.isfinite(r.severity) & (r.severity > 0)
    assert finite.sum() >= 10, "the ladder must reach most images to test anything"
    ds = sample.select(limit=40)
    for value in np.unique(r.severity[finite]):
        pos = np.flatnonzero(r.severity == value)
        spec = f"{family}:{r.parameter}={value:.12g}"
        ev = pyrobust.evaluate(bundled_model, ds.take(pos), noise=spec, max_steps=30, count_failures=True,
                               sessions=1)
        assert np.all(ev.outcome.failures / 30 > 0.1), (spec, ev.outcome.failures)
    for value in np.unique(r.below[np.isfinite(r.below)]):
        pos = np.flatnonzero(r.below == value)
        ev = pyrobust.evaluate(bundled_model, ds.take(pos), noise=f"{family}:{r.parameter}={value:.12g}",
                               max_steps=30, count_failures=True, sessions=1)
        assert np.all(ev.outcome.failures / 30 <= 0.1)
    assert np.all(r.below[finite & np.isfinite(r.below)] < r.severity[finite & np.isfinite(r.below)])
    again = failure_severity(bundled_model, "sample", family=family, q=0.1, batch_size=7, looks=1, **KW)
    assert np.array_equal(again.severity, r.severity) and np.array_equal(again.decided, r.decided)
    d = r.to_dict()
    assert d["within_ladder"] + d["beyond_ladder"] + d["wrong_before_noise"] == 40


def test_a_lower_threshold_gives_lower_severities(bundled_model):
    hi = failure_severity(bundled_model, "sample", family="patch", q=0.3, **KW)
    lo = failure_severity(bundled_model, "sample", family="patch", q=0.05, **KW)
    assert np.all(lo.severity <= hi.severity)


def test_given_levels_are_used_and_checked(bundled_model):
    r = failure_severity(bundled_model, "sample", family="gaussian", levels=[0.2, 0.5, 0.9], limit=20,
                         max_steps=10, sessions=1)
    assert set(np.unique(r.severity)) <= {0.2, 0.5, 0.9, np.inf}
    shot = failure_severity(bundled_model, "sample", family="shot", levels=[50, 5, 1], limit=10, max_steps=5,
                            sessions=1)
    assert shot.levels == (50.0, 5.0, 1.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"family": "contrast"}, "contrast is a severity sweep"),
    ({"family": "dihedral"}, "dihedral has no severity to grow"),
    ({"q": 1.5}, r"q must be a probability"),
    ({"levels": [0.5, 0.2]}, r"levels must be at least two finite values of sigma, each more severe than the last "
                             r"\(increasing\)"),
    ({"levels": [0.5, 2.0]}, r"levels: gaussian: sigma must be a number in \(0, 1\]"),
    ({"family": "shot", "levels": [1, 50]}, r"\(decreasing\)"),
    ({"count_failures": True}, "count_failures= does not apply"),
    ({"step_offset": 3}, "step_offset= does not apply"),
    ({"looks": 0}, "looks must be an integer"),
    ({"family": "nosuch"}, "unknown noise family 'nosuch'"),
])
def test_bad_requests_are_refused(bundled_model, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        failure_severity(bundled_model, "sample", limit=5, max_steps=2, **kwargs)


def naive_sequential_severity(model, ds, family: str, parameter: str, ladder, q, max_steps, looks, confidence):
    """The same search written plainly: each image alone, its counts after each look from a fixed run of that many
    steps (no step offsets), the interval from scipy's beta quantiles."""
    from scipy.stats import beta

    from pyrobust.severity import look_ends

    ends = look_ends(max_steps, looks)
    a = (1 - confidence) / 2 / len(ends)
    counts = {}  # (level, end) -> failures of every image, wrong before noise as -1
    for li, v in enumerate(ladder):
        for e in ends:
            o = pyrobust.evaluate(model, ds, noise=f"{family}:{parameter}={v!r}", max_steps=e, count_failures=True,
                                  sessions=1, report=False).outcome
            counts[li, e] = np.where(o.first_failure == 0, -1, o.failures)
    severity, decided = [], []
    for i in range(ds.n):
        if counts[0, ends[0]][i] < 0:
            severity.append(0.0)
            decided.append(True)
            continue
        lo, hi, ok = -1, len(ladder), True
        while hi - lo > 1:
            mid = (lo + hi) // 2
            for e in ends:
                k = int(counts[mid, e][i])
                low = 0.0 if k == 0 else float(beta.ppf(a, k, e - k + 1))
                high = 1.0 if k == e else float(beta.ppf(1 - a, k + 1, e - k))
                if low > q or high < q:
                    above = low > q
                    break
            else:
                above, ok = k / e > q, False
            lo, hi = (lo, mid) if above else (mid, hi)
        severity.append(float(ladder[hi]) if hi < len(ladder) else np.inf)
        decided.append(ok)
    return np.array(severity), np.array(decided)


@pytest.mark.parametrize("family,parameter,ladder", [("gaussian", "sigma", (0.05, 0.15, 0.3, 0.5, 0.8)),
                                                     ("patch", "size", (2.0, 5.0, 9.0, 14.0, 20.0))])
def test_the_sequential_test_matches_a_naive_one(bundled_model, sample, family, parameter, ladder):
    ds = sample.select(limit=30)
    r = failure_severity(bundled_model, ds, family=family, q=0.15, levels=ladder, max_steps=40, looks=4,
                         sessions=1, batch_size=32)
    sev, dec = naive_sequential_severity(bundled_model, ds, family, parameter, ladder, 0.15, 40, 4, 0.95)
    assert np.array_equal(r.severity, sev) and np.array_equal(r.decided, dec)
    assert r.decided.sum() > 0 and np.isfinite(r.severity).sum() > 5
    fixed = failure_severity(bundled_model, ds, family=family, q=0.15, levels=ladder, max_steps=40, looks=1,
                             sessions=1)
    assert r.inferences < fixed.inferences  # images far from q stop after a look or two


def test_severities_are_saved_and_read_back_strictly(bundled_model, tmp_path):
    import json

    from pyrobust.errors import DataError
    from pyrobust.severity import load_severity

    r = failure_severity(bundled_model, "sample", family="patch", q=0.2, limit=25, max_steps=12, sessions=1)
    r.save(tmp_path / "s")
    back = load_severity(tmp_path / "s")
    for key in ("index", "label", "severity", "below", "decided"):
        assert np.array_equal(getattr(back, key), getattr(r, key), equal_nan=key == "below")
    assert back.to_dict() == r.to_dict() and back.model == r.model and back.dataset == r.dataset
    with pytest.raises(InvalidInput, match="already holds severity.json"):
        r.save(tmp_path / "s")
    r.save(tmp_path / "s", overwrite=True)
    good = json.loads((tmp_path / "s" / "severity.json").read_text())

    def tampered(edit, match):
        d = json.loads(json.dumps(good))
        edit(d)
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / "severity.json").write_text(json.dumps(d))
        with pytest.raises(DataError, match=match):
            load_severity(tmp_path / "t")

    tampered(lambda d: d.update(schema_version=9), "schema_version must be 1")
    tampered(lambda d: d["images"]["severity"].__setitem__(0, 3.5), "not one of its levels")
    tampered(lambda d: d["images"]["index"].__setitem__(1, d["images"]["index"][0]), "must be distinct")
    tampered(lambda d: d["images"]["decided"].pop(), "of one length")
    tampered(lambda d: d["images"]["decided"].__setitem__(0, 1), "decided true or false")
    tampered(lambda d: d["summary"].update(family="contrast"), "malformed .*severity sweep")
    tampered(lambda d: d["summary"].update(q=2), "out of range")
    tampered(lambda d: d["dataset"].update(count=3), "their count")
    tampered(lambda d: d.update(model=None), "model record")
    (tmp_path / "t" / "severity.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_severity(tmp_path / "t")
    (tmp_path / "t" / "severity.json").unlink()
    (tmp_path / "t" / "severity.json").symlink_to(tmp_path / "s" / "severity.json")
    with pytest.raises(DataError):
        load_severity(tmp_path / "t")
    with pytest.raises(DataError, match="holds no severity.json"):
        load_severity(tmp_path)


def test_severities_compare_and_rank_across_models(bundled_model, tmp_path, capsys):
    """Runs of the same images pair image by image (two models: the bundled one and the study's M_R); differing
    settings are refused."""
    from pyrobust.cli import main
    from pyrobust.severity import compare_severities, load_severity, severity_agreement

    args = ["severity", str(bundled_model), "--family", "gaussian", "--levels", "0.1,0.2,0.4,0.7", "--limit", "30",
            "--max-steps", "16", "--sessions", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--q", "30%", "--out", str(tmp_path / "c")]) == 0
    cap = capsys.readouterr()
    assert "median sigma at which p > 0.1" in cap.out
    assert "an image never fooled is shown below q=0.1 only after 49 draws, more than --max-steps 16, so no level" \
        in cap.err
    a, b = load_severity(tmp_path / "a"), load_severity(tmp_path / "b")
    same = compare_severities(a, a)
    assert same["same"] == 30 and same["more_robust"] == same["less_robust"] == 0 and same["sign_test_p"] == 1.0
    with pytest.raises(InvalidInput, match="seed 0 → 1"):
        compare_severities(a, b)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac")]) == 2
    assert "q 0.1 → 0.3" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "aa")]) == 0
    assert "0 images more robust, 0 less, 30 the same" in capsys.readouterr().out
    rep = json.loads((tmp_path / "aa" / "compare.json").read_text())
    assert rep["same"] == 30 and (tmp_path / "aa" / "compare.md").is_file()
    # a looser q fails later: every image's severity under q=30% is at least its severity under q=10%
    c = load_severity(tmp_path / "c")
    assert np.all(c.severity >= a.severity)
    ranked = severity_agreement([a, a], names=["x", "y"])
    assert ranked["pairs"][0]["spearman"] == pytest.approx(1.0)
    other = ROOT / "docs" / "results" / "mnist" / "models" / "M_R.onnx"
    assert main(["severity", str(other), *args[2:], "--out", str(tmp_path / "m")]) == 0
    m = load_severity(tmp_path / "m")
    rep = compare_severities(a, m)
    assert rep["more_robust"] + rep["less_robust"] + rep["same"] == 30 and rep["more_robust"] + rep["less_robust"]
    moved = rep["moved_most"]
    assert moved and all(x["rungs"] != 0 for x in moved)
    assert [abs(x["rungs"]) for x in moved] == sorted((abs(x["rungs"]) for x in moved), reverse=True)
    rho = severity_agreement([a, m])["pairs"][0]
    assert -1 < rho["spearman"] < 1 and rho["interval"][0] < rho["spearman"] < rho["interval"][1]
    assert main(["agreement", str(tmp_path / "a"), str(tmp_path / "a"), "--names", "x,y", "--out",
                 str(tmp_path / "ag")]) == 0
    assert "x – y: Spearman 1.000 over 30 images" in capsys.readouterr().out
    assert main(["agreement", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "cannot be ranked together: seed 0 → 1" in capsys.readouterr().err
    # the output folder is checked before any work
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "already holds severity.json" in capsys.readouterr().err
