"""Severity at failure: each image's robustness as a number in the noise's own units.

For a random family with a severity parameter (``sigma``, ``eps``, patch ``size``, ``shift``, ...), an image's
**severity at failure** is the smallest level of a ladder at which its per-step failure probability exceeds ``q``.
It is found by bisection over the ladder (the probability grows with the severity: the draws are the same at every
level, keyed by seed, image and step), and at each probed level a **sequential test** decides whether the image's
probability lies above or below ``q``:

* the ``max_steps`` probes run in ``looks`` blocks of fresh draws (``step_offset``: block j probes the steps after
  block j-1's, so nothing is run twice and the blocks together are the fixed-``max_steps`` run);
* after each block, the exact (Clopper-Pearson) interval on the failures counted so far, at one-sided level
  ``(1 - confidence) / 2 / looks`` (the error spent equally over the looks), decides the image as soon as it excludes
  ``q``; a decided image runs no more blocks;
* an image still open after the last block is placed by its estimate (failures / max_steps > q) and flagged
  undecided.

So an image whose probability is far from ``q`` costs a block or two, and a wrong side is chosen at a decided level
with chance at most ``(1 - confidence) / 2`` (union bound over the looks).

:func:`failure_severity` returns a :class:`FailureSeverity`, which :meth:`~FailureSeverity.save` writes as
``severity.json`` (read back strictly by :func:`load_severity`); :func:`compare_severities` pairs two models' (or
two runs') severities image by image, :func:`severity_agreement` ranks them across models.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from perturbcore.families import Family, Sweep, parse
from pyrobust.engine.plan import SELECTION_FIELDS, load_data, split_settings
from pyrobust.errors import DataError, InvalidInput
from pyrobust.escape import md_text
from pyrobust.files import make_out_dir, read_bounded, write_bytes_atomic, write_json_atomic
from pyrobust.stats import clopper_pearson

SEVERITY_SCHEMA = 1
SEVERITY_FILES = ("severity.json", "severity.md")
MAX_SEVERITY_BYTES = 256 << 20  # a severity.json of 10 million images is about 400 MB; more is not ours


@dataclass(frozen=True)
class FailureSeverity:
    """Each image's severity at failure (:func:`failure_severity`): the smallest level of ``levels`` at which its
    failure probability exceeds ``q``, in the family's own units (``inf``: not within the ladder; 0: wrong before
    any noise), the largest level tested below it (``below``; NaN when none was), and whether the sequential test
    decided each level that placed it (``decided``)."""

    family: str
    parameter: str
    q: float
    levels: tuple[float, ...]
    index: np.ndarray
    label: np.ndarray
    severity: np.ndarray
    below: np.ndarray
    decided: np.ndarray
    max_steps: int
    confidence: float = 0.95
    looks: int = 4
    inferences: int = 0  # every inference the search ran (clean passes included)
    model: dict | None = None  # path and SHA-256 of the model
    dataset: dict | None = None  # spec, count and SHA-256 of the images
    seed: int = 0

    def to_dict(self) -> dict:
        """The summary (no per-image arrays)."""
        finite = np.isfinite(self.severity) & (self.severity > 0)
        return {"family": self.family, "parameter": self.parameter, "q": self.q, "levels": list(self.levels),
                "max_steps": self.max_steps, "confidence": self.confidence, "looks": self.looks, "seed": self.seed,
                "images": int(self.index.size), "within_ladder": int(finite.sum()),
                "beyond_ladder": int(np.isinf(self.severity).sum()),
                "wrong_before_noise": int((self.severity == 0).sum()),
                "undecided": int((~self.decided).sum()), "inferences": int(self.inferences),
                "inferences_fixed": self._fixed_cost(),
                "median": _median(self.severity)}

    def _fixed_cost(self) -> int:
        """The inferences the same bisection costs with every level probed the full ``max_steps`` (no looks)."""
        probes = np.ceil(np.log2(len(self.levels) + 1))
        right = int(np.count_nonzero(self.severity != 0))
        return int(self.index.size + right * probes * self.max_steps)

    def __repr__(self) -> str:
        d = self.to_dict()
        return (f"FailureSeverity({self.family}, {self.parameter} at which p > {self.q:g}: median "
                f"{d['median']}, {d['beyond_ladder']} beyond the ladder, {d['undecided']} undecided of "
                f"{d['images']})")

    def save(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``severity.json`` (and ``severity.md``) to the folder ``out``, checked before anything is written."""
        folder = check_out(out, overwrite=overwrite)
        write_bytes_atomic(folder / "severity.md", severity_markdown(self).encode())
        write_json_atomic(folder / "severity.json", {  # last: the completion marker
            "schema_version": SEVERITY_SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summary": self.to_dict(), "model": self.model, "dataset": self.dataset,
            "images": {"index": self.index.tolist(), "label": self.label.tolist(),
                       "severity": [None if math.isinf(v) else float(v) for v in self.severity],
                       "below": [None if math.isnan(v) else float(v) for v in self.below],
                       "decided": self.decided.tolist()}})
        return folder


def check_out(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The output folder, made (never through a link) and refused when it holds a severity already."""
    folder = make_out_dir(out)
    if not overwrite and (folder / "severity.json").exists():
        raise InvalidInput(f"{folder} already holds severity.json; pass overwrite=True (--overwrite) or another "
                           "folder")
    return folder


def _median(severity: np.ndarray) -> float | None:
    """The median over every image (beyond the ladder counts as above every level, wrong as 0); None if that is
    beyond the ladder."""
    if severity.size == 0:
        return None
    m = float(np.quantile(severity, 0.5, method="lower"))
    return None if math.isinf(m) else m


def severity_markdown(r: FailureSeverity) -> str:
    d = r.to_dict()
    lad = ", ".join(f"{v:g}" for v in r.levels)
    counts = [int(np.count_nonzero(r.severity == v)) for v in r.levels]
    rows = "\n".join(f"| {v:g} | {c} |" for v, c in zip(r.levels, counts, strict=True))
    return (f"# Severity at failure: {r.family}\n\nThe smallest {r.parameter} at which each image's per-step failure "
            f"probability exceeds {r.q:g} (bisection over {lad}; a sequential test at each level, {r.looks} looks of "
            f"at most {r.max_steps} draws in all, {r.confidence:.0%} confidence).\n\n"
            f"- images: {d['images']}; median {r.parameter}: "
            f"{format(d['median'], 'g') if d['median'] is not None else 'beyond the ladder'}\n"
            f"- beyond the ladder: {d['beyond_ladder']}; wrong before any noise: {d['wrong_before_noise']}; "
            f"undecided at some level: {d['undecided']}\n"
            f"- inferences: {d['inferences']:,} (the same search with every level at {r.max_steps} draws: about "
            f"{d['inferences_fixed']:,})\n\n| {r.parameter} | images failing first here |\n|---|---|\n{rows}\n")


def _default_levels(fam: Family, shape) -> tuple[float, ...]:
    """Twelve levels spanning the profile ladder's ends (a quarter of the first to ten times the last, within the
    parameter's range), geometric; whole numbers for a pixel parameter."""
    assert fam.severity is not None
    name, values, spatial = fam.severity
    meta = {f.name: f.metadata for f in fam.parameters()}[name]
    first, last = values[0], values[-1]
    if spatial:
        f = min(shape[0], shape[1]) / 32
        first, last = max(1.0, first * f), last * f
    lo, hi = (first / 4, last * 10) if last > first else (first * 4, last / 10)
    lo = min(max(lo, meta["lo"] if not meta["lo_open"] else meta["lo"] + 1e-9), meta["hi"])
    hi = min(max(hi, meta["lo"]), meta["hi"])
    if meta["whole"]:
        lo, hi = max(lo, 1), min(hi, (min(shape[0], shape[1]) if name == "size" else max(shape[0], shape[1]) - 1))
        return tuple(float(v) for v in np.unique(np.rint(np.geomspace(lo, hi, 12)).astype(int)))
    return tuple(float(v) for v in np.geomspace(lo, hi, 12))


def look_ends(max_steps: int, looks: int) -> list[int]:
    """The step counts after each look: ``looks`` nearly equal blocks of ``max_steps`` (fewer when steps are few)."""
    return sorted({max(1, math.ceil(max_steps * (j + 1) / looks)) for j in range(looks)})


def steps_to_decide(q: float, confidence: float, looks: int) -> int:
    """The fewest draws after which an image never fooled is shown below ``q`` at its look's level."""
    a = (1 - confidence) / 2 / looks
    return math.floor(math.log(a) / math.log(1 - q)) + 1


def failure_severity(model, dataset="sample", labels=None, *, family="gaussian", q: float = 0.1, levels=None,
                     max_steps: int = 100, confidence: float = 0.95, looks: int = 4, seed: int = 0,
                     **settings) -> FailureSeverity:
    """Per image, the smallest severity of a random ``family`` (its profile parameter: sigma, eps, size, shift, ...)
    at which its failure probability exceeds ``q``, by bisection over ``levels`` (default: a 12-level ladder), with
    a sequential test at each probed level: up to ``max_steps`` draws in ``looks`` blocks, stopping an image as soon
    as the exact interval (``confidence``, its error spent equally over the looks) excludes ``q`` (see the module).
    ``looks=1`` is the fixed-``max_steps`` test. ``settings`` are :func:`pyrobust.evaluate`'s."""
    from pyrobust.evaluation import evaluate
    from pyrobust.validate import Integer, Number, check

    check("q", q, Number(0, 1, lo_open=True, hi_open=True, kind="a probability"))
    check("max_steps", max_steps, Integer(1, 100_000))
    check("confidence", confidence, Number(0.5, 1, hi_open=True, kind="a confidence"))
    check("looks", looks, Integer(1, 20))
    check("seed", seed, Integer(0, 2**64 - 1))
    fam = _family(family)
    for key in ("noise", "corruption", "count_failures", "out", "step_offset", "max_failure_prob"):
        if key in settings:
            raise InvalidInput(f"{key}= does not apply to failure_severity")
    picked = {k: v for k, v in settings.items() if k in SELECTION_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in SELECTION_FIELDS}
    _, _, selection = split_settings(picked)
    ds, ds_spec = load_data(dataset, labels, selection=selection)
    name = fam.severity[0] if fam.severity else ""
    ladder = tuple(float(v) for v in (levels if levels is not None else _default_levels(fam, ds.image_shape)))
    assert fam.severity is not None
    increasing = fam.severity[1][-1] > fam.severity[1][0]  # shot: fewer photons is more severe
    if len(ladder) < 2 or any(not np.isfinite(v) for v in ladder) or \
            any((b <= a) if increasing else (b >= a) for a, b in zip(ladder, ladder[1:], strict=False)):
        raise InvalidInput(f"levels must be at least two finite values of {name}, each more severe than the last "
                           f"({'increasing' if increasing else 'decreasing'}); got {list(ladder)}")
    specs = []
    for v in ladder:
        try:
            specs.append(type(fam)(**{**{f.name: getattr(fam, f.name) for f in fam.parameters()}, name: v}))
        except ValueError as exc:
            raise InvalidInput(f"levels: {exc}") from None
    ends = look_ends(max_steps, looks)
    a = (1 - confidence) / 2 / len(ends)
    n = ds.n
    lo, hi = np.full(n, -1), np.full(n, len(ladder))
    decided = np.ones(n, bool)
    wrong = np.zeros(n, bool)
    inferences = 0
    model_info: dict | None = None
    while True:
        open_ = (hi - lo > 1) & ~wrong
        if not open_.any():
            break
        mid = (lo + hi) // 2
        for level in np.unique(mid[open_]):
            pos = np.flatnonzero(open_ & (mid == level))
            k = np.zeros(pos.size, np.int64)
            active = np.ones(pos.size, bool)
            exceeds = np.zeros(pos.size, bool)
            done = 0
            for end in ends:
                at = np.flatnonzero(active)
                ev = evaluate(model, ds.take(pos[at]), noise=specs[level], max_steps=end - done, step_offset=done,
                              count_failures=True, report=False, seed=seed, **rest)
                inferences += ev.outcome.inferences
                model_info = model_info or {"path": ev.summary["model"]["path"],
                                            "sha256": ev.summary["model"]["sha256"]}
                o = ev.outcome
                assert o.failures is not None
                bad = o.first_failure == 0
                wrong[pos[at[bad]]] = True
                active[at[bad]] = False
                at, fails = at[~bad], o.failures[~bad]
                k[at] += fails
                done = end
                low, high = clopper_pearson(k[at], np.full(at.size, done), a)
                settled = (low > q) | (high < q)
                exceeds[at] = np.where(settled, low > q, k[at] / done > q)
                active[at[settled]] = False
                if done == ends[-1]:
                    decided[pos[at[~settled]]] = False
                if not active.any():
                    break
            right = ~wrong[pos]
            hi[pos[right & exceeds]] = level
            lo[pos[right & ~exceeds]] = level
    lad = np.array(ladder)
    severity = np.where(hi < len(ladder), lad[np.minimum(hi, len(ladder) - 1)], np.inf)
    below = np.where(lo >= 0, lad[np.maximum(lo, 0)], np.nan)
    severity[wrong], below[wrong] = 0.0, np.nan
    return FailureSeverity(family=fam.text(), parameter=name, q=float(q), levels=ladder, index=ds.index.copy(),
                           label=ds.labels.copy(), severity=severity, below=below, decided=decided,
                           max_steps=int(max_steps), confidence=float(confidence), looks=len(ends),
                           inferences=int(inferences), model=model_info, seed=int(seed),
                           dataset={"spec": ds_spec, "count": int(n), "sha256": ds.sha256})


def _family(family) -> Family:
    if isinstance(family, Family):
        fam = family
    else:
        try:
            fam = parse(str(family))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    if isinstance(fam, Sweep):
        raise InvalidInput(f"{fam.name} is a severity sweep: its own run records each image's first failing "
                           "severity (evaluate with noise=...); failure_severity is for the random families")
    if fam.severity is None:
        raise InvalidInput(f"{fam.name} has no severity to grow; give a family with one (gaussian, patch, ...)")
    return fam


# ------------------------------------------------------------------------------------------------- read back
def load_severity(folder: str | os.PathLike) -> FailureSeverity:
    """A saved :class:`FailureSeverity`, read as strictly as user input: a file that is not exactly what
    :meth:`FailureSeverity.save` writes is refused with what is wrong (:class:`~pyrobust.errors.DataError`)."""
    import json

    path = Path(folder) / "severity.json"
    where = f"{path}"
    if not path.is_file() and not path.is_symlink():
        raise DataError(f"{folder} holds no severity.json; write one with pyrobust severity MODEL --out {folder}")
    raw = read_bounded(path, what="severity.json", max_bytes=MAX_SEVERITY_BYTES, follow_symlinks=False)
    try:
        d = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc}); write it again with pyrobust severity") from None

    def bad(what: str) -> DataError:
        return DataError(f"{where}: {what}; it was altered or is not pyrobust's: write it again with pyrobust "
                         "severity")

    if not isinstance(d, dict) or d.get("schema_version") != SEVERITY_SCHEMA:
        raise bad(f"schema_version must be {SEVERITY_SCHEMA}")
    s, images = d.get("summary"), d.get("images")
    if not isinstance(s, dict) or not isinstance(images, dict):
        raise bad("summary and images must be objects")
    try:
        fam = _family(s["family"])
        q, steps, conf = float(s["q"]), int(s["max_steps"]), float(s["confidence"])
        levels = tuple(float(v) for v in s["levels"])
        looks, seed = int(s["looks"]), int(s["seed"])
        index = np.asarray(images["index"], dtype=np.int64)
        label = np.asarray(images["label"], dtype=np.int64)
        sev = np.array([np.inf if v is None else v for v in images["severity"]], dtype=np.float64)
        below = np.array([np.nan if v is None else v for v in images["below"]], dtype=np.float64)
        dec = images["decided"]
    except (KeyError, TypeError, ValueError, InvalidInput) as exc:
        raise bad(f"a field is missing or malformed ({exc})") from None
    if not (0 < q < 1 and 1 <= steps <= 100_000 and 0.5 <= conf < 1 and 1 <= looks <= 20 and len(levels) >= 2):
        raise bad("q, max_steps, confidence, looks or levels are out of range")
    m = index.size
    if index.ndim != 1 or any(x.shape != (m,) for x in (label, sev, below)) or not isinstance(dec, list) or \
            len(dec) != m or not all(isinstance(v, bool) for v in dec):
        raise bad("the per-image arrays must be flat and of one length, decided true or false")
    if np.unique(index).size != m or (m and index.min() < 0):
        raise bad("image indices must be distinct and >= 0")
    allowed = set(levels) | {0.0, math.inf}
    if not all(v in allowed for v in sev.tolist()) or not all(math.isnan(v) or v in levels for v in below.tolist()):
        raise bad("a severity is not one of its levels (or 0, or beyond the ladder)")
    ds = d.get("dataset")
    if not isinstance(ds, dict) or not isinstance(ds.get("sha256"), str) or ds.get("count") != m:
        raise bad("the dataset record must name the images' SHA-256 and their count")
    model = d.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("sha256"), str):
        raise bad("the model record must name its SHA-256")
    return FailureSeverity(family=fam.text(), parameter=fam.severity[0] if fam.severity else "", q=q,
                           levels=levels, index=index, label=label, severity=sev, below=below,
                           decided=np.array(dec, bool), max_steps=steps, confidence=conf, looks=looks,
                           inferences=int(s.get("inferences", 0)), model=model, dataset=ds, seed=seed)


# ------------------------------------------------------------------------------------- compare and agreement
def _check_paired(a: FailureSeverity, b: FailureSeverity, what: str = "compared") -> None:
    diffs = []
    for key in ("family", "q", "levels", "max_steps", "seed"):
        if getattr(a, key) != getattr(b, key):
            diffs.append(f"{key} {getattr(a, key)!r} → {getattr(b, key)!r}")
    if (a.dataset or {}).get("sha256") != (b.dataset or {}).get("sha256") or not np.array_equal(a.index, b.index):
        diffs.append("the images differ")
    if diffs:
        raise InvalidInput(f"the severities cannot be {what}: {'; '.join(diffs)}; run pyrobust severity on the same "
                           "images with the same family, q, levels, max-steps and seed")


def _ranks(severity: np.ndarray) -> np.ndarray:
    """Average ranks (ties shared), beyond the ladder above every level."""
    from scipy.stats import rankdata

    return rankdata(np.where(np.isinf(severity), np.finfo(float).max, severity))


def compare_severities(a: FailureSeverity, b: FailureSeverity, *, listed: int = 10) -> dict:
    """Image by image: how many images need a higher severity to fail under B than under A (more robust), a
    lower one, or the same; the median of the paired level moves (in ladder steps) and an exact sign test of
    "as many rise as fall"; the images that moved most. Both must be of the same images, family, q, ladder and
    seed."""
    from scipy.stats import binomtest

    _check_paired(a, b)
    lad = {v: i for i, v in enumerate(a.levels)}

    def rung(sev: np.ndarray) -> np.ndarray:  # -1: wrong before noise; len(levels): beyond the ladder
        return np.array([-1 if v == 0 else len(a.levels) if math.isinf(v) else lad[v] for v in sev.tolist()])

    ra, rb = rung(a.severity), rung(b.severity)
    move = rb - ra
    up, down = int(np.count_nonzero(move > 0)), int(np.count_nonzero(move < 0))
    test = binomtest(up, up + down, 0.5).pvalue if up + down else 1.0
    order = np.argsort(-np.abs(move), kind="stable")[:listed]

    def shown(v: float) -> float | str:
        return "wrong" if v == 0 else "beyond" if math.isinf(v) else v

    moved = [{"index": int(a.index[i]), "label": int(a.label[i]), "a": shown(float(a.severity[i])),
              "b": shown(float(b.severity[i])), "rungs": int(move[i])} for i in order if move[i] != 0]
    return {"family": a.family, "parameter": a.parameter, "q": a.q, "images": int(a.index.size),
            "a": {"model": a.model, "median": _median(a.severity)},
            "b": {"model": b.model, "median": _median(b.severity)},
            "more_robust": up, "less_robust": down, "same": int(a.index.size - up - down),
            "median_move_rungs": float(np.median(move)) if move.size else 0.0,
            "sign_test_p": float(test), "undecided": {"a": int((~a.decided).sum()), "b": int((~b.decided).sum())},
            "moved_most": moved}


def severity_agreement(results: list[FailureSeverity], names: list[str] | None = None) -> dict:
    """How alike several models rank the same images by severity at failure: Spearman's rank correlation of each
    pair (ties shared, beyond the ladder above every level) with a 95 % Fisher-z interval."""
    from scipy.stats import spearmanr

    if len(results) < 2:
        raise InvalidInput("severity agreement needs at least two severity results")
    names = names or [f"run{i + 1}" for i in range(len(results))]
    if len(names) != len(results):
        raise InvalidInput(f"{len(names)} names for {len(results)} severity results; give one name each")
    for r in results[1:]:
        _check_paired(results[0], r, "ranked together")
    ranks = [_ranks(r.severity) for r in results]
    pairs = []
    n = results[0].index.size
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            rho = float(spearmanr(ranks[i], ranks[j]).statistic) if n > 2 else math.nan
            ci: list[float | None] = [None, None]
            if n > 3 and np.isfinite(rho) and abs(rho) < 1:
                z, half = math.atanh(rho), 1.959963984540054 / math.sqrt(n - 3)
                ci = [math.tanh(z - half), math.tanh(z + half)]
            pairs.append({"a": names[i], "b": names[j], "spearman": None if math.isnan(rho) else rho,
                          "interval": ci})
    return {"family": results[0].family, "q": results[0].q, "images": int(n), "names": names, "pairs": pairs}


def write_severity_compare(rep: dict, out: str | os.PathLike) -> None:
    folder = make_out_dir(out)
    lines = [f"# Severity at failure compared: {rep['family']}", "",
             f"The smallest {rep['parameter']} at which each image's failure probability exceeds {rep['q']:g}, "
             f"image by image ({rep['images']} images).", "",
             f"- median: {rep['a']['median']} → {rep['b']['median']} (None: beyond the ladder)",
             f"- more robust under B: {rep['more_robust']}; less robust: {rep['less_robust']}; the same: "
             f"{rep['same']}; exact sign test p = {rep['sign_test_p']:.3g}",
             f"- median move: {rep['median_move_rungs']:g} rungs of the ladder", "",
             "| image | label | A | B | rungs |", "|---|---|---|---|---|"]
    lines += [f"| {m['index']} | {m['label']} | {m['a']} | {m['b']} | {m['rungs']:+d} |" for m in rep["moved_most"]]
    write_bytes_atomic(folder / "compare.md", ("\n".join(lines) + "\n").encode())
    write_json_atomic(folder / "compare.json", rep)


def write_severity_agreement(rep: dict, out: str | os.PathLike) -> None:
    folder = make_out_dir(out)
    lines = [f"# Severity at failure: agreement across models ({rep['family']}, q = {rep['q']:g})", "",
             f"Spearman's rank correlation of the images' severities ({rep['images']} images; ties shared, beyond "
             "the ladder above every level), with 95 % Fisher-z intervals.", "",
             "| A | B | Spearman | 95 % interval |", "|---|---|---|---|"]
    for p in rep["pairs"]:
        ci = "n/a" if p["interval"][0] is None else f"[{p['interval'][0]:.3f}, {p['interval'][1]:.3f}]"
        rho = "n/a" if p["spearman"] is None else f"{p['spearman']:.3f}"
        lines.append(f"| {md_text(p['a'])} | {md_text(p['b'])} | {rho} | {ci} |")
    write_bytes_atomic(folder / "agreement.md", ("\n".join(lines) + "\n").encode())
    write_json_atomic(folder / "agreement.json", rep)
