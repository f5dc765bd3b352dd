"""``pyrobust compare``: per-image differences between two evaluations of the same data with the same noise."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pyrobust.errors import InvalidInput
from pyrobust.escape import md_cell, md_code, md_text
from pyrobust.files import make_out_dir, write_bytes_atomic, write_json_atomic
from pyrobust.report import plot_survival
from pyrobust.stats import (
    failure_interval,
    failure_probability,
    paired_difference_interval,
    paired_ratio_difference,
)
from pyrobust.store.results import load_results
from pyrobust.types import PAIRING_IGNORES, ROBUST, RunRecord, differences

COMPARE_SCHEMA = 2  # 2: the noise under "noise", as in summary.json and gate.json


def _refuse_unless_comparable(a: RunRecord, b: RunRecord) -> None:
    diffs = differences(a.fingerprint, b.fingerprint, compare=("data", "noise"), ignore=PAIRING_IGNORES)
    if diffs:
        raise InvalidInput(f"these runs cannot be compared image by image: {'; '.join(diffs)}. Evaluate both models "
                           "on the same data with the same seed and settings")


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    diff, lo, hi = paired_difference_interval(both, only_b, only_a, int(a.size) - both - only_a - only_b)
    return {"a": float(a.mean()), "b": float(b.mean()), "change": diff, "ci95": [lo, hi],
            "lost": only_a, "gained": only_b}


def _of_correct(ra: np.ndarray, ca: np.ndarray, rb: np.ndarray, cb: np.ndarray) -> dict:
    """Robust as a share of the correctly classified images, for each run, and its change with a paired bootstrap
    interval (each run's denominator is its own correct images)."""
    change, lo, hi = paired_ratio_difference(ra, ca, rb, cb)

    def share(r: np.ndarray, c: np.ndarray) -> float | None:
        return float(r.sum() / c.sum()) if c.sum() else None

    return {"a": share(ra, ca), "b": share(rb, cb), "change": None if np.isnan(change) else change,
            "ci95": None if np.isnan(change) else [lo, hi], "correct_a": int(ca.sum()), "correct_b": int(cb.sum()),
            "method": "paired percentile bootstrap over images"}


def _intervals_moved(a: RunRecord, b: RunRecord, listed: int) -> dict:
    """Images correct under both runs whose exact 95 % intervals on the failure probability do not overlap: a
    change of the image's own robustness beyond what the noise explains (each interval holds at 95 % on its own)."""
    pa = failure_probability(a.outcome.first_failure, a.outcome.failures, a.noise.max_steps)
    pb = failure_probability(b.outcome.first_failure, b.outcome.failures, b.noise.max_steps)
    la, ha = failure_interval(a.outcome.first_failure, a.outcome.failures, a.noise.max_steps)
    lb, hb = failure_interval(b.outcome.first_failure, b.outcome.failures, b.noise.max_steps)
    ok = ~np.isnan(pa) & ~np.isnan(pb)
    worse = ok & (lb > ha)
    better = ok & (hb < la)
    moved = np.flatnonzero(worse | better)
    order = moved[np.argsort(-np.abs(pb[moved] - pa[moved]), kind="stable")][:listed]
    return {"count": int(moved.size), "more_fragile": int(worse.sum()), "more_robust": int(better.sum()),
            "method": [("failure counts" if r.outcome.failures is not None else "first-failure step")
                       for r in (a, b)],
            "largest": [{"index": int(a.outcome.index[i]), "p_a": float(pa[i]), "interval_a": [float(la[i]),
                                                                                             float(ha[i])],
                         "p_b": float(pb[i]), "interval_b": [float(lb[i]), float(hb[i])]} for i in order]}


def compare_runs(a_dir: str | os.PathLike, b_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
                 listed: int = 50) -> dict:
    """Compare run A with run B (B is "after"); write ``compare.json``, ``compare.md`` and ``survival_compare.png``
    to ``out`` when given."""
    if out is not None:
        make_out_dir(out)  # before any work: an output that cannot be written is an error up front
    ra_, rb_ = load_results(a_dir), load_results(b_dir)
    _refuse_unless_comparable(ra_, rb_)
    (oa, sa), (ob, sb) = ra_, rb_
    if oa.n != ob.n or not np.array_equal(oa.index, ob.index):
        raise InvalidInput(f"these runs cannot be compared image by image: they evaluated different images ({oa.n} "
                           f"and {ob.n}; a precision or partial run covers only some). Evaluate both on the same "
                           "images")
    ra, rb = oa.first_failure == ROBUST, ob.first_failure == ROBUST
    ca, cb = oa.first_failure != 0, ob.first_failure != 0
    idx = oa.index
    moved = (oa.first_failure > 0) & (ob.first_failure > 0) & (oa.first_failure != ob.first_failure)
    shift = (ob.first_failure - oa.first_failure)[moved]
    order = np.argsort(-np.abs(shift), kind="stable")[:listed]
    per_class = []
    for pa, pb in zip(sa["per_class"], sb["per_class"], strict=True):
        k = pa["class"]
        sel = oa.label == k
        per_class.append({"class": k, "name": pa["name"], "images": pa["images"], "robust_a": pa["robust"],
                          "robust_b": pb["robust"], "robust_rate_a": pa["robust_rate"],
                          "robust_rate_b": pb["robust_rate"],
                          "newly_fragile": int((ra & ~rb & sel).sum()), "newly_robust": int((~ra & rb & sel).sum())})
    rep = {
        "schema_version": COMPARE_SCHEMA,
        "a": {"results": str(Path(a_dir).resolve()), "model": sa["model"]},
        "b": {"results": str(Path(b_dir).resolve()), "model": sb["model"]},
        "dataset": sa["dataset"], "noise": ra_.noise.to_dict(),
        "images": int(idx.size),
        "robust": _paired(ra, rb),
        "robust_of_correct": _of_correct(ra, ca, rb, cb),
        "accuracy": _paired(ca, cb),
        "intervals_moved": _intervals_moved(ra_, rb_, listed),
        "newly_fragile": {"count": int((ra & ~rb).sum()), "index": idx[ra & ~rb][:listed].tolist()},
        "newly_robust": {"count": int((~ra & rb).sum()), "index": idx[~ra & rb][:listed].tolist()},
        "newly_wrong": {"count": int((ca & ~cb).sum()), "index": idx[ca & ~cb][:listed].tolist()},
        "newly_correct": {"count": int((~ca & cb).sum()), "index": idx[~ca & cb][:listed].tolist()},
        "steps_moved": {"count": int(moved.sum()), "earlier": int((shift < 0).sum()), "later": int((shift > 0).sum()),
                        "median_shift": float(np.median(shift)) if shift.size else None,
                        "largest": [{"index": int(i), "step_a": int(a), "step_b": int(b)} for i, a, b in
                                    zip(idx[moved][order], oa.first_failure[moved][order],
                                        ob.first_failure[moved][order], strict=True)]},
        "per_class": per_class,
    }
    if out is not None:
        o = Path(out)
        name_a, name_b = f"A: {sa['model']['name']}", f"B: {sb['model']['name']}"
        if name_a[3:] == name_b[3:]:
            name_a, name_b = f"A: {Path(a_dir).name}", f"B: {Path(b_dir).name}"
        plot_survival(sa, o / "survival_compare.png",
                      curves={name_a: sa["survival"]["fraction"], name_b: sb["survival"]["fraction"]})
        write_json_atomic(o / "compare.json", rep)
        write_bytes_atomic(o / "compare.md", compare_markdown(rep).encode())
    return rep


def compare_markdown(rep: dict) -> str:
    def pct(r):
        return (f"{r['a']:.2%} → {r['b']:.2%} ({r['change']:+.2%}, 95 % interval [{r['ci95'][0]:+.2%}, "
                f"{r['ci95'][1]:+.2%}]; {r['lost']} lost, {r['gained']} gained)")

    def of_correct(r):
        if r["change"] is None:
            return "n/a (no correctly classified images in a run)"
        return (f"{r['a']:.2%} → {r['b']:.2%} ({r['change']:+.2%}, 95 % interval [{r['ci95'][0]:+.2%}, "
                f"{r['ci95'][1]:+.2%}]; of {r['correct_a']} and {r['correct_b']} correct images)")

    lines = [f"# pyrobust compare: {md_text(rep['a']['model']['name'])} (A) → {md_text(rep['b']['model']['name'])} "
             "(B)", "",
             f"{rep['images']} images of {md_code(rep['dataset']['spec'])}, seed {rep['noise']['seed']}, "
             f"{rep['noise']['pixels']} pixels, {rep['noise']['max_steps']} steps.", "",
             f"- robust, of all images: {pct(rep['robust'])}",
             f"- robust, of correctly classified images: {of_correct(rep['robust_of_correct'])}",
             f"- accuracy: {pct(rep['accuracy'])}",
             f"- failure probability's exact 95 % interval moved clear of its old one: "
             f"{rep['intervals_moved']['count']} images ({rep['intervals_moved']['more_fragile']} more fragile, "
             f"{rep['intervals_moved']['more_robust']} more robust)",
             f"- newly fragile: {rep['newly_fragile']['count']}; newly robust: {rep['newly_robust']['count']}",
             f"- first-failure step moved: {rep['steps_moved']['count']} images ({rep['steps_moved']['earlier']} "
             f"earlier, {rep['steps_moved']['later']} later)", "",
             "| class | images | robust A | robust B | newly fragile | newly robust |", "|---|---|---|---|---|---|"]
    for r in rep["per_class"]:
        lines.append(f"| {md_cell(r['name'])} | {r['images']} | {r['robust_a']} | {r['robust_b']} | "
                     f"{r['newly_fragile']} | "
                     f"{r['newly_robust']} |")
    lines += ["", "![survival curves](survival_compare.png)", ""]
    return "\n".join(lines)
