"""Turn model outputs into predictions and clean margins, and record each image's first-failure step (and, when
counting, its number of failing steps).

Sentinels (shared with ``pyrobust.types``):

* ``ROBUST = -1``: first-failure step of an image never fooled within the step budget; also its failure label.
* ``0`` as a first-failure step: the model was wrong on the clean image, which was never perturbed.
* ``NONFINITE = -2``: the prediction when the model's output row held a NaN or an infinity. It never equals a
  label, so it counts as a failure, and it is recorded with its own code rather than as a class.
"""

from __future__ import annotations

import numpy as np

from perturbcore._jit import kernel

ROBUST = -1
NONFINITE = -2


@kernel
def _argmax_kernel(scores, out):
    """Row-wise argmax of ``scores`` (float, (m, K)) into ``out`` (int32, (>= m,)); ``NONFINITE`` for a row
    holding a NaN or an infinity. Ties go to the lowest class, as ``numpy.argmax``."""
    for i in range(scores.shape[0]):
        best = 0
        best_v = scores[i, 0]
        finite = np.isfinite(best_v)
        for k in range(1, scores.shape[1]):
            v = scores[i, k]
            if not np.isfinite(v):
                finite = False
            elif v > best_v:
                best_v = v
                best = k
        out[i] = best if finite else NONFINITE


def predict(scores: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Predicted class of each row of ``scores`` (m, K); ``NONFINITE`` (-2) where a row is not all finite."""
    s = np.ascontiguousarray(scores)
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"scores must have shape (m, K) with K >= 1; got {s.shape}")
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32)
    if out is None:
        out = np.empty(s.shape[0], dtype=np.int32)
    _argmax_kernel(s, out)
    return out[: s.shape[0]]


@kernel
def _margin_kernel(scores, labels, out):
    """Clean margin of each row: the score of its label minus the best other score (negative: wrong; NaN for a row
    holding a NaN or an infinity; +inf for a single-class model, which cannot be wrong)."""
    for i in range(scores.shape[0]):
        y = labels[i]
        own = scores[i, y]
        best = -np.inf
        finite = np.isfinite(own)
        for k in range(scores.shape[1]):
            v = scores[i, k]
            if not np.isfinite(v):
                finite = False
            elif k != y and v > best:
                best = v
        out[i] = (own - best) if finite else np.nan


def clean_margin(scores: np.ndarray, labels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``scores`` (m, K): the score of ``labels[i]`` minus the best other class's score (float64;
    positive exactly when the row's prediction is right and untied, NaN where the row is not all finite)."""
    s = np.ascontiguousarray(scores)
    y = np.ascontiguousarray(labels, dtype=np.int64)
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"scores must have shape (m, K) with K >= 1; got {s.shape}")
    if y.shape != (s.shape[0],):
        raise ValueError(f"need one label per row ({s.shape[0]}); got {y.shape[0] if y.ndim else 0}")
    if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"labels must be classes in [0, {s.shape[1] - 1}]")
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32)
    if out is None:
        out = np.empty(s.shape[0], dtype=np.float64)
    _margin_kernel(s, y, out)
    return out[: s.shape[0]]


@kernel
def _record_kernel(preds, rows, row_steps, slot_label, slot_step, slot_pos, max_steps, count,
                   clean_prediction, first_failure, failure_label, failures, finished):
    """Record the outcome of one batch.

    ``preds[j]`` is the prediction for slot ``rows[j]`` at step ``row_steps[j]`` (0 = clean); the slot holds the
    image at position ``slot_pos[r]`` of the result arrays. One slot may have several rows (step packing), in
    increasing step order. A wrong clean prediction ends the image at step 0. Otherwise:

    * first-failure protocol (``count`` false): the first prediction that differs from ``slot_label`` ends the
      image at that step (later rows of the same slot are ignored: they are steps the image never reaches);
    * failure counting (``count`` true): every step runs; each wrong prediction adds one to ``failures[pos]``, and
      the first of them sets ``first_failure`` and ``failure_label`` (the engine resets the three when it admits an
      image, so an image run again after an interruption counts from zero).

    An image that reaches ``max_steps`` ends (robust when never fooled: its arrays keep ``ROBUST``); otherwise the
    slot's next step is one past its last row. ``finished[r]`` (bool, per slot) says whether slot ``r`` is free
    again. Each slot's entries are written only by its own rows.
    """
    for j in range(rows.shape[0]):
        finished[rows[j]] = False
    for j in range(rows.shape[0]):
        r = rows[j]
        if finished[r]:
            continue
        pos = slot_pos[r]
        step = row_steps[j]
        p = preds[j]
        if step == 0:
            clean_prediction[pos] = p
        if p != slot_label[r]:
            if step == 0 or not count:
                first_failure[pos] = step
                failure_label[pos] = p
                finished[r] = True
                continue
            if failures[pos] == 0:
                first_failure[pos] = step
                failure_label[pos] = p
            failures[pos] += 1
        if step >= max_steps:
            finished[r] = True
        else:
            slot_step[r] = step + 1


_NO_COUNTS = np.zeros(0, np.int32)


def record_batch(preds, rows, *, slot_label, slot_step, slot_pos, max_steps, clean_prediction, first_failure,
                 failure_label, failures=None, row_steps=None, finished=None) -> np.ndarray:
    """Driver of :func:`_record_kernel`; all arrays are updated in place. ``row_steps`` defaults to each row's slot
    step. ``failures`` (int32, one per image): count every failing step into it instead of stopping at the first.
    Returns ``finished`` (bool, one per slot; only the entries of ``rows`` are meaningful)."""
    m = rows.shape[0]
    if preds.shape[0] < m:
        raise ValueError(f"need {m} predictions; got {preds.shape[0]}")
    rsteps = np.ascontiguousarray(slot_step[rows]) if row_steps is None else row_steps
    if rsteps.shape[0] != m:
        raise ValueError(f"row_steps must have one step per row ({m}); got {rsteps.shape[0]}")
    if failures is not None and failures.shape[0] != first_failure.shape[0]:
        raise ValueError(f"failures must have one count per image ({first_failure.shape[0]}); got "
                         f"{failures.shape[0]}")
    if finished is None:
        finished = np.zeros(slot_step.shape[0], dtype=np.bool_)
    _record_kernel(preds, rows, rsteps, slot_label, slot_step, slot_pos, int(max_steps), failures is not None,
                   clean_prediction, first_failure, failure_label,
                   _NO_COUNTS if failures is None else failures, finished)
    return finished
