"""The pictures of one evaluation: the paper's Figures 1-5 for any model and dataset.

* ``survival.png``: fraction of images not yet fooled after each step (Figures 3 and 5);
* ``per_class.png``: robust / fooled / wrong-before-noise images per class (Figure 4);
* ``examples.png``: robust images above fragile ones that were correct before noise (Figure 1);
* ``failure.png``: an original beside its first failing perturbation (Figure 2).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state) and written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pyrobust.datasets import Dataset
from pyrobust.replay import perturbed_image
from pyrobust.results import atomic_path, class_names
from pyrobust.types import NONFINITE, ROBUST, NoiseSpec, Outcome

REPORT_FILES = ("survival.png", "per_class.png", "examples.png", "failure.png")


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _show(ax, img: np.ndarray) -> None:
    if img.shape[2] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _label_text(k: int, names: list[str]) -> str:
    if k == NONFINITE:
        return "non-finite"
    return names[k] if 0 <= k < len(names) else str(k)


def plot_survival(summary: dict, path: Path, *, curves: dict[str, list[float]] | None = None) -> None:
    """One curve, or several (``curves``: name -> fractions) on the same axes."""
    curves = curves or {summary["model"].get("name", "model"): summary["survival"]["fraction"]}
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name, frac in curves.items():
        ax.step(np.arange(len(frac)), frac, where="post", label=f"{name}: {frac[-1]:.1%} robust")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of images not yet fooled")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, len(next(iter(curves.values()))) - 1)
    s = summary["settings"]
    ax.set_title(f"{summary['dataset']['spec']}: {s['pixels']} pixels, {s['scheme']}, {s['mode']}, seed {s['seed']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_per_class(summary: dict, path: Path) -> None:
    rows = summary["per_class"]
    names = [r["name"] for r in rows]
    robust = np.array([r["robust"] for r in rows])
    fooled = np.array([r["fooled"] for r in rows])
    wrong = np.array([r["images"] - r["correct"] for r in rows])
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.4, 0.6 * len(rows)), 4.0))
    ax = fig.subplots()
    ax.bar(x, robust, color="#2a9d8f", label="robust (never fooled)")
    ax.bar(x, fooled, bottom=robust, color="#e76f51", label="fooled by noise")
    ax.bar(x, wrong, bottom=robust + fooled, color="#adb5bd", label="wrong before noise")
    for xi, r in zip(x, rows, strict=True):
        if r["images"]:
            ax.text(xi, r["images"], f"{r['robust_rate']:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=30 if max(len(n) for n in names) > 2 else 0, fontsize=8)
    ax.set_ylabel("images")
    ax.set_ylim(0, max(1, max(r["images"] for r in rows)) * 1.08)  # room for the rate labels
    ax.set_title(f"robust images per class ({summary['dataset']['spec']}; % = robust rate)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def plot_examples(outcome: Outcome, dataset: Dataset, names: list[str], path: Path, *, per_row: int = 8) -> None:
    robust = np.flatnonzero(outcome.first_failure == ROBUST)[:per_row]
    fooled = np.flatnonzero(outcome.first_failure > 0)
    fragile = fooled[np.argsort(outcome.first_failure[fooled], kind="stable")][:per_row]
    fig = Figure(figsize=(1.3 * per_row, 3.4))
    axes = fig.subplots(2, per_row, squeeze=False)
    for row, (title, picks) in enumerate((("robust", robust), ("fragile", fragile))):
        for col in range(per_row):
            ax = axes[row, col]
            if col >= picks.size:
                ax.axis("off")
                continue
            i = int(picks[col])
            _show(ax, dataset.float_images(i, i + 1)[0])
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
    _save(fig, path)


def plot_failure(outcome: Outcome, dataset: Dataset, spec: NoiseSpec, names: list[str], path: Path) -> None:
    fooled = np.flatnonzero(outcome.first_failure > 0)
    fig = Figure(figsize=(7.2, 2.8))
    axes = fig.subplots(1, 3)
    if fooled.size == 0:
        for ax in axes:
            ax.axis("off")
        axes[1].text(0.5, 0.5, "no image was fooled by the noise", ha="center", va="center")
        _save(fig, path)
        return
    i = int(fooled[np.argmin(outcome.first_failure[fooled])])
    original = dataset.float_images(i, i + 1)[0]
    step = int(outcome.first_failure[i])
    noisy = perturbed_image(original, index=int(outcome.index[i]), step=step, spec=spec)
    changed = np.any(noisy != original, axis=2).astype(np.float32)[..., None]
    _show(axes[0], original)
    axes[0].set_title(f"original #{outcome.index[i]}\nlabel {_label_text(int(outcome.label[i]), names)}", fontsize=8)
    _show(axes[1], noisy)
    axes[1].set_title(f"step {step} ({int(changed.sum())} pixels changed)\nmodel says "
                      f"{_label_text(int(outcome.failure_label[i]), names)}", fontsize=8)
    _show(axes[2], changed)
    axes[2].set_title("changed pixels", fontsize=8)
    _save(fig, path)


def write_report(out: Path, outcome: Outcome, summary: dict, dataset: Dataset) -> list[Path]:
    spec = NoiseSpec.from_dict(summary["settings"])
    names = class_names(dataset.name, len(summary["per_class"]))
    plot_survival(summary, out / "survival.png")
    plot_per_class(summary, out / "per_class.png")
    plot_examples(outcome, dataset, names, out / "examples.png")
    plot_failure(outcome, dataset, spec, names, out / "failure.png")
    return [out / f for f in REPORT_FILES]
