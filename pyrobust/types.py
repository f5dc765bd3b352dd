"""The small vocabulary shared by the whole package: the perturbation spec and the per-image result.

Sentinels, per image:

* ``first_failure == -1`` (``ROBUST``): never fooled within ``max_steps``; ``failure_label`` is then -1 too.
* ``first_failure == 0``: wrong on the clean image, never perturbed; ``failure_label`` is the clean prediction.
* ``failure_label == -2`` / ``clean_prediction == -2`` (``NONFINITE``): the model's output held NaN or infinity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from perturbcore import NONFINITE, ROBUST, SCHEMES
from perturbcore.families import LEVELS, Family, parse
from pyrobust.errors import InvalidInput
from pyrobust.validate import Choice, Constraint, Integer, Number, check_fields, declare

MODES = ("restart", "cumulative")
PAPER_PIXELS = 28
PAPER_MAX_STEPS = 250
MAX_STEPS_LIMIT = 100_000
# Pixels are in [0, 1]; noise values and normalisation far outside these bounds overflow float32 inputs (a std of
# 1e-50 turns every pixel into infinity) and can only be mistakes.
VALUE_LIMIT = 1e6
PIXEL_COUNTS = ("fixed", "random")
STD_MIN = 1e-6  # the survival curve has max_steps + 1 points in summary.json and the figures

__all__ = ["MODES", "NONFINITE", "ROBUST", "SCHEMES", "FailureTarget", "NoiseSpec", "Outcome", "RunRecord", "RunState",
           "differences"]


def pixel_share(text: str) -> float | None:
    """``"3.5%"`` -> 0.035; None unless a percentage in (0, 100]."""
    text = text.strip()
    if not text.endswith("%"):
        return None
    try:
        v = float(text[:-1])
    except ValueError:
        return None
    return v / 100 if math.isfinite(v) and 0 < v <= 100 else None


def percent(x: float) -> str:
    """0.01 -> "1%", 0.995 -> "99.5%"."""
    return f"{x * 100:.4g}%"


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


NOISE_CONSTRAINTS: dict[str, Constraint] = {
    "max_steps": Integer(1, MAX_STEPS_LIMIT, hint=f"(the paper uses {PAPER_MAX_STEPS})"),
    "scheme": Choice(SCHEMES),
    "mode": Choice(MODES),
    "seed": Integer(0, 2**64 - 1),
    "pixel_range": Choice((1, 255), none=True, hint="(1: pixels in [0, 1]; 255: pixels in [0, 255])"),
    "pixel_count": Choice(PIXEL_COUNTS),
    "step_offset": Integer(0, MAX_STEPS_LIMIT, hint="(0: the probes are steps 1..max_steps)"),
}


@dataclass(frozen=True)
class NoiseSpec:
    """How images are perturbed and for how long. Defaults are the paper's (28 pixels, 250 steps, values in [0, 1))."""

    pixels: int | str = PAPER_PIXELS  # a count, or a share of the image such as "3.5%" (resolved per dataset)
    max_steps: int = PAPER_MAX_STEPS
    low: float = 0.0
    high: float = 1.0
    scheme: str = "uniform"
    mode: str = "restart"
    seed: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # The pixel range the model expects: 1 ([0, 1]) or 255 ([0, 255]); images and noise values are scaled to it.
    # None: decided by the model (its pyrobust metadata, or 255 for an integer input, else 1).
    pixel_range: int | None = None
    # fixed: every step changes ``pixels`` draws; random: a count uniform in 1..pixels per step (the paper's "at most")
    pixel_count: str = "fixed"
    # Integer noise values, for a model with an integer input (uint8 pixels): never set by hand, the model decides.
    integer: bool = field(default=False, metadata={"derived": True})
    # Keep probing a correctly classified image through all max_steps steps and count its failing steps (the
    # first-failure step stays): an exact per-image failure probability instead of a censored yes/no.
    count_failures: bool = False
    # A noise family other than the paper's L0 noise (``gaussian:sigma=0.1``; :mod:`perturbcore.families`), or
    # None for the L0 noise that pixels, scheme, low, high and pixel_count describe.
    corruption: Family | None = None
    # The probes are steps step_offset+1 .. step_offset+max_steps of the (seed, image, step) draws: a later block of
    # the same draws (a sequential test continues where its last look stopped, fresh draws and none repeated).
    step_offset: int = 0

    def __post_init__(self) -> None:
        self._check_corruption()
        if isinstance(self.pixels, str):
            share = pixel_share(self.pixels)
            if share is None:
                raise InvalidInput(f"pixels must be an integer >= 1 or a share of the image such as 3.5%; got "
                                   f"{self.pixels!r}")
        elif not is_int(self.pixels) or self.pixels < 1:
            raise InvalidInput(f"pixels must be an integer >= 1 or a share of the image such as 3.5%; got "
                               f"{self.pixels!r}")
        check_fields(self, NOISE_CONSTRAINTS)
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise InvalidInput(f"noise values need finite low < high; got low={self.low}, high={self.high}")
        if max(abs(self.low), abs(self.high)) > VALUE_LIMIT:
            raise InvalidInput(f"noise values must lie within ±{VALUE_LIMIT:g} (pixels are in [0, 1]); got low="
                               f"{self.low}, high={self.high}")
        if (self.mean is None) != (self.std is None):
            raise InvalidInput("normalisation needs both mean and std (one value per channel), or neither")
        if self.mean is not None:
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std or ())
            if len(mean) != len(std) or not mean:
                raise InvalidInput(f"mean and std need one value per channel each; got {len(mean)} and {len(std)}")
            if not all(math.isfinite(v) and abs(v) <= VALUE_LIMIT for v in mean) or \
                    not all(math.isfinite(v) and STD_MIN <= v <= VALUE_LIMIT for v in std):
                raise InvalidInput(f"mean must be within ±{VALUE_LIMIT:g} and std in [{STD_MIN:g}, {VALUE_LIMIT:g}] "
                                   f"(e.g. 0.1307 and 0.3081 for MNIST); got mean={list(mean)}, std={list(std)}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        if not isinstance(self.count_failures, (bool, np.bool_)):
            raise InvalidInput(f"count_failures must be true or false; got {self.count_failures!r}")
        object.__setattr__(self, "count_failures", bool(self.count_failures))
        if self.integer and self.mean is not None:
            raise InvalidInput("a model with an integer input takes raw pixel values: mean and std cannot apply")
        object.__setattr__(self, "step_offset", int(self.step_offset))
        if self.step_offset and (self.mode == "cumulative" or self.is_sweep):
            raise InvalidInput("step_offset continues the independent draws of a restart noise; "
                               + ("the random walk's steps build on each other" if self.mode == "cumulative"
                                  else "a severity sweep's steps are its severities") + ": leave it at 0")
        object.__setattr__(self, "integer", bool(self.integer))
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if not isinstance(self.pixels, str):
            object.__setattr__(self, "pixels", int(self.pixels))
        object.__setattr__(self, "max_steps", int(self.max_steps))
        object.__setattr__(self, "seed", int(self.seed))

    def _check_corruption(self) -> None:
        c = self.corruption
        if c is None:
            return
        if isinstance(c, str):
            try:
                c = parse(c)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            object.__setattr__(self, "corruption", c)
        if not isinstance(c, Family):
            raise InvalidInput(f"corruption must be a noise family such as 'gaussian:sigma=0.1'; got "
                               f"{type(c).__name__}")
        l0 = [k for k, default in L0_DEFAULTS.items() if getattr(self, k) != default]
        if l0:
            raise InvalidInput(f"{', '.join(l0)} set the L0 noise; the {c.name} noise has its own parameters "
                               f"({c.text()}): leave {', '.join(l0)} unset")
        if self.mode != "restart":
            raise InvalidInput(f"the random walk (mode=cumulative) is the L0 noise's; every step of the {c.name} "
                               "noise starts again from the original image: use mode=restart")
        if c.kind == "sweep":  # its steps are its severities
            if self.max_steps == PAPER_MAX_STEPS:
                object.__setattr__(self, "max_steps", LEVELS)
            elif self.max_steps != LEVELS:
                raise InvalidInput(f"{c.name} is a severity sweep: its {LEVELS} steps are its {LEVELS} severities, "
                                   f"so max_steps is {LEVELS}; got {self.max_steps}")

    @property
    def is_sweep(self) -> bool:
        """A deterministic corruption run by severity: step s is severity s, nothing is random, so there is no
        per-step failure probability (an image's first-failure step is its first failing severity)."""
        return self.corruption is not None and self.corruption.kind == "sweep"

    @property
    def noise_name(self) -> str:
        """The noise in one phrase: ``gaussian:sigma=0.1``, or ``28 pixels, uniform`` for the paper's L0 noise."""
        if self.corruption is not None:
            return self.corruption.text()
        return f"{self.pixels} pixels, {self.scheme}"

    def for_image(self, height: int, width: int) -> NoiseSpec:
        """This spec with a share of the image (``pixels="3.5%"``) resolved to a count for ``height``×``width``
        images: the share of the pixel positions, rounded up (3.5 % of 784 is 28, the paper's)."""
        if not isinstance(self.pixels, str):
            return self
        share = pixel_share(self.pixels)
        assert share is not None

        return replace(self, pixels=max(1, math.ceil(share * height * width - 1e-9)))

    @property
    def scale(self) -> int:
        """The pixel range in force (1 until a model decides otherwise)."""
        return self.pixel_range or 1

    def to_dict(self) -> dict:
        """As recorded in summaries and fingerprints. The pixel-range fields appear only when they differ from what
        every earlier pyrobust did ([0, 1], float values), so earlier records still compare equal."""
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        if self.pixel_range == 1:
            del d["pixel_range"]
        if not self.integer:
            del d["integer"]
        if self.pixel_count == "fixed":
            del d["pixel_count"]
        if not self.count_failures:
            del d["count_failures"]
        if not self.step_offset:
            del d["step_offset"]
        if self.corruption is None:
            del d["corruption"]
        else:
            d["corruption"] = self.corruption.text()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSpec:
        """A recorded spec (missing pixel-range fields: the [0, 1] float values every earlier record means)."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if known.get(k) is not None:
                known[k] = tuple(known[k])
        if known.get("corruption") is not None and not isinstance(known["corruption"], str):
            raise InvalidInput(f"corruption must be written as text such as 'gaussian:sigma=0.1'; got "
                               f"{known['corruption']!r}")
        known.setdefault("pixel_range", 1)
        return cls(**known)


declare("NoiseSpec", NOISE_CONSTRAINTS, NoiseSpec)
# The L0 noise's own settings at their defaults: what a spec with another noise family must leave them at.
L0_DEFAULTS = {"pixels": PAPER_PIXELS, "scheme": "uniform", "low": 0.0, "high": 1.0, "pixel_count": "fixed"}


TARGET_CONSTRAINTS: dict[str, Constraint] = {
    "max_failure_prob": Number(0, 0.5, lo_open=True, hi_open=True, kind="a probability", hint="(e.g. 0.01 or 1%)"),
    "confidence": Number(0.5, 1, hi_open=True, kind="a confidence", hint="(e.g. 0.95 or 95%)"),
}


@dataclass(frozen=True)
class FailureTarget:
    """A step budget chosen from what it must show: an image never fooled in that many steps has per-step failure
    probability at most ``max_failure_prob`` at ``confidence`` (one-sided, exact); ``familywise``: for every image
    of the evaluated set at once (Bonferroni over the set, the same budget Holm's procedure needs)."""

    max_failure_prob: float
    confidence: float = 0.95
    familywise: bool = False

    def __post_init__(self) -> None:
        check_fields(self, TARGET_CONSTRAINTS)
        if not isinstance(self.familywise, (bool, np.bool_)):
            raise InvalidInput(f"familywise must be true or false; got {self.familywise!r}")

    def steps(self, images: int) -> int:
        from pyrobust.stats import steps_for_bound

        steps = steps_for_bound(self.max_failure_prob, self.confidence, images if self.familywise else 1)
        if steps > MAX_STEPS_LIMIT:
            raise InvalidInput(f"showing p <= {percent(self.max_failure_prob)} at {percent(self.confidence)}"
                               f"{f' for each of {images} images' if self.familywise else ''} needs {steps:,} steps, "
                               f"more than the {MAX_STEPS_LIMIT:,} allowed: ask for a larger max_failure_prob")
        return steps

    def record(self, images: int) -> dict:
        steps = self.steps(images)
        over = f" for every one of the {images:,} images at once" if self.familywise else " for each image"
        return {"max_failure_prob": self.max_failure_prob, "confidence": self.confidence,
                "familywise": bool(self.familywise), "images": int(images), "max_steps": steps,
                "claim": f"an image never fooled in {steps} steps has a per-step failure probability <= "
                         f"{percent(self.max_failure_prob)} at {percent(self.confidence)} confidence{over}"}


declare("FailureTarget", TARGET_CONSTRAINTS, lambda **kw: FailureTarget(**{"max_failure_prob": 0.01, **kw}))


@dataclass(frozen=True)
class Outcome:
    """Per-image results of one evaluation, aligned with ``index`` (the images' original dataset indices)."""

    index: np.ndarray  # int64 (n,)
    label: np.ndarray  # int64 (n,)
    clean_prediction: np.ndarray  # int32 (n,)
    first_failure: np.ndarray  # int32 (n,): -1 robust, 0 wrong before noise, s >= 1 fooled at step s
    failure_label: np.ndarray  # int32 (n,): prediction at the first failure; -1 if robust
    inferences: int = 0
    noisy_inferences: int = 0
    seconds: float = 0.0
    # int32 (n,): failing steps among the max_steps probes of each image (runs with count_failures; else None)
    failures: np.ndarray | None = None
    # float64 (n,): clean score of the label minus the best other score (NaN: non-finite output, or not recorded)
    clean_margin: np.ndarray | None = None

    ARRAYS = ("index", "label", "clean_prediction", "first_failure", "failure_label")
    OPTIONAL = ("failures", "clean_margin")

    def take(self, positions) -> Outcome:
        """The outcome of the images at ``positions`` (counters kept)."""
        arrays: dict = {k: getattr(self, k)[positions].copy() for k in self.ARRAYS}
        for k in self.OPTIONAL:
            arrays[k] = None if getattr(self, k) is None else getattr(self, k)[positions].copy()
        return replace(self, **arrays)

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    @property
    def correct(self) -> np.ndarray:
        return self.first_failure != 0

    @property
    def robust(self) -> np.ndarray:
        return self.first_failure == ROBUST


class RunState:
    """The per-image results of a run as it goes, plus which images are finished.

    The engine marks an image ``done`` only after its results are written, so a state saved at any moment holds
    only final results; an image in flight when a run stops is simply evaluated again on resume, and because its
    noise depends only on (seed, index, step) it gets exactly the same result.
    """

    def __init__(self, n: int) -> None:
        self.clean_prediction = np.full(n, ROBUST, np.int32)
        self.first_failure = np.full(n, ROBUST, np.int32)
        self.failure_label = np.full(n, ROBUST, np.int32)
        self.failures = np.zeros(n, np.int32)
        self.clean_margin = np.full(n, np.nan)
        self.done = np.zeros(n, np.bool_)
        self.inferences = 0
        self.noisy_inferences = 0
        self.seconds = 0.0
        self.sessions = 0

    ARRAYS = ("clean_prediction", "first_failure", "failure_label", "failures", "done")

    @property
    def n(self) -> int:
        return int(self.done.shape[0])

    @property
    def n_done(self) -> int:
        return int(np.count_nonzero(self.done))

    def outcome(self, dataset, *, counted: bool = False) -> Outcome:
        """The outcome of every image (``counted``: the run counted failures, so ``failures`` is part of it)."""
        return Outcome(index=dataset.index.copy(), label=dataset.labels.copy(),
                       clean_prediction=self.clean_prediction.copy(), first_failure=self.first_failure.copy(),
                       failure_label=self.failure_label.copy(), inferences=self.inferences,
                       noisy_inferences=self.noisy_inferences, seconds=self.seconds,
                       failures=self.failures.copy() if counted else None, clean_margin=self.clean_margin.copy())


@dataclass(frozen=True)
class RunRecord:
    """A finished run read back (:func:`pyrobust.load_results`): the per-image ``outcome``, its ``noise``, what
    was evaluated (``model``, ``dataset``: as in summary.json) and the whole ``summary``. Unpacks as
    ``outcome, summary = load_results(folder)``."""

    outcome: Outcome
    noise: NoiseSpec
    model: dict
    dataset: dict
    summary: dict
    folder: Path | None = None

    def __iter__(self):
        return iter((self.outcome, self.summary))

    def __getitem__(self, i: int):
        return (self.outcome, self.summary)[i]

    @property
    def images_total(self) -> int:
        """Images the run was planned over (a precision run may have stopped before all of them)."""
        return int((self.summary.get("precision") or {}).get("images_total", self.dataset["count"]))

    @property
    def fingerprint(self) -> dict:
        return fingerprint(model_sha256=self.model["sha256"], dataset_sha256=self.dataset["sha256"],
                           count=self.images_total, spec=self.noise.to_dict())


_FINGERPRINT_PARTS = ("model", "data", "count", "noise")
FINGERPRINT_VERSION = 1


def fingerprint(*, model_sha256: str, dataset_sha256: str, count: int, spec: dict) -> dict:
    """What must not change between an interrupted run and its resumption (batch size and threads may)."""
    return {"version": FINGERPRINT_VERSION, "model_sha256": model_sha256, "dataset_sha256": dataset_sha256,
            "count": int(count), "spec": spec}


# Settings that change what a run records but not the per-image first failures: runs that differ only in them are
# paired image by image (compare, agreement, a gate's saved baseline); a resume must still match them.
PAIRING_IGNORES = ("count_failures",)


def differences(a: dict, b: dict, *, compare: tuple[str, ...] = _FINGERPRINT_PARTS,
                ignore: tuple[str, ...] = ()) -> list[str]:
    """What differs between two run fingerprints (:func:`fingerprint`), one phrase per field, in
    the words a refusal uses: ``the model changed (SHA-256 …)``, ``pixels 28 → 10``. ``compare`` picks the parts:
    ``model``, ``data``, ``count`` and ``noise``; ``ignore`` names noise fields left out (:data:`PAIRING_IGNORES`
    to pair runs image by image)."""
    out = []
    if a.get("version") != b.get("version"):
        return [f"checkpoint format {a.get('version')!r}, this pyrobust writes {b.get('version')!r}"]
    for part, key, label in (("model", "model_sha256", "the model"), ("data", "dataset_sha256", "the data")):
        if part in compare and a.get(key) != b.get(key):
            out.append(f"{label} changed (SHA-256 {str(a.get(key))[:12]}… → {str(b.get(key))[:12]}…)")
    if "count" in compare and a.get("count") != b.get("count") and not out:
        out.append(f"image count {a.get('count')} → {b.get('count')}")
    if "noise" in compare:
        old, new = a.get("spec") or {}, b.get("spec") or {}
        for key in sorted(set(old) | set(new)):
            if key not in ignore and old.get(key) != new.get(key):
                out.append(f"{key} {old.get(key)!r} → {new.get(key)!r}")
    return out
