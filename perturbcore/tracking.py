"""Turn model outputs into predictions and record each image's first-failure step.

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
def _record_kernel(preds, rows, slot_label, slot_step, slot_pos, max_steps,
                   clean_prediction, first_failure, failure_label, done):
    """Record the outcome of one batch.

    ``preds[j]`` is the prediction for slot ``rows[j]``, which holds the image at position ``slot_pos[r]`` of the
    result arrays, at step ``slot_step[r]`` (0 = clean). A prediction that differs from ``slot_label`` ends the image
    at that step; an image that survives ``max_steps`` ends robust (its arrays keep ``ROBUST``); otherwise the slot
    moves on to the next step. ``done[j]`` says whether slot ``rows[j]`` is free again. Each slot is listed once, so
    each iteration writes its own result entries.
    """
    for j in range(rows.shape[0]):
        r = rows[j]
        pos = slot_pos[r]
        step = slot_step[r]
        p = preds[j]
        if step == 0:
            clean_prediction[pos] = p
        if p != slot_label[r]:
            first_failure[pos] = step
            failure_label[pos] = p
            done[j] = True
        elif step >= max_steps:
            done[j] = True
        else:
            slot_step[r] = step + 1
            done[j] = False


def record_batch(preds, rows, *, slot_label, slot_step, slot_pos, max_steps,
                 clean_prediction, first_failure, failure_label, done=None) -> np.ndarray:
    """Driver of :func:`_record_kernel`; all arrays are updated in place. Returns the ``done`` flags (bool (m,))."""
    m = rows.shape[0]
    if preds.shape[0] < m:
        raise ValueError(f"need {m} predictions; got {preds.shape[0]}")
    if done is None:
        done = np.empty(m, dtype=np.bool_)
    _record_kernel(preds, rows, slot_label, slot_step, slot_pos, int(max_steps),
                   clean_prediction, first_failure, failure_label, done)
    return done[:m]
