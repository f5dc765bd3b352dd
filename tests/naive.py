"""Slow, obviously-right references for every kernel and for the protocol itself.

Written from the specification (README "The protocol"), in plain Python integers and NumPy, sharing no code with
``perturbcore``.
"""

from __future__ import annotations

import math

import numpy as np

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix64(z: int) -> int:
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def random_u64(seed: int, index: int, step: int, counter: int) -> int:
    key = mix64(seed + GOLDEN)
    key = mix64(key ^ ((index + GOLDEN) & MASK))
    key = mix64(key ^ ((step + GOLDEN) & MASK))
    return mix64(key + (counter + 1) * GOLDEN)


def noise_draws(seed, index, step, pixels, n_positions, channels, low, high, scheme, integer=False,
                random_count=False):
    """[(position, [value per channel]), ...] in draw order, values as float32; ``integer``: values uniform over the
    integers low .. high inclusive; ``random_count``: only the first 1 + u % pixels draws, u being the draw at
    counter pixels * (channels + 1)."""
    draws = []
    count = pixels
    if random_count:
        count = 1 + random_u64(seed, index, step, pixels * (channels + 1)) % pixels
    for d in range(count):
        base = d * (channels + 1)
        p = random_u64(seed, index, step, base) % n_positions
        values = []
        for c in range(channels):
            u = random_u64(seed, index, step, base + 1 + c)
            if scheme == "salt-pepper":
                v = np.float32(high) if u >> 63 else np.float32(low)
            elif integer:
                v = np.float32(int(low) + math.floor((int(high) - int(low) + 1) * ((u >> 40) / 2.0**24)))
            else:
                v = np.float32(low + (high - low) * ((u >> 40) / 2.0**24))
                if v >= np.float32(high):
                    v = np.nextafter(np.float32(high), np.float32(-np.inf))
            values.append(v)
        draws.append((p, values))
    return draws


def perturb_image(img, *, seed, index, step, pixels, low=0.0, high=1.0, scheme="uniform", integer=False,
                  random_count=False):
    """img: float32 (H, W, C) in data space -> perturbed copy (H, W, C)."""
    h, w, c = img.shape
    out = np.array(img, dtype=np.float32, copy=True)
    if step == 0:
        return out
    for p, values in noise_draws(seed, index, step, pixels, h * w, c, low, high, scheme, integer, random_count):
        for ch in range(c):
            out[p // w, p % w, ch] = values[ch]
    return out


def protocol(predict_one, images, labels, indices, *, seed, pixels, max_steps, low=0.0, high=1.0,
             scheme="uniform", mode="restart", random_count=False):
    """The paper's protocol, one image and one step at a time.

    ``predict_one(img (H, W, C) float32) -> int`` (negative for a non-finite output).
    Returns (clean_prediction, first_failure, failure_label) as int arrays.
    """
    n = len(labels)
    clean = np.empty(n, np.int64)
    first = np.full(n, -1, np.int64)
    fail = np.full(n, -1, np.int64)
    for i in range(n):
        x0 = np.asarray(images[i], np.float32)
        clean[i] = predict_one(x0)
        if clean[i] != labels[i]:
            first[i], fail[i] = 0, clean[i]
            continue
        current = x0
        for s in range(1, max_steps + 1):
            src = current if mode == "cumulative" else x0
            x = perturb_image(src, seed=seed, index=int(indices[i]), step=s, pixels=pixels, low=low, high=high,
                              scheme=scheme, random_count=random_count)
            current = x
            p = predict_one(x)
            if p != labels[i]:
                first[i], fail[i] = s, p
                break
    return clean, first, fail


def survival(first_failure, max_steps):
    n = len(first_failure)
    return np.array([sum(1 for f in first_failure if f == -1 or f > s) / n for s in range(max_steps + 1)])


def record_batch(preds, rows, row_steps, label, step, pos, max_steps, clean, first, fail, failures=None):
    """The tracking kernel's bookkeeping, one row at a time (``perturbcore.record_batch``); with ``failures``,
    every failing step is counted and only a wrong clean prediction or the budget ends an image."""
    finished = {}
    for p, r, s in zip(preds, rows, row_steps, strict=True):
        if finished.get(r):
            continue
        finished[r] = False
        if s == 0:
            clean[pos[r]] = p
        if p != label[r]:
            if s == 0 or failures is None:
                first[pos[r]], fail[pos[r]] = s, p
                finished[r] = True
                continue
            if failures[pos[r]] == 0:
                first[pos[r]], fail[pos[r]] = s, p
            failures[pos[r]] += 1
        if s >= max_steps:
            finished[r] = True
        else:
            step[r] = s + 1
    return finished


def failure_counts(predict_one, images, labels, indices, *, seed, pixels, max_steps, low=0.0, high=1.0,
                   scheme="uniform"):
    """The counting protocol one image and one step at a time: every step 1..max_steps of a correctly classified
    image is asked of the model. Returns (first_failure, failure_label, failures)."""
    n = len(labels)
    first = np.full(n, -1, np.int64)
    fail = np.full(n, -1, np.int64)
    count = np.zeros(n, np.int64)
    for i in range(n):
        x0 = np.asarray(images[i], np.float32)
        p0 = predict_one(x0)
        if p0 != labels[i]:
            first[i], fail[i] = 0, p0
            continue
        for s in range(1, max_steps + 1):
            p = predict_one(perturb_image(x0, seed=seed, index=int(indices[i]), step=s, pixels=pixels, low=low,
                                          high=high, scheme=scheme))
            if p != labels[i]:
                if count[i] == 0:
                    first[i], fail[i] = s, p
                count[i] += 1
    return first, fail, count


def margin(scores, label):
    """Score of ``label`` minus the best other score, by sorting (NaN for a non-finite row)."""
    row = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(row)):
        return float("nan")
    others = np.delete(row, label)
    return float(row[label] - others.max()) if others.size else float("inf")
