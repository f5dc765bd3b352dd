"""The report of a ``reproduce`` study, built only from the files the study wrote.

``report.json`` gathers every number from the evaluations' ``summary.json`` and ``results.npz``, the selection's
``robust.json`` and ``stages.json``; ``report.md`` and ``report.html`` render that same JSON (the HTML with the figures
inline), so the prose can never disagree with the data.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pyrobust.errors import DataError
from pyrobust.escape import figure_text, html_text, md_cell, md_prose
from pyrobust.files import read_run_file, write_bytes_atomic, write_json_atomic
from pyrobust.machine import versions
from pyrobust.report import plot_survival, save_figure
from pyrobust.store.results import load_results
from pyrobust.types import NONFINITE, is_int

PAPER = {"accuracy": {"M": 0.9885, "M_R": 0.9692}, "robust": {"M": 0.2957, "M_R": 0.5101}}
MODELS = (("M", "M-test", "train_M"), ("M_R", "M_R-test", "train_M_R"), ("M_rand", "M_rand-test", "train_M_rand"))


class StudyLayout:
    """Where a study's files are: the one description ``reproduce`` writes to and the report reads from."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.evals = self.root / "eval"
        self.select = self.root / "select"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.onnx"

    def eval(self, folder: str) -> Path:
        return self.evals / folder

    def subset(self, kind: str) -> Path:
        """``robust`` or ``random``: the selected training images (``.npz``; its table beside it as ``.json``)."""
        return self.select / f"{kind}.npz"

    @property
    def operating_point(self) -> Path:
        return self.root / "operating_point.json"
REPORT_SCHEMA = 1
_POINT_KEYS = {"target", "pixels", "robust", "images", "seed", "tried"}


def _fraction(v) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool) and 0 <= v <= 1


def _count(v, low: int = 0) -> bool:
    return is_int(v) and v >= low


def _is_point(d) -> bool:
    if not (isinstance(d, dict) and set(d) == _POINT_KEYS and _fraction(d["target"]) and _fraction(d["robust"])
            and _count(d["pixels"], 1) and _count(d["images"], 1) and _count(d["seed"])):
        return False
    tried = d["tried"]
    if not (isinstance(tried, list) and all(isinstance(t, dict) and set(t) == {"pixels", "robust"}
                                            and _count(t["pixels"], 1) and _fraction(t["robust"]) for t in tried)):
        return False
    pixels = [t["pixels"] for t in tried]
    return pixels == sorted(set(pixels)) and {"pixels": d["pixels"], "robust": d["robust"]} in tried


def read_operating_point(path: Path) -> dict:
    """``operating_point.json`` as written by ``reproduce --target-robust``, read back as untrusted input: exactly
    its keys, a target and robust fractions in [0, 1], a positive pixel count that is one of the points tried, and
    the tried points in increasing pixel order."""
    fix = "delete the study folder's operating_point.json and rerun reproduce"
    try:
        d = json.loads(read_run_file(path, what="operating point", max_bytes=1 << 20))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not _is_point(d):
        raise DataError(f"{path} is not an operating point pyrobust wrote (keys {sorted(_POINT_KEYS)}, fractions "
                        f"in [0, 1], the chosen pixels among those tried); {fix}")
    return d


def flip_matrix(first_failure: np.ndarray, labels: np.ndarray, failure_label: np.ndarray, n_classes: int) -> list:
    """counts[true class][class at first failure] over images fooled by noise; the last column counts
    non-finite outputs."""
    m = np.zeros((n_classes, n_classes + 1), np.int64)
    fooled = first_failure > 0
    for y, f in zip(labels[fooled], failure_label[fooled], strict=True):
        m[int(y), n_classes if f == NONFINITE else int(f)] += 1
    return m.tolist()


def _rate(r: dict) -> dict:
    return {"fraction": r["fraction"], "ci95": r["ci95"], "count": r["count"], "of": r["of"]}


def _paired_change(a, b) -> dict:
    """Change from model ``a`` to model ``b`` on the same test images with the same noise draws: robust fraction and
    accuracy, each with Newcombe's paired 95 % interval (images lost and gained)."""
    from pyrobust.stats import paired_difference_interval, paired_ratio_difference

    out = {}
    for what, fa, fb in (("robust", a.robust, b.robust), ("accuracy", a.correct, b.correct)):
        both, lost, gained = int((fa & fb).sum()), int((fa & ~fb).sum()), int((~fa & fb).sum())
        diff, lo, hi = paired_difference_interval(both, gained, lost, int(fa.size) - both - lost - gained)
        out[what] = {"change": diff, "ci95": [lo, hi], "lost": lost, "gained": gained}
    change, lo, hi = paired_ratio_difference(a.robust, a.correct, b.robust, b.correct)
    out["robust_of_correct"] = {"change": change, "ci95": [lo, hi],
                                "method": "paired percentile bootstrap over images"}
    return out


def conclusion(rep: dict) -> str:
    """One paragraph that says what the table shows, read from the numbers (no prose decided in advance)."""
    if rep.get("quick"):
        return ("This was a quick run (a few hundred images, two epochs, few steps): it checks that the pipeline "
                "works end to end. Its numbers are not results; models this small and briefly trained sit near "
                "chance level.")
    pr, pc = rep["paired"]["M_rand->M_R"]["robust"], rep["paired"]["M->M_R"]["robust"]

    def verdict(r: dict, more: str, less: str) -> str:
        lo, hi = r["ci95"]
        if lo > 0:
            return more
        if hi < 0:
            return less
        return "no different, within the interval,"

    vs_rand = verdict(pr, "more robust than", "less robust than")
    vs_m = verdict(pc, "more robust than", "less robust than")
    return (f"Retrained on robust images, M_R is {vs_m} M on the test images (robust fraction "
            f"{100 * pc['change']:+.2f} points, paired 95 % interval [{100 * pc['ci95'][0]:+.2f}, "
            f"{100 * pc['ci95'][1]:+.2f}]), and {vs_rand} the control M_rand trained on a random subset of the same "
            f"size ({100 * pr['change']:+.2f} points [{100 * pr['ci95'][0]:+.2f}, {100 * pr['ci95'][1]:+.2f}]). "
            "The control separates the effect of selecting robust images from the effect of training on fewer "
            "images. These intervals cover the sampling of test images and noise for these trained networks; they "
            "do not cover training randomness, which only runs with several training seeds can measure.")


def gather(root: Path, *, config: dict, stages: dict, test_spec: str, train_spec: str) -> dict:
    models = {}
    flips = {}
    outcomes = {}
    for name, folder, train_stage in MODELS:
        outcome, s = load_results(StudyLayout(root).eval(folder))
        outcomes[name] = outcome
        k = len(s["per_class"])
        models[name] = {
            "results": f"eval/{folder}",
            "model_sha256": s["model"]["sha256"],
            "train_images": stages[train_stage]["inputs"]["images"],
            "accuracy": _rate(s["metrics"]["accuracy"]),
            "robust": _rate(s["metrics"]["robust"]),
            "robust_of_correct": _rate(s["metrics"]["robust_of_correct"]),
            "per_class_robust_rate": [r["robust_rate"] for r in s["per_class"]],
            "survival": s["survival"]["fraction"],
        }
        flips[name] = flip_matrix(outcome.first_failure, outcome.label, outcome.failure_label, k)
    layout = StudyLayout(root)
    _, train_summary = load_results(layout.eval("M-train"))
    test_record = load_results(layout.eval("M-test"))
    test_summary, test_noise = test_record.summary, test_record.noise
    selection = json.loads(layout.subset("robust").with_suffix(".json").read_text())
    schemes = [{"scheme": test_noise.scheme, "mode": test_noise.mode,
                "results": "eval/M-test", "accuracy": _rate(test_summary["metrics"]["accuracy"]),
                "robust": _rate(test_summary["metrics"]["robust"]),
                "robust_of_correct": _rate(test_summary["metrics"]["robust_of_correct"])}]
    for scheme_folder in sorted(layout.evals.glob("M-test-*")):
        if (scheme_folder / "summary.json").exists():
            record = load_results(scheme_folder)
            s = record.summary
            schemes.append({"scheme": record.noise.scheme, "mode": record.noise.mode,
                            "results": f"eval/{scheme_folder.name}", "accuracy": _rate(s["metrics"]["accuracy"]),
                            "robust": _rate(s["metrics"]["robust"]),
                            "robust_of_correct": _rate(s["metrics"]["robust_of_correct"])})
    point = read_operating_point(layout.operating_point) if config.get("target_robust") is not None else None
    if point is not None and point["pixels"] != test_noise.pixels:
        raise DataError(f"{layout.operating_point} says {point['pixels']} pixels but eval/M-test ran with "
                        f"{test_noise.pixels}: the study folder was changed by hand; rerun reproduce")
    # uniform/restart (the paper's) first, then the other values, then the random walk
    schemes.sort(key=lambda r: (r["mode"] != "restart", r["scheme"] != "uniform"))
    return {
        "schema_version": REPORT_SCHEMA,
        "config": config,
        "datasets": {"train": {"spec": train_spec, **{k: train_summary["dataset"][k] for k in ("sha256", "count")}},
                     "test": {"spec": test_spec, **{k: test_summary["dataset"][k] for k in ("sha256", "count")}}},
        "noise": {k: v for k, v in test_noise.to_dict().items() if k not in ("mean", "std")},
        "paper": PAPER,
        "models": models,
        "train_under_M": {"accuracy": _rate(train_summary["metrics"]["accuracy"]),
                          "robust": _rate(train_summary["metrics"]["robust"]),
                          "per_class": [{"class": r["class"], "name": r["name"], "images": r["images"],
                                         "robust": r["robust"], "robust_rate": r["robust_rate"]}
                                        for r in train_summary["per_class"]]},
        "selection": {**{k: selection[k] for k in ("per_class", "seed", "shortfall", "table", "images")},
                      "empty_classes": [r["class"] for r in selection["table"] if r["taken"] == 0]},
        "flip_matrix": flips,
        "paired": {f"{a}->{b}": _paired_change(outcomes[a], outcomes[b]) for a, b in (("M", "M_R"), ("M_rand", "M_R"))},
        "quick": bool(config.get("quick")),
        "class_names": [r["name"] for r in test_summary["per_class"]],
        "schemes": schemes,
        "operating_point": point,
        "stages": [{"stage": name, "title": rec["title"], "seconds": rec["seconds"], "finished": rec["finished"]}
                   for name, rec in stages.items()],
        "versions": versions(),
    }


# --------------------------------------------------------------------------------------------------- rendering
def _pct(r: dict) -> str:
    if r["fraction"] is None:
        return "n/a"
    return f"{100 * r['fraction']:.2f} % [{100 * r['ci95'][0]:.2f}, {100 * r['ci95'][1]:.2f}]"


def blocks(rep: dict) -> list[tuple]:
    """The report as (kind, payload) blocks: ("h", level, text), ("p", text), ("table", header, rows),
    ("img", file, caption)."""
    cfg, noise, ms = rep["config"], rep["noise"], rep["models"]
    names = rep["class_names"]
    out: list[tuple] = [("h", 1, f"Robust training-set selection on {rep['datasets']['train']['spec'].split(':')[0]}")]
    quick = " (quick run: a few hundred images and few steps; not a result)" if cfg.get("quick") else ""
    out.append(("p", f"Noise: {noise['pixels']} pixels per step drawn with replacement, values "
                     f"{noise['scheme']} in [{noise['low']}, {noise['high']}), {noise['mode']} mode, up to "
                     f"{noise['max_steps']} steps, seed {noise['seed']}. Training: {cfg['architecture']}, "
                     f"{cfg['epochs']} epochs, batch {cfg['train_batch_size']}, Adam lr {cfg['learning_rate']}, seed "
                     f"{cfg['seed']}. Selection: {rep['selection']['per_class']} robust images per class "
                     f"(shortfall: {rep['selection']['shortfall']}).{quick}"))
    point = rep.get("operating_point")
    if point:
        tried = ", ".join(f"{t['pixels']} → {100 * t['robust']:.1f} %" for t in point["tried"])
        out.append(("p", f"Operating point: {point['pixels']} pixels, the smallest count at which M is at most "
                         f"{100 * point['target']:.0f} % robust on {point['images']} test images (seed "
                         f"{point['seed']}): {100 * point['robust']:.1f} % there. Binary search, pixels → robust: "
                         f"{tried}. Every evaluation of this study runs at that count."))
    out.append(("h", 2, "The paper's table"))
    rows = []
    for name, _, _ in MODELS:
        m = ms[name]
        rows.append([name, str(m["train_images"]), _pct(m["accuracy"]), _pct(m["robust"]),
                     _pct(m["robust_of_correct"])])
    out.append(("table", ["model", "training images", "test accuracy (95 % CI)", "robust, of all test images",
                          "robust, of correct ones"], rows))
    out.append(("p", "M: trained on the whole training split. M_R: the same architecture and settings retrained on "
                     "the robust subset. M_rand: the control, trained on a random class-balanced subset of the same "
                     "size. Paper (MNIST): accuracy 98.85 % → 96.92 %, robust 29.57 % → 51.01 %."))
    empty = rep["selection"].get("empty_classes") or []
    if empty:
        out.append(("p", f"**Warning:** {_classes(empty, names)} had no robust training images under M, so M_R and "
                         "M_rand (trained on the same number per class) never saw "
                         f"{'it' if len(empty) == 1 else 'them'} and cannot predict "
                         f"{'it' if len(empty) == 1 else 'them'}: their accuracy drop is, in part, these missing "
                         "classes. See Selection below."))
    out.append(("h", 2, "Paired comparisons on the test split"))
    out.append(("table", ["change", "robust, of all images (95 % CI)", "images lost / gained",
                          "robust, of correct images (95 % CI)", "accuracy (95 % CI)"],
                [[label, _change(rep["paired"][key]["robust"]),
                  f"{rep['paired'][key]['robust']['lost']} / {rep['paired'][key]['robust']['gained']}",
                  _change(rep["paired"][key]["robust_of_correct"]) if "robust_of_correct" in rep["paired"][key]
                  else "n/a", _change(rep["paired"][key]["accuracy"])]
                 for key, label in (("M->M_R", "M → M_R"), ("M_rand->M_R", "M_rand → M_R"))]))
    out.append(("p", "Both models of a pair saw the same test images with the same noise draws; the intervals of "
                     "shares of all images are Newcombe's paired intervals. A share of the correct images has a "
                     "denominator of its own per model (the images it classifies correctly), so its change gets a "
                     "paired bootstrap interval over the images; the two readings can differ widely when the "
                     "models' accuracies differ."))
    out.append(("h", 2, "Conclusion"))
    out.append(("p", conclusion(rep)))
    out.append(("img", "survival_test.png", "Survival curves on the test split (the paper's Figures 3 and 5)."))
    out.append(("h", 2, "Training set under M"))
    t = rep["train_under_M"]
    out.append(("p", f"Accuracy {_pct(t['accuracy'])}; robust {_pct(t['robust'])}."))
    out.append(("table", ["class", "images", "robust", "robust rate"],
                [[r["name"], str(r["images"]), str(r["robust"]),
                  "n/a" if r["robust_rate"] is None else f"{100 * r['robust_rate']:.2f} %"] for r in t["per_class"]]))
    out.append(("img", "per_class_train.png", "Robust images per class in the training set (Figure 4)."))
    out.append(("img", "examples_train.png", "Robust training images above fragile ones (Figure 1)."))
    out.append(("h", 2, "Selection"))
    out.append(("table", ["class", "asked", "available (robust)", "taken", "filled", "with replacement"],
                [[names[r["class"]], str(r["asked"]), str(r["available"]), str(r["taken"]), str(r["filled"]),
                  "yes" if r["replaced"] else "no"] for r in rep["selection"]["table"]]))
    out.append(("p", f"{rep['selection']['images']} images selected."))
    out.append(("h", 2, "Per-class robust rate on the test split"))
    out.append(("table", ["class", *[n for n, _, _ in MODELS]],
                [[names[k], *[("n/a" if ms[n]["per_class_robust_rate"][k] is None else
                               f"{100 * ms[n]['per_class_robust_rate'][k]:.2f} %") for n, _, _ in MODELS]]
                 for k in range(len(names))]))
    out.append(("img", "failure_test.png", "A test image and its first failing perturbation under M (Figure 2)."))
    out.append(("h", 2, "Flip matrices"))
    out.append(("p", "Images fooled by noise on the test split: true class (rows) → class at the first failure "
                     "(columns; nf = non-finite output)."))
    for n, _, _ in MODELS:
        out.append(("h", 3, n))
        out.append(("table", ["true \\ at failure", *names, "nf"],
                    [[names[k], *[str(v) for v in row]] for k, row in enumerate(rep["flip_matrix"][n])]))
    out.append(("img", "flip_matrix.png", "Flip matrices of M, M_R and M_rand on the test split."))
    out.append(("h", 2, "Scheme sensitivity (M on the test split)"))
    out.append(("table", ["values", "mode", "accuracy", "robust, of all test images", "robust, of correct ones"],
                [[s["scheme"], s["mode"], _pct(s["accuracy"]), _pct(s["robust"]),
                  _pct(s["robust_of_correct"]) if "robust_of_correct" in s else "n/a"] for s in rep["schemes"]]))
    if len(rep["schemes"]) == 1:
        out.append(("p", "Run with --schemes to add salt-and-pepper values and the random-walk mode."))
    out.append(("h", 2, "Stages and wall time"))
    out.append(("table", ["stage", "what", "seconds", "finished"],
                [[s["stage"], s["title"], f"{s['seconds']:.1f}", s["finished"]] for s in rep["stages"]]))
    out.append(("h", 2, "Provenance"))
    d = rep["datasets"]
    prov = [["training data", d["train"]["spec"], f"{d['train']['count']} images, SHA-256 {d['train']['sha256']}"],
            ["test data", d["test"]["spec"], f"{d['test']['count']} images, SHA-256 {d['test']['sha256']}"]]
    prov += [[f"model {n}", f"models/{n}.onnx", f"SHA-256 {ms[n]['model_sha256']}"] for n, _, _ in MODELS]
    prov += [["versions", "", ", ".join(f"{k} {v}" for k, v in rep["versions"].items())]]
    out.append(("table", ["what", "where", "identity"], prov))
    out.append(("p", "Every number above is read from report.json, which gathers eval/*/summary.json, "
                     "eval/*/results.npz, select/robust.json and stages.json."))
    return out


def _classes(ks: list[int], names: list[str]) -> str:
    label = [names[k] for k in ks]
    return ("class " + label[0]) if len(label) == 1 else "classes " + ", ".join(label)


def _change(r: dict) -> str:
    if r["change"] is None or r["change"] != r["change"]:  # None or NaN: an empty denominator
        return "n/a"
    return f"{100 * r['change']:+.2f} points [{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]"


def to_markdown(bl: list[tuple]) -> str:
    lines = []
    for b in bl:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + md_prose(b[2]), ""]
        elif b[0] == "p":
            lines += [md_prose(b[1]), ""]
        elif b[0] == "table":
            lines.append("| " + " | ".join(b[1]) + " |")
            lines.append("|" + "|".join("---" for _ in b[1]) + "|")
            lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in b[2]]
            lines.append("")
        elif b[0] == "img":
            lines += [f"![{md_cell(b[2])}]({b[1]})", "", f"*{md_prose(b[2])}*", ""]
    return "\n".join(lines)


def to_html(bl: list[tuple], root: Path) -> str:
    e = html_text  # every string: names from the config and the data are foreign
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pyrobust study</title><style>"
             "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .5em;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"]
    for b in bl:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2]]
            parts.append("</table>")
        elif b[0] == "img":
            data = base64.b64encode((root / b[1]).read_bytes()).decode()
            parts.append(f"<figure><img alt='{e(b[2])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{e(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def plot_flips(rep: dict, path: Path) -> None:
    names = [*(figure_text(x) for x in rep["class_names"]), "nf"]
    fig = Figure(figsize=(4.2 * len(MODELS), 4.0))
    axes = fig.subplots(1, len(MODELS), squeeze=False)[0]
    for ax, (n, _, _) in zip(axes, MODELS, strict=True):
        m = np.array(rep["flip_matrix"][n])
        ax.imshow(m, cmap="Reds")
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names) - 1), names[:-1], fontsize=6)
        ax.set_title(f"{n}: true → at first failure", fontsize=8)
    save_figure(fig, path)


def write_study_report(root: Path, *, config: dict, stages: dict, test_spec: str, train_spec: str) -> dict:
    rep = gather(root, config=config, stages=stages, test_spec=test_spec, train_spec=train_spec)
    _, test_summary = load_results(StudyLayout(root).eval("M-test"))
    plot_survival(test_summary, root / "survival_test.png",
                  curves={n: rep["models"][n]["survival"] for n, _, _ in MODELS})
    for src, dst in (("eval/M-train/per_class.png", "per_class_train.png"),
                     ("eval/M-train/examples.png", "examples_train.png"),
                     ("eval/M-test/failure.png", "failure_test.png")):
        shutil.copyfile(root / src, root / dst)
    plot_flips(rep, root / "flip_matrix.png")
    write_json_atomic(root / "report.json", rep)
    bl = blocks(rep)
    write_bytes_atomic(root / "report.md", to_markdown(bl).encode())
    write_bytes_atomic(root / "report.html", to_html(bl, root).encode())
    return rep

