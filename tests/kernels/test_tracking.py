import numpy as np
import pytest

import perturbcore
from perturbcore import NONFINITE, ROBUST
from tests import naive


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_predict_matches_argmax(dtype):
    s = np.random.default_rng(0).normal(size=(50, 10)).astype(dtype)
    assert np.array_equal(perturbcore.predict(s), np.argmax(s, axis=1))


def test_predict_ties_go_to_lowest_class_and_single_class():
    assert perturbcore.predict(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])).tolist() == [1, 0]
    assert perturbcore.predict(np.array([[5.0], [-1.0]])).tolist() == [0, 0]


def test_predict_flags_non_finite_rows():
    s = np.array([[0.0, np.nan, 1.0], [np.inf, 0.0, 0.0], [0.0, -np.inf, 2.0], [1.0, 2.0, 0.0], [np.nan] * 3])
    assert perturbcore.predict(s).tolist() == [NONFINITE, NONFINITE, NONFINITE, 1, NONFINITE]


def test_predict_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"scores must have shape \(m, K\)"):
        perturbcore.predict(np.zeros(5))
    with pytest.raises(ValueError, match=r"scores must have shape \(m, K\) with K >= 1"):
        perturbcore.predict(np.zeros((5, 0)))


@pytest.mark.parametrize("count", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_record_batch_matches_reference(packed, count):
    rng = np.random.default_rng(1)
    slots, n = 40, 100
    label = rng.integers(0, 3, slots)
    step = rng.integers(0, 6, slots)
    pos = rng.permutation(n)[:slots]
    rows = np.sort(rng.permutation(slots)[:30])
    if packed:  # several consecutive steps per slot, ascending, as the engine packs them
        per = rng.integers(1, 4, rows.size)
        row_steps = np.concatenate([step[r] + np.arange(k) for r, k in zip(rows, per, strict=True)])
        rows = np.repeat(rows, per)
    else:
        row_steps = step[rows].copy()
    preds = rng.integers(-2, 3, rows.size).astype(np.int32)
    arrays = [np.full(n, ROBUST, np.int32) for _ in range(3)]
    ref_arrays = [a.copy() for a in arrays]
    ref_step = step.copy()
    failures = np.zeros(n, np.int32) if count else None
    ref_failures = np.zeros(n, np.int64) if count else None
    finished = perturbcore.record_batch(preds, rows, row_steps=row_steps, slot_label=label, slot_step=step,
                                        slot_pos=pos, max_steps=5, clean_prediction=arrays[0],
                                        first_failure=arrays[1], failure_label=arrays[2], failures=failures)
    want = naive.record_batch(preds, rows, row_steps, label, ref_step, pos, 5, *ref_arrays, failures=ref_failures)
    assert {int(r): bool(finished[r]) for r in np.unique(rows)} == want
    assert np.array_equal(step, ref_step)
    for got, ref in zip(arrays, ref_arrays, strict=True):
        assert np.array_equal(got, ref)
    if count:
        assert np.array_equal(failures, ref_failures)
        assert failures.sum() > 0  # the case exercised counting


def test_counting_keeps_going_after_a_failure_and_a_wrong_clean_image_stops():
    z = np.zeros(2, np.int64)
    label = np.array([1, 1])
    step = np.array([0, 0])
    pos = np.array([0, 1])
    arrays = [np.full(2, ROBUST, np.int32) for _ in range(3)]
    failures = np.zeros(2, np.int32)
    # slot 0: clean right, then wrong at 1 and 3 of 4 steps; slot 1: wrong on the clean image
    rows = np.array([0, 0, 0, 0, 0, 1])
    row_steps = np.array([0, 1, 2, 3, 4, 0])
    preds = np.array([1, 2, 1, 0, 1, 0], np.int32)
    fin = perturbcore.record_batch(preds, rows, row_steps=row_steps, slot_label=label, slot_step=step, slot_pos=pos,
                                   max_steps=4, clean_prediction=arrays[0], first_failure=arrays[1],
                                   failure_label=arrays[2], failures=failures)
    assert fin[0] and fin[1]
    assert arrays[1].tolist() == [1, 0] and arrays[2].tolist() == [2, 0]
    assert failures.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"failures must have one count per image \(2\); got 3"):
        perturbcore.record_batch(preds, rows, row_steps=row_steps, slot_label=label, slot_step=z, slot_pos=pos,
                                 max_steps=4, clean_prediction=arrays[0], first_failure=arrays[1],
                                 failure_label=arrays[2], failures=np.zeros(3, np.int32))


def test_clean_margin_matches_reference():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(50, 4)).astype(np.float32)
    scores[3, 2] = np.nan
    scores[7, 0] = np.inf
    labels = rng.integers(0, 4, 50)
    got = perturbcore.clean_margin(scores, labels)
    want = np.array([naive.margin(scores[i], labels[i]) for i in range(50)])
    assert np.allclose(got, want, equal_nan=True)
    assert np.isnan(got[3]) and np.isnan(got[7])
    right = perturbcore.predict(scores) == labels
    assert np.all((got[~np.isnan(got)] > 0) == right[~np.isnan(got)])
    assert perturbcore.clean_margin(np.ones((2, 1)), np.zeros(2, np.int64)).tolist() == [np.inf, np.inf]


def test_clean_margin_rejects_bad_input():
    with pytest.raises(ValueError, match=r"scores must have shape \(m, K\)"):
        perturbcore.clean_margin(np.zeros(3), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"need one label per row \(3\); got 2"):
        perturbcore.clean_margin(np.zeros((3, 2)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 1\]"):
        perturbcore.clean_margin(np.zeros((3, 2)), np.array([0, 2, 1]))


def test_record_batch_needs_enough_predictions():
    z = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="need 3 predictions; got 2"):
        perturbcore.record_batch(np.zeros(2, np.int32), np.arange(3), slot_label=z, slot_step=z, slot_pos=z,
                                 max_steps=1, clean_prediction=z, first_failure=z, failure_label=z)
    with pytest.raises(ValueError, match=r"row_steps must have one step per row \(3\); got 2"):
        perturbcore.record_batch(np.zeros(3, np.int32), np.arange(3), row_steps=np.zeros(2, np.int64),
                                 slot_label=z, slot_step=z, slot_pos=z, max_steps=1, clean_prediction=z,
                                 first_failure=z, failure_label=z)
