"""A robustness profile: one model on one set of images under many corruptions at five severities each, in one
table and one figure, with a CIFAR-10-C-style mean error computed from the same runs.

* A **random** family (Gaussian noise, patches, ...) runs the first-failure protocol once per severity of its
  profile ladder (``Family.severity``): the robust fraction at level s is the share of all images that survive
  ``max_steps`` draws at that level.
* A **severity sweep** (blurs, contrast, JPEG, ...) runs once: step s is severity s, and the robust fraction at
  level s is the share of all images correct at every level up to s (its survival curve).

Every fraction has its exact (Clopper-Pearson) 95 % interval. The **mean error** is the mean over families and
levels of 1 - robust fraction (CIFAR-10-C's unnormalised mean corruption error); with a ``baseline`` profile of
another model on the same images, the **relative mCE** is ImageNet-C's: the mean over the families both profiles
ran of (sum of this model's errors) / (sum of the baseline's).

Writes ``profile.json`` (the API's :class:`Profile` as data), ``profile.md``, ``profile.png`` and ``profile.html``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perturbcore.families import FAMILIES, LEVELS, Family, Sweep, parse
from pyrobust.engine.plan import SELECTION_FIELDS, load_data, split_settings
from pyrobust.errors import DataError, InvalidInput
from pyrobust.files import make_out_dir, read_bounded, write_bytes_atomic, write_json_atomic
from pyrobust.stats import clopper_pearson

PROFILE_SCHEMA = 1
PROFILE_FILES = ("profile.json", "profile.md", "profile.png", "profile.html")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Profile:
    """The result of :func:`profile`: one entry per (family, level), the clean accuracy and the summary."""

    model: dict
    dataset: dict
    settings: dict
    accuracy: dict
    entries: list[dict]
    summary: dict
    folder: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"schema_version": PROFILE_SCHEMA, "model": self.model, "dataset": self.dataset,
                "settings": self.settings, "accuracy": self.accuracy, "entries": self.entries,
                "summary": self.summary}

    def robust(self, family: str) -> list[float]:
        """The robust fraction at each level of ``family`` (its name, e.g. ``"gaussian"``)."""
        rows = [e["robust_fraction"] for e in self.entries if e["family"] == family]
        if not rows:
            raise InvalidInput(f"this profile has no {family!r}; it has {', '.join(self.families)}")
        return rows

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(e["family"] for e in self.entries))

    def __repr__(self) -> str:
        return (f"Profile({self.model.get('name')} on {self.dataset.get('spec')}: {len(self.families)} families, "
                f"mean error {self.summary['mean_error']:.2%})")

    def plot(self):
        return plot_profile(self)

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.plot().savefig(buf, format="png", dpi=110)
        return buf.getvalue()


def _families(families) -> list[Family]:
    if families is None:
        return [cls() for cls in FAMILIES.values()]
    if isinstance(families, str):
        families = [f for f in families.split(";") if f.strip()] if ";" in families else families.split(",") \
            if ":" not in families else [families]
    out = []
    for f in families:
        if isinstance(f, Family):
            out.append(f)
            continue
        try:
            out.append(parse(str(f)))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    names = [f.name for f in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidInput(f"{', '.join(twice)} listed twice; a profile runs each family once, at its five levels")
    if not out:
        raise InvalidInput("a profile needs at least one family (e.g. gaussian, patch, contrast)")
    return out


def _interval(k: int, n: int) -> list[float]:
    lo, hi = clopper_pearson(np.array([k]), np.array([max(n, 1)]), (1 - CONFIDENCE) / 2)
    return [float(lo[0]), float(hi[0])] if n else [0.0, 1.0]


def profile(model, dataset="sample", labels=None, *, families=None, out: str | os.PathLike | None = None,
            overwrite: bool = False, baseline: str | os.PathLike | None = None, progress=None,
            **settings) -> Profile:
    """Profile ``model`` on ``dataset`` (as :func:`pyrobust.evaluate` takes them) under ``families`` (names or
    specs such as ``["gaussian", "patch:fill=random", "contrast"]``; default: every family), each at its five
    severities; ``settings`` are :func:`pyrobust.evaluate`'s (``max_steps=``, ``limit=``, ``seed=``, ``batch_size=``,
    ...) and apply to every run. ``baseline``: a ``profile.json`` of another model on the same images, for the
    relative mCE. ``out``: the folder for the profile's files (checked before any work)."""
    from pyrobust.evaluation import evaluate

    for key in ("noise", "corruption", "out", "pixels", "scheme", "low", "high", "pixel_count", "mode"):
        if key in settings:
            raise InvalidInput(f"{key}= does not apply to a profile: it runs each of its families at their own "
                               "levels (families=...)")
    fams = _families(families)
    base = _read_baseline(baseline) if baseline is not None else None
    folder = None
    if out is not None:
        folder = make_out_dir(out)
        present = [f for f in PROFILE_FILES if os.path.lexists(folder / f)]
        if present and not overwrite:
            raise InvalidInput(f"{folder} already holds a profile ({', '.join(present)}); pass overwrite=True "
                               "(--overwrite) to replace it, or choose another folder")
    # the images once, selected once: every run sees the same ones, and the levels scale with their size
    picked = {k: v for k, v in settings.items() if k in SELECTION_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in SELECTION_FIELDS}
    _, _, selection = split_settings(picked)
    ds, spec_text = load_data(dataset, labels, selection=selection)
    shape = ds.image_shape
    skipped = []
    for fam in list(fams):
        try:
            fam.check_image(*shape)
        except ValueError as exc:
            if families is not None:  # asked for by name: an error; among the defaults: left out, and said so
                raise InvalidInput(f"{exc} (drop {fam.name} from the families)") from None
            skipped.append({"family": fam.name, "why": str(exc)})
            fams.remove(fam)
    runs = [(f, level) for f in fams
            for level in ((None,) if f.kind == "sweep" or f.severity is None else range(1, LEVELS + 1))]
    entries: list[dict] = []
    first = None
    for i, (fam, level) in enumerate(runs):
        noise = fam if level is None else fam.at_severity(level, shape)
        kw = {k: v for k, v in rest.items() if k != "max_steps"} if fam.kind == "sweep" else rest
        ev = evaluate(model, ds, noise=noise, report=False, **kw)
        first = first or ev
        entries.extend(_entries(fam, level, ev))
        if progress is not None:
            progress(i + 1, len(runs), noise.text())
    assert first is not None
    m = first.summary["metrics"]
    acc = {"fraction": m["accuracy"]["fraction"], "count": m["accuracy"]["count"], "of": m["images"],
           "interval": _interval(m["accuracy"]["count"], m["images"])}
    summary = {**_summary(entries, base), "skipped": skipped}
    settings_out = {"max_steps": next((e["max_steps"] for e in entries if "max_steps" in e), None),
                    **{k: v for k, v in first.summary["noise"].items() if k in ("seed", "mean", "std", "pixel_range")}}
    dataset_record = {**first.summary["dataset"], "spec": spec_text if isinstance(spec_text, str) else "arrays"}
    result = Profile(model=first.summary["model"], dataset=dataset_record, settings=settings_out,
                     accuracy=acc, entries=entries, summary=summary, folder=folder)
    if folder is not None:
        write_profile(result, folder)
    return result


def _entries(fam: Family, level: int | None, ev) -> list[dict]:
    s = ev.summary
    n = s["metrics"]["images"]
    shape = ev.dataset.image_shape
    if isinstance(fam, Sweep):
        curve = s["survival"]["fraction"]
        out = []
        for lv in range(1, LEVELS + 1):
            k = int(round(curve[lv] * n))
            out.append({"family": fam.name, "kind": "sweep", "level": lv, "noise": fam.text(),
                        "setting": fam.describe_level(lv, shape), "images": n, "robust": k,
                        "robust_fraction": k / n if n else None, "interval": _interval(k, n),
                        "error": 1 - k / n if n else None})
        return out
    k = s["metrics"]["robust"]["count"]
    spec = ev.noise.corruption
    assert spec is not None
    name = fam.severity[0] if fam.severity else None
    return [{"family": fam.name, "kind": "random", "level": level or 1, "noise": spec.text(),
             "setting": f"{name}={getattr(spec, name):g}" if name else spec.text().partition(":")[2],
             "images": n, "robust": k, "robust_fraction": k / n if n else None, "interval": _interval(k, n),
             "error": 1 - k / n if n else None, "max_steps": ev.noise.max_steps}]


def _summary(entries: list[dict], base: dict | None) -> dict:
    errors = [e["error"] for e in entries if e["error"] is not None]
    per_family = {}
    for fam in dict.fromkeys(e["family"] for e in entries):
        errs = [e["error"] for e in entries if e["family"] == fam]
        per_family[fam] = {"mean_error": float(np.mean(errs)), "sum_error": float(np.sum(errs))}
    out: dict = {"mean_error": float(np.mean(errors)) if errors else None, "per_family": per_family,
                 "what": "mean over families and levels of 1 - robust fraction (CIFAR-10-C's unnormalised mean "
                         "corruption error)"}
    if base is not None:
        ratios = {}
        for fam, row in per_family.items():
            b = (base["summary"]["per_family"] or {}).get(fam)
            if b and b["sum_error"] > 0:
                ratios[fam] = row["sum_error"] / b["sum_error"]
        if not ratios:
            raise InvalidInput("the baseline profile shares no family (with a nonzero error) with this one: the "
                               "relative mCE needs at least one")
        out["relative_mce"] = {"value": float(np.mean(list(ratios.values()))), "per_family": ratios,
                               "baseline_model": base["model"].get("name"),
                               "what": "mean over the shared families of sum of errors / the baseline's sum "
                                       "(ImageNet-C's mCE, the baseline as the reference model)"}
    return out


def _read_baseline(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "profile.json"
    try:
        data = json.loads(read_bounded(p, what="baseline profile", max_bytes=64 << 20).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not a profile.json ({exc}); write one with pyrobust profile --out") from None
    ok = isinstance(data, dict) and data.get("schema_version") == PROFILE_SCHEMA and \
        isinstance(data.get("summary"), dict) and isinstance(data["summary"].get("per_family"), dict) and \
        isinstance(data.get("model"), dict)
    if ok:
        for row in data["summary"]["per_family"].values():
            if not (isinstance(row, dict) and isinstance(row.get("sum_error"), (int, float))
                    and not isinstance(row.get("sum_error"), bool) and 0 <= row["sum_error"] <= LEVELS):
                ok = False
    if not ok:
        raise DataError(f"{p}: not a profile.json pyrobust {PROFILE_SCHEMA} wrote (schema_version, summary."
                        "per_family with sum_error in [0, 5], model); write one with pyrobust profile --out")
    return data


def plot_profile(p: Profile, path: Path | None = None):
    """Robust fraction against severity, one line per family with its 95 % interval as a band; the clean accuracy
    as a dashed line."""
    from pyrobust.report import _figure, save_figure

    fams = p.families
    fig = _figure(figsize=(9.6, 5.2))
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["tab20"]
    for i, fam in enumerate(fams):
        rows = [e for e in p.entries if e["family"] == fam]
        x = [e["level"] for e in rows]
        y = [e["robust_fraction"] for e in rows]
        lo = [e["interval"][0] for e in rows]
        hi = [e["interval"][1] for e in rows]
        style = "--" if rows[0]["kind"] == "sweep" else "-"
        ax.plot(x, y, style, marker="o", ms=3, color=cmap(i % 20), label=fam)
        ax.fill_between(x, lo, hi, color=cmap(i % 20), alpha=0.15, linewidth=0)
    ax.axhline(p.accuracy["fraction"], color="k", linestyle=":", linewidth=1, label="clean accuracy")
    ax.set_xticks(range(1, LEVELS + 1))
    ax.set_xlabel("severity")
    ax.set_ylabel("robust fraction of all images")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{p.model.get('name')} on {p.dataset.get('spec')}: mean error {p.summary['mean_error']:.1%} "
                 "(solid: random families, robust over every draw; dashed: sweeps, correct at every level so far)",
                 fontsize=8)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def profile_markdown(p: Profile) -> str:
    lines = [f"# Robustness profile: {p.model.get('name')} on {p.dataset.get('spec')}", "",
             f"Clean accuracy {p.accuracy['fraction']:.2%} [{p.accuracy['interval'][0]:.2%}, "
             f"{p.accuracy['interval'][1]:.2%}] ({p.accuracy['count']}/{p.accuracy['of']}). Mean error "
             f"{p.summary['mean_error']:.2%} ({p.summary['what']}).", ""]
    for sk in p.summary.get("skipped", []):
        lines += [f"Not run: {sk['family']} ({sk['why']}).", ""]
    if "relative_mce" in p.summary:
        r = p.summary["relative_mce"]
        lines += [f"Relative mCE against {r['baseline_model']}: {r['value']:.3f} ({r['what']}).", ""]
    lines += ["| family | level | setting | robust | 95 % interval |", "|---|---|---|---|---|"]
    for e in p.entries:
        lines.append(f"| {e['family']} | {e['level']} | {e['setting']} | {e['robust_fraction']:.2%} "
                     f"({e['robust']}/{e['images']}) | [{e['interval'][0]:.2%}, {e['interval'][1]:.2%}] |")
    return "\n".join(lines) + "\n"


def profile_html(p: Profile, png: bytes) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(e['family'])}</td><td>{e['level']}</td><td>{esc(e['setting'])}</td>"
        f"<td>{e['robust_fraction']:.2%} ({e['robust']}/{e['images']})</td>"
        f"<td>[{e['interval'][0]:.2%}, {e['interval'][1]:.2%}]</td></tr>" for e in p.entries)
    mce = ""
    if "relative_mce" in p.summary:
        r = p.summary["relative_mce"]
        mce = f"<p>Relative mCE against {esc(str(r['baseline_model']))}: {r['value']:.3f}</p>"
    title = f"Robustness profile: {p.model.get('name')} on {p.dataset.get('spec')}"
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:62em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style></head><body>"
            f"<h1>{esc(title)}</h1><p>Clean accuracy {p.accuracy['fraction']:.2%}; mean error "
            f"{p.summary['mean_error']:.2%} ({esc(p.summary['what'])}).</p>{mce}"
            f"<img alt=\"robust fraction against severity for each family\" "
            f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
            "<table><thead><tr><th>family</th><th>level</th><th>setting</th><th>robust</th><th>95 % interval</th>"
            f"</tr></thead><tbody>{rows}</tbody></table></body></html>\n")


def write_profile(p: Profile, folder: Path) -> None:
    buf = io.BytesIO()
    plot_profile(p).savefig(buf, format="png", dpi=110)
    png = buf.getvalue()
    write_bytes_atomic(folder / "profile.png", png)
    write_bytes_atomic(folder / "profile.md", profile_markdown(p).encode())
    write_bytes_atomic(folder / "profile.html", profile_html(p, png).encode())
    write_json_atomic(folder / "profile.json", p.to_dict())  # last: the completion marker
