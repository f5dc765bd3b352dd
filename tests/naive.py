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


# --- noise families (perturbcore.families), on whole images in their own units -------------------------------------

def draws(seed: int, index: int, step: int, counters) -> np.ndarray:
    """The raw 64-bit draws of one (seed, index, step) stream at ``counters``, vectorised in numpy's wrapping
    uint64 arithmetic (the stream key in Python integers, as :func:`random_u64`)."""
    key = mix64(mix64(mix64(seed + GOLDEN) ^ ((index + GOLDEN) & MASK)) ^ ((step + GOLDEN) & MASK))
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.asarray(counters, np.uint64) + np.uint64(1)) * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed, index, step, count, base=0) -> np.ndarray:
    """Uniforms 0..count-1 in (0, 1): uniform ``e`` is half of draw ``base + e // 2`` (high 32 bits for even e)."""
    e = np.arange(count)
    u = draws(seed, index, step, base + e // 2)
    half = np.where(e % 2 == 0, u >> np.uint64(32), u & np.uint64(0xFFFFFFFF))
    return (half.astype(np.float64) + 0.5) / 2.0**32


def normals(u) -> np.ndarray:
    import statistics

    q = statistics.NormalDist().inv_cdf
    return np.array([q(float(v)) for v in np.ravel(u)]).reshape(np.shape(u))


def family_image(name, params, img, *, seed, index, step, top=1.0, integer=False):
    """The family ``name`` (params: its parameters as a dict, in [0, 1] units) at one step of one image: ``img`` is
    float32 (H, W, C) in [0, top]; the result too. Written from each family's docstring, sharing no code with it."""
    h, w, c = img.shape
    x = np.asarray(img, np.float64)
    if step == 0:
        return np.array(img, np.float32)
    n = h * w * c

    def finish(v):
        v = np.clip(v, 0.0, top)
        return np.rint(v).astype(np.float32) if integer else v.astype(np.float32)

    if name == "gaussian":
        return finish(x + params["sigma"] * top * normals(uniforms(seed, index, step, n)).reshape(h, w, c))
    if name == "uniform":
        return finish(x + params["eps"] * top * (2 * uniforms(seed, index, step, n).reshape(h, w, c) - 1))
    if name == "speckle":
        return finish(x + x * params["sigma"] * normals(uniforms(seed, index, step, n)).reshape(h, w, c))
    if name == "l2":
        z = normals(uniforms(seed, index, step, n))
        radius = params["eps"] * top
        if params.get("shape", "sphere") == "ball":
            radius *= uniforms(seed, index, step, 1, base=(n + 1) // 2 + 1)[0] ** (1 / n)
        return finish(x + (radius * z / np.linalg.norm(z)).reshape(h, w, c))
    if name == "shot":
        from scipy.stats import poisson

        lam = params["photons"]
        k = poisson.ppf(uniforms(seed, index, step, n).reshape(h, w, c), lam * np.clip(x, 0, top) / top)
        return finish(k / lam * top)
    out = np.array(x)
    if name in ("impulse", "dropout"):
        u = uniforms(seed, index, step, h * w).reshape(h, w)
        if name == "impulse":
            d = params["density"]
            out[u < d / 2] = 0.0
            out[(u >= d / 2) & (u < d)] = top
        else:
            out[u < params["rate"]] = params.get("value", 0.0) * top
        return finish(out)
    if name == "patch":
        s = params["size"]
        y0 = int(draws(seed, index, step, [0])[0] % np.uint64(h - s + 1))
        x0 = int(draws(seed, index, step, [1])[0] % np.uint64(w - s + 1))
        if params.get("fill", "constant") == "random":
            u = uniforms(seed, index, step, s * s * c, base=2).reshape(s, s, c)
            out[y0:y0 + s, x0:x0 + s] = np.floor(u * (top + 1)) if integer else u * top
        else:
            out[y0:y0 + s, x0:x0 + s] = params.get("value", 0.0) * top
        res = np.array(img, np.float32)
        res[y0:y0 + s, x0:x0 + s] = finish(out[y0:y0 + s, x0:x0 + s])
        return res
    if name == "translate":
        d = params["shift"]
        side = 2 * d + 1
        shifts = [(dy, dx) for dy in range(-d, d + 1) for dx in range(-d, d + 1) if (dy, dx) != (0, 0)]
        dy, dx = shifts[int(draws(seed, index, step, [0])[0] % np.uint64(side * side - 1))]
        res = np.full((h, w, c), np.float32(finish(np.array(params.get("value", 0.0) * top))))
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        res[yd, xd] = np.asarray(img, np.float32)[ys, xs]
        return res
    if name == "dihedral":
        k = int(draws(seed, index, step, [0])[0] % np.uint64(3 if params.get("group", "flips") == "flips" else 7))
        ops = [lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1], lambda a: a.transpose(1, 0, 2),
               lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 2).transpose(1, 0, 2)]
        return np.ascontiguousarray(ops[k](np.asarray(img, np.float32)))
    if name == "rotate":
        from scipy.ndimage import map_coordinates

        t = np.deg2rad(params["degrees"] * (2 * uniforms(seed, index, step, 1)[0] - 1))
        cy, cx = (h - 1) / 2, (w - 1) / 2
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        sy = cy + (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        sx = cx - (yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        value = params.get("value", 0.0) * top
        res = np.stack([map_coordinates(x[..., ch], [sy, sx], order=1, mode="grid-constant", cval=value)
                        for ch in range(c)], axis=-1)
        return finish(res)
    raise ValueError(name)


def family_protocol(predict_one, images, labels, indices, *, name, params, seed, max_steps, top=1.0,
                    integer=False, count=False):
    """The first-failure protocol (``count``: every step counted) under a noise family, one image and one step at a
    time. Returns (clean_prediction, first_failure, failure_label, failures)."""
    n = len(labels)
    clean = np.empty(n, np.int64)
    first = np.full(n, -1, np.int64)
    fail = np.full(n, -1, np.int64)
    failures = np.zeros(n, np.int64)
    for i in range(n):
        x0 = np.asarray(images[i], np.float32)
        clean[i] = predict_one(x0)
        if clean[i] != labels[i]:
            first[i], fail[i] = 0, clean[i]
            continue
        for s in range(1, max_steps + 1):
            p = predict_one(family_image(name, params, x0, seed=seed, index=int(indices[i]), step=s, top=top,
                                         integer=integer))
            if p != labels[i]:
                if failures[i] == 0:
                    first[i], fail[i] = s, p
                failures[i] += 1
                if not count:
                    break
    return clean, first, fail, failures


def sweep_image(name, img, severity, *, top=1.0, integer=False, angle=0.0):
    """A severity sweep (perturbcore.families' deterministic corruptions) at one severity of one image (H, W, C) in
    [0, top], from scipy, matplotlib and Pillow; shares no code with the kernels except the ladders and the blur
    kernels' shapes, which are the specification."""
    from perturbcore.families import FAMILIES
    from perturbcore.families._sweep import disk, motion_line

    h, w, c = img.shape
    fam = FAMILIES[name]() if name != "motion-blur" else FAMILIES[name](angle=angle)
    level = fam.levels(img.shape)[severity - 1]
    x = np.asarray(img, np.float64)

    def finish(v):
        v = np.clip(v, 0.0, top)
        return (np.rint(v) if integer else v).astype(np.float32)

    if name == "gaussian-blur":
        from scipy.ndimage import gaussian_filter

        return finish(np.stack([gaussian_filter(x[..., ch], level[0], mode="nearest", truncate=4.0)
                                for ch in range(c)], axis=-1))
    if name in ("defocus-blur", "motion-blur"):
        from scipy.ndimage import correlate

        k = disk(*level) if name == "defocus-blur" else motion_line(level[0], level[1], angle)
        return finish(np.stack([correlate(x[..., ch], k, mode="nearest") for ch in range(c)], axis=-1))
    if name == "contrast":
        m = x.mean(axis=(0, 1), keepdims=True)
        return finish((x - m) * level[0] + m)
    if name == "quantize":
        q = 2.0 ** level[0] - 1
        return finish(np.floor(np.clip(x / top, 0, 1) * q + 0.5) / q * top)
    if name in ("brightness", "saturate"):
        from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

        if c == 1:
            return finish(np.clip(x / top + level[0], 0, 1) * top)
        hsv = rgb_to_hsv(x / top)
        if name == "brightness":
            hsv[..., 2] = np.clip(hsv[..., 2] + level[0], 0, 1)
        else:
            hsv[..., 1] = np.clip(hsv[..., 1] * level[0] + level[1], 0, 1)
        return finish(hsv_to_rgb(hsv) * top)
    if name == "pixelate":
        from PIL import Image

        sh, sw = max(1, round(h * level[0])), max(1, round(w * level[0]))
        chans = []
        for ch in range(c):
            pic = Image.fromarray(x[..., ch].astype(np.float32), mode="F")
            chans.append(np.asarray(pic.resize((sw, sh), Image.BOX).resize((w, h), Image.NEAREST), np.float64))
        return finish(np.stack(chans, axis=-1))
    if name == "jpeg":
        import io

        from PIL import Image

        pixels = np.rint(np.clip(x / top, 0, 1) * 255).astype(np.uint8)
        pic = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
        buf = io.BytesIO()
        pic.save(buf, format="JPEG", quality=int(level[0]))
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float64).reshape(h, w, c)
        return finish(back / 255 * top)
    raise ValueError(name)
