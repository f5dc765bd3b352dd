"""Severity at failure: each image's reported level is where its counted failure probability first exceeds q on the
ladder (checked by running those levels again), the same whatever the batch, and bad requests are refused."""

from __future__ import annotations

import numpy as np
import pytest

import pyrobust
from pyrobust.errors import InvalidInput
from pyrobust.profiles import failure_severity

KW = dict(limit=40, max_steps=30, sessions=1)


@pytest.mark.parametrize("family", ["gaussian", "patch"])
def test_each_severity_is_where_the_failure_probability_crosses_q(bundled_model, sample, family):
    r = failure_severity(bundled_model, "sample", family=family, q=0.1, batch_size=64, **KW)
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
    again = failure_severity(bundled_model, "sample", family=family, q=0.1, batch_size=7, **KW)
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
])
def test_bad_requests_are_refused(bundled_model, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        failure_severity(bundled_model, "sample", limit=5, max_steps=2, **kwargs)
