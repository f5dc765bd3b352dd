"""The pictures of one evaluation: the paper's Figures 1-5 for any model and dataset.

* ``survival.png``: fraction of images not yet fooled after each step (Figures 3 and 5);
* ``per_class.png``: robust / fooled / wrong-before-noise images per class (Figure 4);
* ``examples.png``: robust images above fragile ones that were correct before noise (Figure 1);
* ``failure.png``: an original beside its first failing perturbation (Figure 2);
* ``failure_probability.png``: the per-image failure probabilities and the most fragile images' exact intervals.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state): each ``plot_*`` function returns its
figure (a notebook shows it) and, given a path, also writes it atomically as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pyrobust.data.dataset import Dataset, class_names
from pyrobust.engine.loop import perturbed_image
from pyrobust.escape import figure_text
from pyrobust.files import atomic_path
from pyrobust.store.results import REPORT_FILES, noise_of
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the package
    from matplotlib.figure import Figure


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)




def save_figure(fig: Figure, path: Path | None) -> Figure:
    """Write ``fig`` to ``path`` as PNG, atomically (nothing when ``path`` is None); return ``fig``."""
    if path is not None:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return fig


def show_image(ax, img: np.ndarray) -> None:
    """Draw a float (H, W, C) image in [0, 1] on ``ax``, without ticks."""
    if img.shape[2] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _label_text(k: int, names: list[str]) -> str:
    if k == NONFINITE:
        return "non-finite"
    return figure_text(names[k]) if 0 <= k < len(names) else str(k)


def plot_survival(summary: dict, path: Path | None = None, *,
                  curves: dict[str, list[float]] | None = None, bands: bool = True) -> Figure:
    """One curve, or several (``curves``: name -> fractions) on the same axes. A single curve is drawn with its
    95 % bands (``bands``): pointwise Clopper-Pearson (dark) and simultaneous DKW (light), recomputed from the
    curve and the number of images."""
    from pyrobust.stats import curve_bands

    single = curves is None
    curves = curves or {summary["model"].get("name", "model"): summary["survival"]["fraction"]}
    curves = {figure_text(name): frac for name, frac in curves.items()}
    fig = _figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    if single and bands:
        frac = next(iter(curves.values()))
        b = curve_bands(frac, int(summary["metrics"]["images"]))
        x = np.arange(len(frac))
        ax.fill_between(x, b["simultaneous"]["lower"], b["simultaneous"]["upper"], step="post", color="#1f77b4",
                        alpha=0.12, lw=0, label="95% simultaneous band (DKW)")
        ax.fill_between(x, b["pointwise"]["lower"], b["pointwise"]["upper"], step="post", color="#1f77b4",
                        alpha=0.3, lw=0, label="95% pointwise (Clopper-Pearson)")
    for name, frac in curves.items():
        ax.step(np.arange(len(frac)), frac, where="post", label=f"{name}: {frac[-1]:.1%} robust")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of images not yet fooled")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, len(next(iter(curves.values()))) - 1)
    s = noise_of(summary)
    ax.set_title(f"{figure_text(summary['dataset']['spec'])}: {s.noise_name}, {s.mode}, seed {s.seed}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    # below the axes: a curve can pass through any corner of them (a fragile model's runs along the bottom)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3 if single and bands else min(3, len(curves)),
              fontsize=8, frameon=False)
    return save_figure(fig, path)


def _plot_first_severity(summary: dict, path: Path | None) -> Figure:
    """A severity sweep has no failure probabilities (nothing in it is random): how many images first fail at each
    severity, and how many survive them all."""
    sev = summary["severity"]
    fig = _figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    labels = [f"{lv['severity']}" + (f"\n{lv['setting']}" if lv.get("setting") else "") for lv in sev["levels"]]
    counts = [lv["first_failing"] for lv in sev["levels"]]
    ax.bar(range(len(counts)), counts, color="#c44e52")
    ax.bar([len(counts)], [sev["survive_all"]], color="#4c72b0")
    ax.set_xticks(range(len(counts) + 1), [*labels, "survive all"], fontsize=7)
    ax.set_ylabel("images")
    ax.set_title(f"{noise_of(summary).noise_name}: first failing severity ({sev['correct']} correctly classified "
                 "images; a sweep has no failure probability)", fontsize=8)
    return save_figure(fig, path)


def plot_failure_probability(outcome: Outcome, summary: dict, path: Path | None = None, *,
                             listed: int = 20) -> Figure:
    """Left: how the per-image failure probabilities p̂ are spread (correctly classified images); right: the most
    fragile images with their exact 95 % intervals."""
    from pyrobust.stats import failure_interval, failure_probability

    if noise_of(summary).is_sweep:
        return _plot_first_severity(summary, path)
    max_steps = noise_of(summary).max_steps
    p = failure_probability(outcome.first_failure, outcome.failures, max_steps)
    lo, hi = failure_interval(outcome.first_failure, outcome.failures, max_steps)
    ok = ~np.isnan(p)
    fig = _figure(figsize=(9.6, 3.8))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    never = int(np.count_nonzero(p[ok] == 0))
    pos = p[ok][p[ok] > 0]
    if pos.size:
        edges = np.logspace(np.log10(max(pos.min(), 1 / max_steps) * 0.9), 0, 30)
        left.hist(pos, bins=edges, color="#e76f51")
        left.set_xscale("log")
    bound = 1 - 0.05 ** (1 / max_steps)
    how = "failures / probes" if outcome.failures is not None else "1 / first-failure step"
    left.set_title(f"p̂ per image ({how}); {never} of {int(ok.sum())} never failed: p ≤ {bound:.2%} at 95%",
                   fontsize=8)
    left.set_xlabel("estimated failure probability per step")
    left.set_ylabel("images")
    order = np.flatnonzero(ok)[np.lexsort((outcome.index[ok], -p[ok]))][:listed]
    order = order[p[order] > 0]
    y = np.arange(order.size)
    right.errorbar(p[order], y, xerr=[p[order] - lo[order], hi[order] - p[order]], fmt="o", ms=3, color="#264653",
                   ecolor="#8ab17d", capsize=2)
    right.set_yticks(y, [f"#{int(outcome.index[i])}" for i in order], fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("failure probability, exact 95% interval")
    right.set_title(f"the {order.size} most fragile images", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


PLOTTED_CLASSES = 40  # more bars than this are unreadable: the least robust classes are shown


def plot_per_class(summary: dict, path: Path | None = None) -> Figure:
    rows = summary["per_class"]
    shown_note = ""
    if len(rows) > PLOTTED_CLASSES:
        rows = sorted((r for r in rows if r["images"]), key=lambda r: (r["robust_rate"], r["class"]))[:PLOTTED_CLASSES]
        rows.sort(key=lambda r: r["class"])
        shown_note = f"; the {len(rows)} least robust of {len(summary['per_class'])} classes"
    names = [figure_text(r["name"]) for r in rows]
    robust = np.array([r["robust"] for r in rows])
    fooled = np.array([r["fooled"] for r in rows])
    wrong = np.array([r["images"] - r["correct"] for r in rows])
    x = np.arange(len(rows))
    fig = _figure(figsize=(max(6.4, 0.6 * len(rows)), 4.0))
    ax = fig.subplots()
    ax.bar(x, robust, color="#2a9d8f", label="robust (never fooled)")
    ax.bar(x, fooled, bottom=robust, color="#e76f51", label="fooled by noise")
    ax.bar(x, wrong, bottom=robust + fooled, color="#adb5bd", label="wrong before noise")
    for xi, r in zip(x, rows, strict=True):
        if r["images"]:
            ax.text(float(xi), r["images"], f"{r['robust_rate']:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=30 if max(len(n) for n in names) > 2 else 0, fontsize=8)
    ax.set_ylabel("images")
    ax.set_ylim(0, max(1, max(r["images"] for r in rows)) * 1.08)  # room for the rate labels
    ax.set_title(f"robust images per class ({figure_text(summary['dataset']['spec'])}; % = robust rate{shown_note})",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_examples(outcome: Outcome, dataset: Dataset, names: list[str], path: Path | None = None, *,
                  per_row: int = 8) -> Figure:
    robust = np.flatnonzero(outcome.first_failure == ROBUST)[:per_row]
    fooled = np.flatnonzero(outcome.first_failure > 0)
    fragile = fooled[np.argsort(outcome.first_failure[fooled], kind="stable")][:per_row]
    fig = _figure(figsize=(1.3 * per_row, 3.4))
    axes = fig.subplots(2, per_row, squeeze=False)
    for row, (title, picks) in enumerate((("robust", robust), ("fragile", fragile))):
        for col in range(per_row):
            ax = axes[row, col]
            if col >= picks.size:
                ax.axis("off")
                continue
            i = int(picks[col])
            show_image(ax, dataset.float_images(i, i + 1)[0])
            label = _label_text(int(outcome.label[i]), names)
            if row == 0:
                ax.set_title(f"#{outcome.index[i]} {label}", fontsize=7)
            else:
                ax.set_title(f"#{outcome.index[i]} {label}\nstep {outcome.first_failure[i]}: "
                             f"{_label_text(int(outcome.failure_label[i]), names)}", fontsize=7)
        axes[row, 0].set_ylabel(title)
        if picks.size == 0:
            axes[row, 0].axis("on")
            axes[row, 0].set_xticks([])
            axes[row, 0].set_yticks([])
            axes[row, 0].text(0.05, 0.5, f"no {title} images", fontsize=8, transform=axes[row, 0].transAxes)
    fig.suptitle("robust images (top) and fragile ones fooled earliest (bottom)", fontsize=9)
    return save_figure(fig, path)


def plot_failure(outcome: Outcome, dataset: Dataset, spec: NoiseSpec, names: list[str], path: Path | None = None,
                 *, position: int | None = None) -> Figure:
    """The image at ``position`` (default: the one fooled earliest) beside its first failing input."""
    fooled = np.flatnonzero(outcome.first_failure > 0)
    fig = _figure(figsize=(7.2, 2.8))
    axes = fig.subplots(1, 3)
    if position is None and fooled.size == 0:
        for ax in axes:
            ax.axis("off")
        axes[1].text(0.5, 0.5, "no image was fooled by the noise", ha="center", va="center")
        return save_figure(fig, path)
    i = int(fooled[np.argmin(outcome.first_failure[fooled])]) if position is None else int(position)
    original = dataset.float_images(i, i + 1)[0]
    step = int(outcome.first_failure[i])
    noisy = perturbed_image(original, index=int(outcome.index[i]), step=step, spec=spec)
    changed = np.any(noisy != original, axis=2).astype(np.float32)[..., None]
    show_image(axes[0], original)
    axes[0].set_title(f"original #{outcome.index[i]}\nlabel {_label_text(int(outcome.label[i]), names)}", fontsize=8)
    show_image(axes[1], noisy)
    axes[1].set_title(f"step {step} ({int(changed.sum())} pixels changed)\nmodel says "
                      f"{_label_text(int(outcome.failure_label[i]), names)}", fontsize=8)
    show_image(axes[2], changed)
    axes[2].set_title("changed pixels", fontsize=8)
    return save_figure(fig, path)


def plot_replay(r, path: Path | None = None) -> Figure:
    """An original beside its rebuilt input at the replayed step (a :class:`~pyrobust.replay.Replay`)."""
    fig = _figure(figsize=(4.8, 2.6))
    a, b = fig.subplots(1, 2)
    show_image(a, r.original)
    a.set_title(f"#{r.index} label {r.label}", fontsize=8)
    show_image(b, r.perturbed)
    b.set_title(f"step {r.step}: model {r.prediction if r.prediction is not None else r.recorded_label}", fontsize=8)
    return save_figure(fig, path)


def write_report(out: Path, outcome: Outcome, summary: dict, dataset: Dataset) -> list[Path]:
    spec = noise_of(summary)
    names = class_names(dataset.name, len(summary["per_class"]), dataset.classes)
    plot_survival(summary, out / "survival.png")
    plot_per_class(summary, out / "per_class.png")
    plot_examples(outcome, dataset, names, out / "examples.png")
    plot_failure(outcome, dataset, spec, names, out / "failure.png")
    plot_failure_probability(outcome, summary, out / "failure_probability.png")
    return [out / f for f in REPORT_FILES]
