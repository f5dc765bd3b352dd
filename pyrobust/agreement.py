"""``pyrobust agreement``: is robustness a property of the image, or of the model that looks at it?

Given evaluations of the same images with the same noise by several models, every pair is compared on the images
both classify correctly (an image a model gets wrong is neither robust nor fooled for it):

* Cohen's κ of the per-image robust flags: agreement beyond what the two robust fractions give by chance, with a
  95 % bootstrap interval whose coverage is checked by simulation (:func:`cohen_kappa`);
* κ beside κ_max, the largest κ the two robust fractions allow (κ across pairs of different prevalence is not
  comparable otherwise), and κ within each class (class-stratified: pooled over classes by their size);
* the Jaccard index of the two robust sets;
* Spearman's rank correlation of the first-failure steps, robust images ranked above every fooled one, and of the
  per-image failure probabilities p̂ (with a Fisher-z interval): the continuous score behind the censored flag;
* with retests (each run again under another noise seed), each measure's reliability and the agreement corrected
  for it (Spearman's correction for attenuation): how far two models agree once each one's own noise is removed.

The **ceiling** is one model against itself under two noise seeds (``ceiling=(run, run)``): how well robustness can
agree at all when only the noise differs. Runs of other images, data or noise settings are refused with the
differing fields named; only the ceiling pair may differ, and only in the seed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyrobust.errors import InvalidInput
from pyrobust.escape import figure_text, md_cell, md_code
from pyrobust.files import make_out_dir, write_bytes_atomic, write_json_atomic
from pyrobust.stats import spearman_interval
from pyrobust.store.results import load_results
from pyrobust.types import PAIRING_IGNORES, ROBUST, RunRecord, differences

AGREEMENT_SCHEMA = 1
MIN_COMMON = 10  # fewer images correct under both models cannot say anything


@dataclass(frozen=True)
class Kappa:
    value: float
    interval: tuple[float, float]
    observed: float  # share of images with the same flag
    expected: float  # share expected by chance from the two robust fractions
    n: int


def cohen_kappa(a: np.ndarray, b: np.ndarray, confidence: float = 0.95, resamples: int = 4000) -> Kappa:
    """Cohen's κ of two boolean arrays, with a percentile-bootstrap interval of the 2×2 table.

    The table is resampled (multinomial, ``resamples`` times, seeded by the table itself so the interval is
    reproducible) from its cell shares with half an image added to every cell, so an empty cell (no image fooled by
    both models, common when robust fractions are near 1) does not collapse the interval. The large-sample
    interval of Fleiss, Cohen & Everitt (1969) covers as little as 57 % there (1,000 images, 97 % robust, κ = 0);
    this one covers 92.5 % or more in every condition ``tests/test_agreement.py`` simulates (100 to 2,000 images,
    robust fractions 0.3 to 0.95, κ 0 to 0.8). When both raters give one category only, κ is undefined: NaN with
    a NaN interval."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = int(a.size)
    if n == 0 or a.shape != b.shape:
        raise InvalidInput("cohen_kappa needs two flag arrays of the same, non-zero length")
    counts = np.array([np.sum(a & b), np.sum(a & ~b), np.sum(~a & b), np.sum(~a & ~b)], np.int64)
    k, po, pe = _kappa_of(counts[None].astype(np.float64))
    if not np.isfinite(k[0]):
        return Kappa(math.nan, (math.nan, math.nan), float(po[0]), float(pe[0]), n)
    rng = np.random.default_rng([int(c) for c in counts] + [0x4B41])
    draws = rng.multinomial(n, (counts + 0.5) / (n + 2.0), size=resamples).astype(np.float64)
    kb, _, _ = _kappa_of(draws)
    kb = kb[np.isfinite(kb)]
    tail = (1 - confidence) / 2
    lo, hi = (float(v) for v in np.quantile(kb, [tail, 1 - tail])) if kb.size else (math.nan, math.nan)
    return Kappa(float(k[0]), (lo, hi), float(po[0]), float(pe[0]), n)


def _kappa_of(counts: np.ndarray):
    """κ, observed and chance agreement of tables given as rows of (both, only a, only b, neither) counts."""
    n = counts.sum(axis=1)
    p = counts / n[:, None]
    po = p[:, 0] + p[:, 3]
    ra, cb = p[:, 0] + p[:, 1], p[:, 0] + p[:, 2]
    pe = ra * cb + (1 - ra) * (1 - cb)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(pe < 1, (po - pe) / np.where(pe < 1, 1 - pe, 1), np.nan)
    return k, po, pe


def kappa_max(a: np.ndarray, b: np.ndarray) -> float:
    """The largest κ two raters with these marginals can reach: observed agreement at most 1 - |p_a - p_b|."""
    pa, pb = float(np.mean(a)), float(np.mean(b))
    pe = pa * pb + (1 - pa) * (1 - pb)
    return (1 - abs(pa - pb) - pe) / (1 - pe) if pe < 1 else math.nan


def stratified_kappa(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict:
    """κ within each class (NaN where both raters give one flag only in it) and their mean weighted by class size
    over the classes where κ is defined."""
    rows, total, weight = [], 0.0, 0
    for k in np.unique(labels):
        sel = labels == k
        ka, _, _ = _kappa_of(np.array([[np.sum(a[sel] & b[sel]), np.sum(a[sel] & ~b[sel]),
                                        np.sum(~a[sel] & b[sel]), np.sum(~a[sel] & ~b[sel])]], np.float64))
        value = float(ka[0])
        rows.append({"class": int(k), "images": int(sel.sum()), "kappa": value if math.isfinite(value) else None})
        if math.isfinite(value):
            total += value * int(sel.sum())
            weight += int(sel.sum())
    return {"pooled": total / weight if weight else None, "per_class": rows}


def _p_hat(record: RunRecord) -> np.ndarray:
    from pyrobust.stats import failure_probability

    return failure_probability(record.outcome.first_failure, record.outcome.failures, record.noise.max_steps)


def _ranks_for_failure(ff: np.ndarray, max_steps: int) -> np.ndarray:
    """First-failure steps with robust images (-1) placed above every step."""
    return np.where(ff == ROBUST, max_steps + 1, ff).astype(np.float64)


def compare_pair(x: RunRecord, y: RunRecord) -> dict:
    """κ, Jaccard and rank correlation of two comparable runs, on the images both classify correctly."""
    from scipy.stats import spearmanr

    fx, fy = x.outcome.first_failure, y.outcome.first_failure
    both = (fx != 0) & (fy != 0)
    n = int(both.sum())
    out: dict = {"images_correct_under_both": n, "images": int(fx.size)}
    if n < MIN_COMMON:
        out.update(kappa=None, kappa_ci95=None, jaccard=None, spearman=None,
                   note=f"only {n} images are classified correctly by both models; nothing to compare")
        return out
    rx, ry = fx[both] == ROBUST, fy[both] == ROBUST
    k = cohen_kappa(rx, ry)
    kmax = kappa_max(rx, ry)
    union = int((rx | ry).sum())
    rho = spearmanr(_ranks_for_failure(fx[both], x.noise.max_steps), _ranks_for_failure(fy[both], y.noise.max_steps))
    r_p, lo_p, hi_p = spearman_interval(_p_hat(x)[both], _p_hat(y)[both])
    out.update(kappa=_num(k.value),
               kappa_ci95=None if math.isnan(k.value) else list(k.interval),
               kappa_max=_num(kmax),
               kappa_over_max=_num(k.value / kmax) if math.isfinite(kmax) and kmax > 0 else None,
               kappa_by_class=stratified_kappa(rx, ry, x.outcome.label[both]),
               observed_agreement=k.observed, chance_agreement=k.expected,
               robust_fraction=[float(rx.mean()), float(ry.mean())],
               jaccard=float((rx & ry).sum() / union) if union else None,
               spearman=None if not np.isfinite(rho.statistic) else float(rho.statistic),
               spearman_p_hat=_num(r_p), spearman_p_hat_ci95=None if math.isnan(r_p) else [lo_p, hi_p],
               p_hat_method=["failure counts" if r.outcome.failures is not None else "first-failure step"
                             for r in (x, y)])
    return out


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def corrected(pair: dict, rel_a: dict | None, rel_b: dict | None) -> dict | None:
    """The pair's κ and p̂ correlation divided by the geometric mean of the two runs' reliabilities (each run
    against its retest under another noise seed): agreement with each measure's own noise taken out. Values above
    1 mean the pair agrees as well as each run agrees with itself (sampling error can push them past 1; they are
    reported as measured)."""
    if rel_a is None or rel_b is None:
        return None
    out: dict = {"reliability": [rel_a, rel_b]}
    for key, rel in (("kappa", "kappa"), ("spearman_p_hat", "spearman_p_hat")):
        v, ra, rb = pair.get(key), rel_a.get(rel), rel_b.get(rel)
        ok = v is not None and ra is not None and rb is not None and ra > 0 and rb > 0
        out[key] = v / math.sqrt(ra * rb) if ok else None  # type: ignore[operator]
    return out


def _check_comparable(records: list[RunRecord], names: list[str], *, allow_seed: bool = False) -> None:
    first = records[0]
    for name, r in zip(names[1:], records[1:], strict=True):
        a, b = first.fingerprint, r.fingerprint
        if allow_seed:
            a = {**a, "spec": {**a["spec"], "seed": None}}
            b = {**b, "spec": {**b["spec"], "seed": None}}
        diffs = differences(a, b, compare=("data", "noise"), ignore=PAIRING_IGNORES)
        if not diffs and not np.array_equal(first.outcome.index, r.outcome.index):
            diffs = [f"other images ({first.outcome.n} and {r.outcome.n}, or other indices)"]
        if diffs:
            raise InvalidInput(f"{names[0]} and {name} are not evaluations of the same images with the same noise: "
                               f"{'; '.join(diffs)}. Evaluate every model on the same data with the same settings"
                               + (" (the ceiling pair may differ only in --seed)" if allow_seed else ""))


def agreement(runs, *, names: list[str] | None = None, ceiling=None, retests=None,
              out: str | os.PathLike | None = None) -> dict:
    """Pairwise and overall agreement of the robust flags of ``runs`` (results folders). ``ceiling``: two results
    folders of one model under two noise seeds, for the noise-only ceiling. ``retests``: one results folder per run
    (in order; None for a run without one), the same model on the same images under another noise seed: each run's
    reliability, and every pair's agreement corrected for it. With ``out``, writes ``agreement.json``,
    ``agreement.md`` and ``agreement.png`` (a heat-map of κ) there."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise InvalidInput("agreement needs at least two results folders")
    names = list(names) if names else [r.name for r in runs]
    if len(names) != len(runs) or len(set(names)) != len(names):
        raise InvalidInput(f"give one distinct name per run ({len(runs)}); got {names}")
    if out is not None:
        make_out_dir(out)  # before any work
    records = [load_results(r) for r in runs]
    _check_comparable(records, names)
    reliability = _reliabilities(records, names, retests)
    pairs = []
    matrix = np.full((len(runs), len(runs)), np.nan)
    for i in range(len(runs)):
        matrix[i, i] = 1.0
        for j in range(i + 1, len(runs)):
            row = {"a": names[i], "b": names[j], **compare_pair(records[i], records[j])}
            if row.get("kappa") is not None or row.get("spearman_p_hat") is not None:
                row["corrected"] = corrected(row, reliability[i], reliability[j])
            pairs.append(row)
            if row["kappa"] is not None:
                matrix[i, j] = matrix[j, i] = row["kappa"]
    kappas = [p["kappa"] for p in pairs if p["kappa"] is not None]
    report: dict = {
        "schema_version": AGREEMENT_SCHEMA,
        "runs": [{"name": n, "folder": str(r.resolve()), "model": rec.model.get("name"),
                  "model_sha256": rec.model["sha256"], "accuracy": float(rec.outcome.correct.mean()),
                  "robust": float(rec.outcome.robust.mean()),
                  "robust_of_correct": float(rec.outcome.robust.sum() / max(1, rec.outcome.correct.sum())),
                  "reliability": rel}
                 for n, r, rec, rel in zip(names, runs, records, reliability, strict=True)],
        "dataset": records[0].dataset, "noise": records[0].noise.to_dict(),
        "population": "images classified correctly by both models of a pair",
        "pairs": pairs,
        "overall": {"mean_kappa": float(np.mean(kappas)) if kappas else None,
                    "min_kappa": float(np.min(kappas)) if kappas else None,
                    "max_kappa": float(np.max(kappas)) if kappas else None,
                    "mean_jaccard": _mean([p["jaccard"] for p in pairs]),
                    "mean_spearman": _mean([p["spearman"] for p in pairs]),
                    "mean_kappa_over_max": _mean([p.get("kappa_over_max") for p in pairs]),
                    "mean_spearman_p_hat": _mean([p.get("spearman_p_hat") for p in pairs]),
                    "mean_corrected_kappa": _mean([(p.get("corrected") or {}).get("kappa") for p in pairs])},
        "ceiling": None,
    }
    if ceiling is not None:
        c = [Path(x) for x in ceiling]
        if len(c) != 2:
            raise InvalidInput("ceiling takes two results folders: one model under two noise seeds")
        crec = [load_results(x) for x in c]
        if crec[0].model["sha256"] != crec[1].model["sha256"]:
            raise InvalidInput("the ceiling pair must be one model (the same SHA-256) under two noise seeds")
        if crec[0].noise.seed == crec[1].noise.seed:
            raise InvalidInput("the ceiling pair must differ in the noise seed (--seed); both used "
                               f"{crec[0].noise.seed}")
        _check_comparable([records[0], *crec], [names[0], "ceiling A", "ceiling B"], allow_seed=True)
        report["ceiling"] = {"folders": [str(x.resolve()) for x in c], "model_sha256": crec[0].model["sha256"],
                             "seeds": [crec[0].noise.seed, crec[1].noise.seed], **compare_pair(crec[0], crec[1])}
    report["answer"] = _answer(report)
    if out is not None:
        o = Path(out)
        write_json_atomic(o / "agreement.json", report)
        write_bytes_atomic(o / "agreement.md", to_markdown(report).encode())
        plot_agreement(matrix, names, o / "agreement.png", ceiling=(report["ceiling"] or {}).get("kappa"))
    return report


def _reliabilities(records: list[RunRecord], names: list[str], retests) -> list[dict | None]:
    """Each run against its retest (same model, images and noise but the seed): κ and p̂ correlation."""
    if retests is None:
        return [None] * len(records)
    retests = list(retests)
    if len(retests) != len(records):
        raise InvalidInput(f"give one retest per run ({len(records)}, None for a run without one); got "
                           f"{len(retests)}")
    out: list[dict | None] = []
    for name, rec, folder in zip(names, records, retests, strict=True):
        if folder is None:
            out.append(None)
            continue
        again = load_results(folder)
        if again.model["sha256"] != rec.model["sha256"]:
            raise InvalidInput(f"the retest of {name} ({folder}) is of another model; a retest is the same model "
                               "under another noise seed")
        if again.noise.seed == rec.noise.seed:
            raise InvalidInput(f"the retest of {name} ({folder}) used the same noise seed ({rec.noise.seed}); it must "
                               "differ in --seed only")
        _check_comparable([rec, again], [name, f"its retest {folder}"], allow_seed=True)
        pair = compare_pair(rec, again)
        out.append({"folder": str(Path(folder).resolve()), "seeds": [rec.noise.seed, again.noise.seed],
                    "kappa": pair["kappa"], "spearman_p_hat": pair.get("spearman_p_hat"),
                    "images": pair["images_correct_under_both"]})
    return out


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _answer(rep: dict) -> str:
    k = rep["overall"]["mean_kappa"]
    if k is None:
        return "no pair had enough images classified correctly by both models to compare"
    ceiling = (rep["ceiling"] or {}).get("kappa")
    text = f"mean pairwise κ {k:.2f} (range {rep['overall']['min_kappa']:.2f} to {rep['overall']['max_kappa']:.2f})"
    if ceiling is None:
        return text + "; no noise-only ceiling was given (ceiling=: one model under two seeds) to compare with"
    share = k / ceiling if ceiling > 0 else math.nan
    return (text + f" against a noise-only ceiling of {ceiling:.2f}: across models robustness agrees "
            f"{share:.0%} as well as the same model agrees with itself when only the noise changes")


def to_markdown(rep: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = ["# Agreement of robust flags", "",
             f"{len(rep['runs'])} evaluations of {md_code(rep['dataset']['spec'])} ({rep['dataset']['count']} images), "
             f"noise {rep['noise']['pixels']} pixels, {rep['noise']['max_steps']} steps, {rep['noise']['scheme']}, "
             f"{rep['noise']['mode']}, seed {rep['noise']['seed']}. Each pair is compared on {rep['population']}.",
             "", "| run | model | accuracy | robust, of all images | robust, of correct ones |",
             "|---|---|---|---|---|"]
    lines += [f"| {md_cell(r['name'])} | {md_code(r['model'], table=True)} | {r['accuracy']:.2%} | "
              f"{r['robust']:.2%} | {f(r.get('robust_of_correct'), '{:.2%}')} |" for r in rep["runs"]]
    lines += ["", "| pair | images | κ [95 % interval] | κ / κ_max | κ within classes | Jaccard | Spearman (steps) | "
              "Spearman p̂ [95 %] | corrected κ | corrected p̂ ρ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in rep["pairs"]:
        ci = "" if p["kappa_ci95"] is None else f" [{p['kappa_ci95'][0]:.3f}, {p['kappa_ci95'][1]:.3f}]"
        sp = p.get("spearman_p_hat_ci95")
        spci = "" if not sp else f" [{sp[0]:.3f}, {sp[1]:.3f}]"
        cor = p.get("corrected") or {}
        strat = (p.get("kappa_by_class") or {}).get("pooled")
        lines.append(f"| {md_cell(p['a'])} – {md_cell(p['b'])} | {p['images_correct_under_both']} | "
                     f"{f(p['kappa'])}{ci} | {f(p.get('kappa_over_max'))} | {f(strat)} | "
                     f"{f(p['jaccard'])} | {f(p['spearman'])} | {f(p.get('spearman_p_hat'))}{spci} | "
                     f"{f(cor.get('kappa'))} | {f(cor.get('spearman_p_hat'))} |")
    rels = [(r["name"], r["reliability"]) for r in rep["runs"] if r.get("reliability")]
    if rels:
        lines += ["", "Reliability of each run (against itself under another noise seed): " + "; ".join(
            f"{md_cell(n)} κ {f(r['kappa'])}, p̂ ρ {f(r['spearman_p_hat'])}" for n, r in rels) + ". Corrected "
            "values divide a pair's agreement by the geometric mean of the two reliabilities."]
    c = rep["ceiling"]
    if c:
        ci = "" if c["kappa_ci95"] is None else f" [{c['kappa_ci95'][0]:.3f}, {c['kappa_ci95'][1]:.3f}]"
        lines += ["", f"Noise-only ceiling (one model, seeds {c['seeds'][0]} and {c['seeds'][1]}): κ "
                      f"{f(c['kappa'])}{ci}, Jaccard {f(c['jaccard'])}, Spearman {f(c['spearman'])}."]
    lines += ["", f"**Answer:** {rep['answer']}.", ""]
    return "\n".join(lines)


def plot_agreement(matrix: np.ndarray, names: list[str], path: Path | None = None, *, ceiling=None):
    """A heat-map of pairwise κ (the diagonal is 1 by definition)."""
    from pyrobust.report import _figure, save_figure

    n = len(names)
    names = [figure_text(x) for x in names]
    fig = _figure(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=-0.2, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < 0.5 else "black")
    title = "Cohen's κ of robust flags"
    if ceiling is not None:
        title += f" (noise-only ceiling {ceiling:.2f})"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)
