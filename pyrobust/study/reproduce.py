"""``pyrobust reproduce``: the paper's study end to end, resumable stage by stage.

1. train M on the training split and export it to ONNX;
2. evaluate M on the test split and 3. on the training split;
4. select robust training images, class-balanced; 5. retrain the same architecture with the same settings (M_R);
6. evaluate M_R on the test split;
7. the control the paper lacks: M_rand, trained on a random class-balanced subset of the same size and evaluated the
   same way, separating the effect of *robust* selection from that of *less data*;
8. optionally (``schemes``) M's test robustness under salt-and-pepper values and the random-walk mode;
9. the report (``report.md``, ``report.html``, ``report.json`` and figures), built only from the files above.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pyrobust.data.dataset import DataSelection, Dataset
from pyrobust.data.load import load_npz, load_selected
from pyrobust.engine.plan import RunOptions
from pyrobust.errors import InvalidInput, ResumeMismatch
from pyrobust.files import make_out_dir, write_json_atomic
from pyrobust.store.results import RESULTS_FILE, SUMMARY_FILE, load_results
from pyrobust.store.rundir import RunLock
from pyrobust.store.stages import StageRunner, file_sha256
from pyrobust.study.report import StudyLayout, read_operating_point, write_study_report
from pyrobust.study.selection import PER_CLASS, SHORTFALLS, random_subset, read_selection, select_robust, write_subset
from pyrobust.types import NoiseSpec
from pyrobust.validate import Choice, Constraint, Fraction, Integer, Number, check_fields, declare

QUICK = {"train_sample": 600, "test_sample": 300, "max_steps": 20, "epochs": 2, "per_class": 20}
RETRAIN_FROM = ("scratch", "finetune")
RETRAIN_BUDGETS = ("epochs", "updates")
OPERATING_POINT_IMAGES = 1000
SCHEME_VARIANTS = (("salt-pepper", "restart"), ("uniform", "cumulative"), ("salt-pepper", "cumulative"))


STUDY_CONSTRAINTS: dict[str, Constraint] = {
    "retrain_from": Choice(RETRAIN_FROM),
    "retrain_budget": Choice(RETRAIN_BUDGETS),
    "target_robust": Fraction(lo_open=True, hi_open=True, none=True, hint=", e.g. 0.30"),
    "shortfall": Choice(SHORTFALLS),
    "per_class": PER_CLASS,
    "epochs": Integer(1),
    "train_batch_size": Integer(1),
    "eval_batch_size": Integer(1, words=("auto",)),
    "learning_rate": Number(0, lo_open=True),
    "seed": Integer(0),
    "data_seed": Integer(0),
    "train_sample": Integer(1, none=True),
    "test_sample": Integer(1, none=True),
}


@dataclass(frozen=True)
class StudyConfig:
    dataset: str  # mnist, fashion-mnist, or a folder of MNIST-named IDX files
    data_dir: str | None = None
    per_class: int = 1500
    shortfall: str = "all"
    architecture: str = "cnn"
    epochs: int = 10
    train_batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0  # training: initialisation, shuffling, the robust selection and the random subset
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    data_seed: int = 0  # which images --train-sample / --test-sample take: fixed across training seeds
    eval_batch_size: int | str = "auto"
    threads: int | None = None
    scheduler: str | None = None  # Dask: local:N or tcp://HOST:PORT, for every evaluation
    train_sample: int | None = None  # a seeded random subset (the MNIST training subset is sorted by label)
    test_sample: int | None = None
    schemes: bool = False
    quick: bool = False
    retrain_from: str = "scratch"  # scratch: M_R and M_rand start fresh; finetune: both start from M's weights
    retrain_budget: str = "epochs"  # epochs: as many passes as M; updates: as many Adam steps as M took
    target_robust: float | None = None  # find the --pixels at which M is about this robust, and study there

    def __post_init__(self) -> None:
        check_fields(self, STUDY_CONSTRAINTS)

    @classmethod
    def quick_config(cls, dataset: str, **kwargs) -> StudyConfig:
        """A few hundred images and few steps: the whole pipeline in well under two minutes."""
        noise = replace(kwargs.pop("noise", NoiseSpec()), max_steps=QUICK["max_steps"])
        base = {k: QUICK[k] for k in ("train_sample", "test_sample", "epochs", "per_class")}
        return cls(dataset=dataset, noise=noise, quick=True, **{**base, **kwargs})

    def selection(self, sample: int | None) -> DataSelection:
        """Which images of a split the study takes: a seeded ``sample`` of them (``data_seed``), or all."""
        return DataSelection(data_dir=self.data_dir, sample=sample, sample_seed=self.data_seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise"] = self.noise.to_dict()
        return d


declare("StudyConfig", STUDY_CONSTRAINTS, lambda **kw: StudyConfig(**{"dataset": "mnist", **kw}))


def find_operating_point(model: Path, ds: Dataset, spec: NoiseSpec, target: float, *, seed: int = 0,
                         images: int = OPERATING_POINT_IMAGES, threads: int | None = None, log=None) -> dict:
    """The smallest ``pixels`` at which ``model`` is at most ``target`` robust on a seeded sample of ``images`` of
    ``ds`` (the other noise settings as in ``spec``): a binary search over 1 .. H·W, robustness falling as more
    pixels change. Returns the pixels, the robust fraction there and every point tried."""
    from pyrobust.evaluation import evaluate

    sub = ds.select(sample=min(images, ds.n), sample_seed=seed)
    h, w, _ = ds.image_shape
    tried: dict[int, float] = {}

    def robust(p: int) -> float:
        if p not in tried:
            tried[p] = evaluate(model, sub, noise=replace(spec, pixels=p), threads=threads, sessions=1,
                                report=False).robust_fraction
            if log:
                log(f"{p} pixels: {tried[p]:.1%} robust")
        return tried[p]

    lo, hi = 1, h * w
    if robust(hi) > target:
        raise InvalidInput(f"M is {tried[hi]:.1%} robust even with all {hi} pixels changing every step; no pixel "
                           f"count reaches {target:.0%}: choose a higher target or other noise values")
    while lo < hi:
        mid = (lo + hi) // 2
        if robust(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return {"target": target, "pixels": lo, "robust": robust(lo), "images": sub.n, "seed": seed,
            "tried": [{"pixels": p, "robust": r} for p, r in sorted(tried.items())]}


def _split(config: StudyConfig, split: str, sample: int | None) -> Dataset:
    return load_selected(f"{config.dataset}:{split}", config.selection(sample))


def reproduce(config: StudyConfig, out: str | os.PathLike, *, log: Callable[[str], None] | None = None,
              progress_factory: Callable[[str], object] | None = None) -> dict:
    """Run (or resume) the study into ``out``; return the report as a dict (also written to ``report.json``).

    The paper's recipe, stage by stage; each stage is resumable and skipped when its inputs are unchanged."""
    study = _Study(config, make_out_dir(out), log or (lambda line: None), progress_factory)
    with RunLock(study.root):
        m = study.train("M", study.train_ds)
        if config.target_robust is not None:
            study.find_operating_point(m)
        study.evaluate("M", m, study.test_ds)
        study.evaluate("M", m, study.train_ds)
        robust = study.select_robust()
        m_r = study.retrain("M_R", robust, like=m, what=f"retrain on the robust subset ({robust.n} images)")
        study.evaluate("M_R", m_r, study.test_ds)
        control = study.select_random(robust)
        m_rand = study.retrain("M_rand", control, like=m,
                               what=f"train the control on the random subset ({control.n} images)")
        study.evaluate("M_rand", m_rand, study.test_ds)
        if config.schemes:
            for scheme, mode in SCHEME_VARIANTS:
                study.evaluate("M", m, study.test_ds, scheme=scheme, mode=mode)
        return study.report()


class _Study:
    """The stages of one study in its folder: the data, the noise (moved to the operating point when one is
    found) and the stage runner that skips what is already done."""

    def __init__(self, config: StudyConfig, root: Path, log: Callable[[str], None], progress_factory) -> None:
        self.config, self.root, self.log, self.progress_factory = config, root, log, progress_factory
        self.train_ds = _split(config, "train", config.train_sample)
        self.test_ds = _split(config, "test", config.test_sample)
        self.spec = config.noise
        self.runner = StageRunner(root, log)
        self.layout = StudyLayout(root)
        for d in (self.layout.models, self.layout.evals, self.layout.select):
            d.mkdir(exist_ok=True)

    def _train_settings(self) -> dict:
        c = self.config
        return {"architecture": c.architecture, "epochs": c.epochs, "seed": c.seed, "batch_size": c.train_batch_size,
                "learning_rate": c.learning_rate}

    def train(self, name: str, ds: Dataset) -> Path:
        """Train ``name`` from scratch on ``ds`` (the paper's M)."""
        from pyrobust.training import train

        out_model, settings = self.layout.model(name), self._train_settings()
        n_classes = max(self.train_ds.n_classes, self.test_ds.n_classes)

        def fn(start_over):
            train(ds, out=out_model, n_classes=n_classes, threads=self.config.threads,
                  log=lambda line: self.log(f"  {line}"), **settings)

        self.runner.run(f"train_{name}", f"train {name} ({self.config.architecture}) on {ds.spec} ({ds.n} images)",
                        inputs={"data_sha256": ds.sha256, "images": ds.n, **settings}, outputs=[out_model], fn=fn)
        return out_model

    def retrain(self, name: str, ds: Dataset, *, like: Path, what: str) -> Path:
        """Train ``name`` on ``ds`` with ``like``'s recorded settings (M_R on the robust subset, M_rand on the
        control), from scratch or fine-tuned, for as many epochs or updates as the configuration says."""
        from pyrobust.training import retrain

        c, out_model, settings = self.config, self.layout.model(name), self._train_settings()

        def fn(start_over):
            retrain(ds, like=like, out=out_model, threads=c.threads, log=lambda line: self.log(f"  {line}"),
                    finetune=c.retrain_from == "finetune", same_updates=c.retrain_budget == "updates")

        self.runner.run(f"train_{name}", what,
                        inputs={"data_sha256": ds.sha256, "images": ds.n, **settings,
                                "retrain_from": c.retrain_from, "retrain_budget": c.retrain_budget,
                                "like_sha256": file_sha256(like)},
                        outputs=[out_model], fn=fn)
        return out_model

    def find_operating_point(self, m: Path) -> None:
        """The pixels at which M is about ``target_robust`` robust; every later evaluation runs there."""
        c, point_file = self.config, self.layout.operating_point
        target = float(c.target_robust)  # type: ignore[arg-type]  # the caller checked it is set

        def fn(start_over):
            point = find_operating_point(m, self.test_ds, self.spec, target, seed=c.data_seed, threads=c.threads,
                                         log=lambda line: self.log(f"  {line}"))
            write_json_atomic(point_file, point)

        self.runner.run("operating_point", f"find the pixels at which M is about {target:.0%} robust",
                        inputs={"model_sha256": file_sha256(m), "data_sha256": self.test_ds.sha256,
                                "noise": self.spec.to_dict(), "target": c.target_robust},
                        outputs=[point_file], fn=fn)
        point = read_operating_point(point_file)
        self.spec = replace(self.spec, pixels=int(point["pixels"]))
        self.log(f"  operating point: {point['pixels']} pixels ({point['robust']:.1%} robust on "
                 f"{point['images']} test images)")

    def evaluate(self, name: str, model: Path, ds: Dataset, *, scheme: str | None = None,
                 mode: str | None = None) -> None:
        """The protocol for ``model`` on ``ds`` (with another noise ``scheme`` / ``mode`` for the variants)."""
        from pyrobust.evaluation import evaluate

        c = self.config
        spec = replace(self.spec, scheme=scheme or self.spec.scheme, mode=mode or self.spec.mode)
        split = "train" if ds is self.train_ds else "test"
        folder = self.layout.eval(f"{name}-{split}" + (f"-{scheme}-{mode}" if scheme else ""))
        title = f"evaluate {name} on {ds.spec}" + (f" ({ds.n} images)" if name == "M" and not scheme else "") + \
            (f" with {scheme} values, {mode} mode" if scheme else "")
        data = c.selection(c.train_sample if split == "train" else c.test_sample)
        options = RunOptions(batch_size=c.eval_batch_size, scheduler=c.scheduler, threads=c.threads)

        def fn(start_over):
            # By spec, not by Dataset object, so the results record how to reload the data (replay, select).
            progress = self.progress_factory(title) if self.progress_factory else None

            def run(*, resume: bool, overwrite: bool) -> None:
                evaluate(model, ds.spec, noise=spec, data=data, options=options, out=folder, progress=progress,
                         resume=resume, overwrite=overwrite)

            try:
                run(resume=not start_over, overwrite=start_over)
            except ResumeMismatch:  # a checkpoint or result of other inputs: start this stage over
                run(resume=False, overwrite=True)

        stage = f"eval_{name}_{split}" + (f"_{scheme}_{mode}" if scheme else "")
        self.runner.run(stage, title, inputs={"model_sha256": file_sha256(model), "data_sha256": ds.sha256,
                                              "noise": spec.to_dict()},
                        outputs=[folder / SUMMARY_FILE, folder / RESULTS_FILE], fn=fn)

    def select_robust(self) -> Dataset:
        """The robust images of M's training-set evaluation, ``per_class`` of each class (the paper: 1500)."""
        c, robust_npz, results = self.config, self.layout.subset("robust"), self.layout.eval("M-train")

        def fn(start_over):
            outcome, summary = load_results(results)
            sel = select_robust(outcome, per_class=c.per_class, seed=c.seed, shortfall=c.shortfall,
                                n_classes=len(summary["per_class"]))
            write_subset(robust_npz, self.train_ds, sel.positions,
                         {"kind": "robust", "per_class": sel.per_class, "seed": sel.seed, "shortfall": sel.shortfall,
                          "table": sel.table, "source": {"results": "eval/M-train", "dataset": summary["dataset"]}})
            for row in sel.table:
                if row["taken"] == 0:
                    self.log(f"  warning: class {row['class']} has no robust training images: M_R and M_rand will "
                             "never see it (a higher --target-robust, fewer --pixels or more training data gives it "
                             "some)")
                elif row["taken"] < row["asked"]:
                    self.log(f"  class {row['class']}: {row['available']} robust images, {row['asked']} asked, "
                             f"{row['taken']} taken")

        self.runner.run("select_robust", f"select robust training images ({c.per_class} per class)",
                        inputs={"results_sha256": file_sha256(results / RESULTS_FILE), "per_class": c.per_class,
                                "seed": c.seed, "shortfall": c.shortfall},
                        outputs=[robust_npz, robust_npz.with_suffix(".json")], fn=fn)
        return load_npz(robust_npz, name="robust-subset")

    def select_random(self, robust: Dataset) -> Dataset:
        """The control: as many random training images of each class as the robust subset holds."""
        c, random_npz = self.config, self.layout.subset("random")
        counts = {row["class"]: row["taken"] for row in read_selection(self.layout.subset("robust"))["table"]}

        def fn(start_over):
            positions = random_subset(self.train_ds.labels, counts, seed=c.seed)
            write_subset(random_npz, self.train_ds, positions,
                         {"kind": "random", "seed": c.seed, "counts": {str(k): v for k, v in counts.items()},
                          "source": {"dataset": {"spec": self.train_ds.spec, "sha256": self.train_ds.sha256}}})

        self.runner.run("select_random", "draw the random class-balanced control subset (same size per class)",
                        inputs={"data_sha256": self.train_ds.sha256, "counts": counts, "seed": c.seed},
                        outputs=[random_npz, random_npz.with_suffix(".json")], fn=fn)
        return load_npz(random_npz, name="random-subset")

    def report(self) -> dict:
        self.log("[report] writing report.md, report.html and report.json")
        return write_study_report(self.root, config=self.config.to_dict(), stages=self.runner.records,
                                  test_spec=self.test_ds.spec, train_spec=self.train_ds.spec)
