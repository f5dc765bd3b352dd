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

from pyrobust.data.dataset import Dataset
from pyrobust.data.load import load_dataset, load_npz
from pyrobust.errors import InvalidInput, ResumeMismatch
from pyrobust.files import make_out_dir, write_json_atomic
from pyrobust.store.results import RESULTS_FILE, SUMMARY_FILE, load_results
from pyrobust.store.rundir import RunLock
from pyrobust.store.stages import StageRunner, file_sha256
from pyrobust.study.report import StudyLayout, read_operating_point
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
        noise = kwargs.pop("noise", NoiseSpec())
        noise = NoiseSpec(**{**noise.to_dict(), "max_steps": QUICK["max_steps"],
                             "mean": noise.mean, "std": noise.std})
        base = {k: QUICK[k] for k in ("train_sample", "test_sample", "epochs", "per_class")}
        return cls(dataset=dataset, noise=noise, quick=True, **{**base, **kwargs})

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
    return load_dataset(f"{config.dataset}:{split}", data_dir=config.data_dir, sample=sample,
                        sample_seed=config.data_seed)


def reproduce(config: StudyConfig, out: str | os.PathLike, *, log: Callable[[str], None] | None = None,
              progress_factory: Callable[[str], object] | None = None) -> dict:
    """Run (or resume) the study into ``out``; return the report as a dict (also written to ``report.json``)."""
    from pyrobust.evaluation import evaluate
    from pyrobust.study.report import write_study_report
    from pyrobust.training import retrain, train

    log = log or (lambda line: None)
    root = make_out_dir(out)
    train_ds = _split(config, "train", config.train_sample)
    test_ds = _split(config, "test", config.test_sample)
    spec = config.noise
    noise = spec.to_dict()
    with RunLock(root):
        runner = StageRunner(root, log)
        layout = StudyLayout(root)
        for d in (layout.models, layout.evals, layout.select):
            d.mkdir(exist_ok=True)

        def train_stage(name, title, ds: Dataset, out_model: Path, like: Path | None, extra_inputs: dict):
            settings = {"architecture": config.architecture, "epochs": config.epochs, "seed": config.seed,
                        "batch_size": config.train_batch_size, "learning_rate": config.learning_rate}

            def fn(start_over):
                if like is None:
                    train(ds, out=out_model, n_classes=max(train_ds.n_classes, test_ds.n_classes),
                          threads=config.threads, log=lambda line: log(f"  {line}"), **settings)
                else:
                    retrain(ds, like=like, out=out_model, threads=config.threads, log=lambda line: log(f"  {line}"),
                            finetune=config.retrain_from == "finetune", same_updates=config.retrain_budget == "updates")

            how = {} if like is None else {"retrain_from": config.retrain_from, "retrain_budget": config.retrain_budget}
            runner.run(name, title, inputs={"data_sha256": ds.sha256, "images": ds.n, **settings, **how,
                                            **extra_inputs},
                       outputs=[out_model], fn=fn)

        def eval_stage(name, title, model: Path, ds: Dataset, folder: Path, scheme=None, mode=None):
            sp = {**noise, **({"scheme": scheme} if scheme else {}), **({"mode": mode} if mode else {})}
            sample = config.train_sample if ds is train_ds else config.test_sample

            def fn(start_over):
                # By spec, not by Dataset object, so the results record how to reload the data (replay, select).
                kwargs = dict(data_dir=config.data_dir, sample=sample, sample_seed=config.data_seed,
                              batch_size=config.eval_batch_size, scheduler=config.scheduler,
                              threads=config.threads, out=folder,
                              progress=progress_factory(title) if progress_factory else None, **sp)
                try:
                    evaluate(model, ds.spec, resume=not start_over, overwrite=start_over, **kwargs)
                except ResumeMismatch:  # a checkpoint or result of other inputs: start this stage over
                    evaluate(model, ds.spec, overwrite=True, **kwargs)

            runner.run(name, title, inputs={"model_sha256": file_sha256(model), "data_sha256": ds.sha256,
                                            "noise": sp},
                       outputs=[folder / SUMMARY_FILE, folder / RESULTS_FILE], fn=fn)

        m = layout.model("M")
        train_stage("train_M", f"train M ({config.architecture}) on {train_ds.spec} ({train_ds.n} images)", train_ds,
                    m, None, {})
        if config.target_robust is not None:
            point_file = layout.operating_point

            def point_fn(start_over):
                point = find_operating_point(m, test_ds, spec, float(config.target_robust), seed=config.data_seed,
                                             threads=config.threads, log=lambda line: log(f"  {line}"))
                write_json_atomic(point_file, point)

            runner.run("operating_point", f"find the pixels at which M is about {config.target_robust:.0%} robust",
                       inputs={"model_sha256": file_sha256(m), "data_sha256": test_ds.sha256, "noise": noise,
                               "target": config.target_robust}, outputs=[point_file], fn=point_fn)
            point = read_operating_point(point_file)
            spec = replace(spec, pixels=int(point["pixels"]))
            noise = spec.to_dict()  # every evaluation below runs at the operating point
            log(f"  operating point: {point['pixels']} pixels ({point['robust']:.1%} robust on "
                f"{point['images']} test images)")
        eval_stage("eval_M_test", f"evaluate M on {test_ds.spec} ({test_ds.n} images)", m, test_ds,
                   layout.eval("M-test"))
        eval_stage("eval_M_train", f"evaluate M on {train_ds.spec} ({train_ds.n} images)", m, train_ds,
                   layout.eval("M-train"))

        robust_npz = layout.subset("robust")

        def select_fn(start_over):
            outcome, summary = load_results(layout.eval("M-train"))
            sel = select_robust(outcome, per_class=config.per_class, seed=config.seed, shortfall=config.shortfall,
                                n_classes=len(summary["per_class"]))
            write_subset(robust_npz, train_ds, sel.positions,
                         {"kind": "robust", "per_class": sel.per_class, "seed": sel.seed, "shortfall": sel.shortfall,
                          "table": sel.table, "source": {"results": "eval/M-train", "dataset": summary["dataset"]}})
            for row in sel.table:
                if row["taken"] == 0:
                    log(f"  warning: class {row['class']} has no robust training images: M_R and M_rand will never "
                        "see it (a higher --target-robust, fewer --pixels or more training data gives it some)")
                elif row["taken"] < row["asked"]:
                    log(f"  class {row['class']}: {row['available']} robust images, {row['asked']} asked, "
                        f"{row['taken']} taken")

        runner.run("select_robust", f"select robust training images ({config.per_class} per class)",
                   inputs={"results_sha256": file_sha256(layout.eval("M-train") / RESULTS_FILE),
                           "per_class": config.per_class, "seed": config.seed, "shortfall": config.shortfall},
                   outputs=[robust_npz, robust_npz.with_suffix(".json")], fn=select_fn)
        robust_ds = load_npz(robust_npz, name="robust-subset")
        m_r = layout.model("M_R")
        train_stage("train_M_R", f"retrain on the robust subset ({robust_ds.n} images)", robust_ds, m_r, m,
                    {"like_sha256": file_sha256(m)})
        eval_stage("eval_M_R_test", f"evaluate M_R on {test_ds.spec}", m_r, test_ds, layout.eval("M_R-test"))

        random_npz = layout.subset("random")
        counts = {row["class"]: row["taken"] for row in read_selection(robust_npz)["table"]}

        def random_fn(start_over):
            positions = random_subset(train_ds.labels, counts, seed=config.seed)
            write_subset(random_npz, train_ds, positions,
                         {"kind": "random", "seed": config.seed, "counts": {str(k): v for k, v in counts.items()},
                          "source": {"dataset": {"spec": train_ds.spec, "sha256": train_ds.sha256}}})

        runner.run("select_random", "draw the random class-balanced control subset (same size per class)",
                   inputs={"data_sha256": train_ds.sha256, "counts": counts, "seed": config.seed},
                   outputs=[random_npz, random_npz.with_suffix(".json")], fn=random_fn)
        random_ds = load_npz(random_npz, name="random-subset")
        m_rand = layout.model("M_rand")
        train_stage("train_M_rand", f"train the control on the random subset ({random_ds.n} images)", random_ds,
                    m_rand, m, {"like_sha256": file_sha256(m)})
        eval_stage("eval_M_rand_test", f"evaluate M_rand on {test_ds.spec}", m_rand, test_ds,
                   layout.eval("M_rand-test"))

        if config.schemes:
            for scheme, mode in SCHEME_VARIANTS:
                eval_stage(f"eval_M_test_{scheme}_{mode}", f"evaluate M on {test_ds.spec} with {scheme} values, "
                           f"{mode} mode", m, test_ds, layout.eval(f"M-test-{scheme}-{mode}"), scheme=scheme,
                           mode=mode)

        log("[report] writing report.md, report.html and report.json")
        return write_study_report(root, config=config.to_dict(), stages=runner.records,
                                  test_spec=test_ds.spec, train_spec=train_ds.spec)
