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
def _record_kernel(preds, rows, row_steps, slot_label, slot_step, slot_pos, max_steps,
                   clean_prediction, first_failure, failure_label, finished):
    """Record the outcome of one batch.

    ``preds[j]`` is the prediction for slot ``rows[j]`` at step ``row_steps[j]`` (0 = clean); the slot holds the
    image at position ``slot_pos[r]`` of the result arrays. One slot may have several rows (step packing), in
    increasing step order. The first prediction that differs from ``slot_label`` ends the image at that step (later
    rows of the same slot are ignored: they are steps the image never reaches); an image that survives ``max_steps``
    ends robust (its arrays keep ``ROBUST``); otherwise the slot's next step is one past its last row.
    ``finished[r]`` (bool, per slot) says whether slot ``r`` is free again. Each slot's entries are written only by
    its own rows.
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
            first_failure[pos] = step
            failure_label[pos] = p
            finished[r] = True
        elif step >= max_steps:
            finished[r] = True
        else:
            slot_step[r] = step + 1


def record_batch(preds, rows, *, slot_label, slot_step, slot_pos, max_steps, clean_prediction, first_failure,
                 failure_label, row_steps=None, finished=None) -> np.ndarray:
    """Driver of :func:`_record_kernel`; all arrays are updated in place. ``row_steps`` defaults to each row's slot
    step. Returns ``finished`` (bool, one per slot; only the entries of ``rows`` are meaningful)."""
    m = rows.shape[0]
    if preds.shape[0] < m:
        raise ValueError(f"need {m} predictions; got {preds.shape[0]}")
    rsteps = np.ascontiguousarray(slot_step[rows]) if row_steps is None else row_steps
    if rsteps.shape[0] != m:
        raise ValueError(f"row_steps must have one step per row ({m}); got {rsteps.shape[0]}")
    if finished is None:
        finished = np.zeros(slot_step.shape[0], dtype=np.bool_)
    _record_kernel(preds, rows, rsteps, slot_label, slot_step, slot_pos, int(max_steps),
                   clean_prediction, first_failure, failure_label, finished)
    return finished
