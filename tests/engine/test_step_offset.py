"""``step_offset``: a later block of the same (seed, image, step) draws. Blocks of a run counted one after another
add up to the counts of the whole run, whatever the noise, layout or parallel layout, and replay finds each
block's failures where the block saw them."""

from __future__ import annotations

import numpy as np
import pytest

import pyrobust
from pyrobust.errors import InvalidInput
from pyrobust.types import NoiseSpec


@pytest.mark.parametrize("noise", [None, "gaussian:sigma=0.5", "patch:size=10,fill=random"])
def test_blocks_of_steps_add_up_to_the_whole_run(bundled_model, sample, noise):
    ds = sample.select(limit=60)
    whole = pyrobust.evaluate(bundled_model, ds, noise=noise, max_steps=30, count_failures=True, sessions=1,
                              report=False).outcome
    parts = [pyrobust.evaluate(bundled_model, ds, noise=noise, max_steps=m, step_offset=o, count_failures=True,
                               report=False, **kw).outcome
             for o, m, kw in ((0, 10, {"sessions": 1}), (10, 5, {"sessions": 2, "batch_size": 7}),
                              (15, 15, {"sessions": 1, "batch_size": 33}))]
    assert whole.failures is not None and whole.failures.sum() > 0
    assert np.array_equal(sum(p.failures for p in parts), whole.failures)
    # the first failure of a later block is the whole run's when the earlier blocks saw none
    first = whole.first_failure
    late = (parts[0].failures == 0) & (parts[1].failures == 0) & (parts[2].first_failure > 0)
    assert late.any() or noise is None
    assert np.array_equal(parts[2].first_failure[late] + 15, first[late])


def test_a_block_replays_at_its_own_steps(bundled_model, tmp_path):
    out = tmp_path / "r"
    ev = pyrobust.evaluate(bundled_model, "sample", noise="gaussian:sigma=0.6", max_steps=20, step_offset=40,
                           limit=30, out=out, report=False, sessions=1)
    assert ev.summary["noise"]["step_offset"] == 40
    fooled = np.flatnonzero(ev.outcome.first_failure > 0)
    assert fooled.size
    i = int(ev.outcome.index[fooled[0]])
    r = pyrobust.replay(out, index=i)
    assert r.step == int(ev.outcome.first_failure[fooled[0]]) and r.prediction != r.label
    plain = pyrobust.evaluate(bundled_model, "sample", noise="gaussian:sigma=0.6", max_steps=20, limit=30,
                              report=False, sessions=1)
    assert "step_offset" not in plain.summary["noise"]  # old records stay as they were
    assert not np.array_equal(plain.outcome.first_failure, ev.outcome.first_failure)


@pytest.mark.parametrize("kwargs,match", [
    ({"step_offset": -1}, "step_offset must be an integer"),
    ({"step_offset": 5, "mode": "cumulative"}, "the random walk's steps build on each other"),
    ({"step_offset": 5, "corruption": "contrast"}, "a severity sweep's steps are its severities"),
])
def test_an_offset_that_cannot_apply_is_refused(kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        NoiseSpec(**kwargs)
