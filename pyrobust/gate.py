"""``pyrobust gate``: decide whether a candidate model may be released, from statistical evidence.

Each threshold is checked with a confidence interval: it **passes** when the interval clears the threshold,
**fails** when the interval lies wholly on the wrong side, and is **inconclusive** otherwise.

* ``min_accuracy`` / ``min_robust`` / ``min_class_robust``: Wilson score intervals for the fraction of test images
  classified correctly / never fooled (overall, or within each class).
* ``max_robust_drop`` / ``max_accuracy_drop`` against a baseline: the drop ``baseline - candidate`` is measured on
  the *same* images with the *same* noise draws (the counter-based generator makes them identical), and its interval
  is Newcombe's hybrid score interval for paired proportions, which uses the agreement between the two models: a
  1-2 point regression is visible on 10,000 images when the models mostly agree.

**Sequential early stop.** Images are evaluated in a fixed random order (seeded), in growing batches; after each
batch every check is decided again and the run stops as soon as all are decided. The looks happen at sample sizes
fixed in advance (``look_schedule``: geometric, x1.5, from 2.5 % of the images), and each look uses confidence
``1 - alpha / K`` for ``K`` looks (Bonferroni over looks), so the chance that any look wrongly decides a check stays
below ``alpha`` whatever look the run stops at: the decisions are always valid. Intervals treat the test images as a
sample from the distribution the model will meet.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pyrobust.datasets import Dataset, load_dataset
from pyrobust.engine import bind_model, run_protocol
from pyrobust.errors import InvalidInput
from pyrobust.results import load_results, versions, write_bytes_atomic, write_json_atomic
from pyrobust.runtime import OnnxModel
from pyrobust.stats import images_to_settle, look_schedule, paired_difference_interval, wilson_interval, z_value
from pyrobust.types import ROBUST, NoiseSpec

GATE_SCHEMA = 1
VERDICTS = ("pass", "fail", "inconclusive")
GITHUB_SUMMARY_LIMIT = 1024 * 1024  # GitHub refuses a step summary over 1 MiB


@dataclass(frozen=True)
class GatePolicy:
    min_accuracy: float | None = None
    min_robust: float | None = None
    min_class_robust: float | None = None
    max_robust_drop: float | None = None
    max_accuracy_drop: float | None = None
    confidence: float = 0.95
    inconclusive: str = "fail"  # what an inconclusive check means for the exit code: fail or pass
    early_stop: bool = True

    THRESHOLDS = ("min_accuracy", "min_robust", "min_class_robust", "max_robust_drop", "max_accuracy_drop")

    def __post_init__(self) -> None:
        for name in self.THRESHOLDS:
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise InvalidInput(f"{name} must be a fraction in [0, 1] (e.g. 0.85 or 85%); got {v!r}")
        if not 0.5 <= self.confidence < 1:
            raise InvalidInput(f"confidence must be in [0.5, 1); got {self.confidence}")
        if self.inconclusive not in ("fail", "pass"):
            raise InvalidInput(f"inconclusive must be fail or pass; got {self.inconclusive!r}")
        if all(getattr(self, n) is None for n in self.THRESHOLDS):
            raise InvalidInput("the gate has nothing to check: give --min-accuracy, --min-robust, --min-class-robust, "
                               "or --baseline with --max-robust-drop / --max-accuracy-drop")

    @property
    def needs_baseline(self) -> bool:
        return self.max_robust_drop is not None or self.max_accuracy_drop is not None


@dataclass
class Check:
    name: str
    kind: str
    threshold: float
    value: float
    interval: tuple[float, float]
    verdict: str
    n: int
    message: str = ""
    images_to_settle: int | None = None


@dataclass
class GateResult:
    decision: str  # pass, fail or inconclusive
    passed: bool  # the decision under the inconclusive policy
    checks: list[Check]
    images: int
    images_evaluated: int
    looks: list[dict]
    inferences: int
    inferences_full_estimate: int | None
    policy: GatePolicy
    candidate: dict
    baseline: dict | None
    dataset: dict
    settings: dict
    extra: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        return {
            "schema_version": GATE_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "decision": self.decision, "passed": self.passed, "exit_code": self.exit_code,
            "policy": asdict(self.policy),
            "checks": [asdict(c) for c in self.checks],
            "images": self.images, "images_evaluated": self.images_evaluated, "looks": self.looks,
            "inferences": self.inferences,
            "candidate": self.candidate, "baseline": self.baseline, "dataset": self.dataset,
            "settings": self.settings, "versions": versions(),
        }


# ------------------------------------------------------------------------------------------------- decisions
def _verdict(lo: float, hi: float, threshold: float, *, at_least: bool) -> str:
    """``at_least``: the value must be >= threshold; otherwise <= threshold."""
    if at_least:
        return "pass" if lo >= threshold else "fail" if hi < threshold else "inconclusive"
    return "pass" if hi <= threshold else "fail" if lo > threshold else "inconclusive"


def check_min(name: str, kind: str, count: int, n: int, threshold: float, confidence: float, total: int) -> Check:
    lo, hi = wilson_interval(count, n, confidence)
    value = count / n if n else 0.0
    verdict = _verdict(lo, hi, threshold, at_least=True)
    c = Check(name, kind, threshold, value, (lo, hi), verdict, n)
    what = kind.removeprefix("min_").replace("_", " ")
    c.message = (f"{name}: {what} {value:.2%} ({count}/{n}), {confidence:.1%} interval [{lo:.2%}, {hi:.2%}], "
                 f"threshold >= {threshold:.2%}: {verdict}")
    if verdict == "inconclusive":
        c.images_to_settle = _settle(value, threshold, confidence, n, total, c)
    return c


def check_drop(name: str, kind: str, base_flags: np.ndarray, cand_flags: np.ndarray, threshold: float,
               confidence: float, total: int) -> Check:
    both = int(np.count_nonzero(base_flags & cand_flags))
    only_base = int(np.count_nonzero(base_flags & ~cand_flags))
    only_cand = int(np.count_nonzero(~base_flags & cand_flags))
    neither = int(base_flags.size - both - only_base - only_cand)
    drop, lo, hi = paired_difference_interval(both, only_base, only_cand, neither, confidence)
    verdict = _verdict(lo, hi, threshold, at_least=False)
    n = int(base_flags.size)
    c = Check(name, kind, threshold, drop, (lo, hi), verdict, n)
    what = "robust fraction" if kind == "max_robust_drop" else "accuracy"
    c.message = (f"{name}: {what} drop {drop:+.2%} (baseline {(both + only_base) / max(n, 1):.2%} → candidate "
                 f"{(both + only_cand) / max(n, 1):.2%}; {only_base} images lost, {only_cand} gained, paired), "
                 f"{confidence:.1%} interval [{lo:+.2%}, {hi:+.2%}], threshold <= {threshold:+.2%}: {verdict}")
    if verdict == "inconclusive":
        # variance of a paired difference: discordant share minus the squared difference
        p_disc = (only_base + only_cand) / max(n, 1)
        var = max(p_disc - drop**2, 1e-4)
        gap = abs(drop - threshold)
        need = math.inf if gap == 0 else z_value(confidence) ** 2 * var / gap**2
        c.images_to_settle = _settle_count(need, n, total, c)
    return c


def _settle(value, threshold, confidence, n, total, c: Check) -> int | None:
    return _settle_count(images_to_settle(value, threshold, confidence), n, total, c)


def _settle_count(need: float, n: int, total: int, c: Check) -> int | None:
    if not math.isfinite(need):
        c.message += " (the estimate sits on the threshold: no number of images settles it)"
        return None
    more = max(0, math.ceil(need) - n)
    c.message += f"; about {more} more images would settle it"
    if n + more > total:
        left = total - n
        c.message += f" (the dataset has {'no' if left == 0 else left} more)"
    return more


def decide(checks: list[Check]) -> str:
    verdicts = {c.verdict for c in checks}
    return "fail" if "fail" in verdicts else "inconclusive" if "inconclusive" in verdicts else "pass"


def compute_checks(policy: GatePolicy, *, labels, cand_ff, base_ff, confidence: float, total: int,
                   n_classes: int) -> list[Check]:
    """All checks on the images evaluated so far (aligned arrays)."""
    checks = []
    n = labels.size
    correct, robust = cand_ff != 0, cand_ff == ROBUST
    if policy.min_accuracy is not None:
        checks.append(check_min("min_accuracy", "min_accuracy", int(correct.sum()), n, policy.min_accuracy,
                                confidence, total))
    if policy.min_robust is not None:
        checks.append(check_min("min_robust", "min_robust", int(robust.sum()), n, policy.min_robust, confidence,
                                total))
    if policy.min_class_robust is not None:
        for k in range(n_classes):
            sel = labels == k
            checks.append(check_min(f"min_class_robust[{k}]", "min_class_robust", int(robust[sel].sum()),
                                    int(sel.sum()), policy.min_class_robust, confidence, total))
    if base_ff is not None:
        if policy.max_robust_drop is not None:
            checks.append(check_drop("max_robust_drop", "max_robust_drop", base_ff == ROBUST, robust,
                                     policy.max_robust_drop, confidence, total))
        if policy.max_accuracy_drop is not None:
            checks.append(check_drop("max_accuracy_drop", "max_accuracy_drop", base_ff != 0, correct,
                                     policy.max_accuracy_drop, confidence, total))
    return checks


# ------------------------------------------------------------------------------------------------------- run
def _subset(ds: Dataset, positions: np.ndarray) -> Dataset:
    return Dataset(ds.name, ds.split, ds.images[positions], ds.labels[positions], ds.index[positions], ds.source)


def _model_info(m: OnnxModel) -> dict:
    return {"path": str(Path(m.path).resolve()), "sha256": m.sha256, "input": m.input.name,
            "layout": m.binding.layout if m.binding else None}


def run_gate(
    candidate: str | os.PathLike,
    dataset: str,
    *,
    policy: GatePolicy,
    baseline: str | os.PathLike | None = None,
    data_dir=None,
    limit: int | None = None,
    start: int | None = None,
    stop: int | None = None,
    spec: NoiseSpec | None = None,
    batch_size: int | str = "auto",
    threads: int | None = None,
    progress=None,
    log=None,
) -> GateResult:
    """Evaluate ``candidate`` (and a baseline model, or reuse a baseline's saved results) until every check of
    ``policy`` is decided, or the data runs out."""
    spec = spec or NoiseSpec()
    log = log or (lambda line: None)
    if policy.needs_baseline and baseline is None:
        raise InvalidInput("--max-robust-drop and --max-accuracy-drop compare with a baseline: give --baseline "
                           "MODEL.onnx or a results folder")
    ds = load_dataset(dataset, data_dir=data_dir, start=start, stop=stop, limit=limit)
    cand = OnnxModel(candidate, threads=threads)
    bind_model(cand, ds, spec)
    base_model, base_saved, base_info = None, None, None
    if baseline is not None:
        bpath = Path(baseline)
        if bpath.is_dir():
            outcome, summary = load_results(bpath)
            _check_saved_baseline(summary, ds, spec)
            base_saved = outcome.first_failure
            base_info = {"results": str(bpath.resolve()), **summary["model"]}
        else:
            base_model = OnnxModel(bpath, threads=threads)
            bind_model(base_model, ds, spec)
            base_info = _model_info(base_model)

    if batch_size == "auto":
        from pyrobust.tuning import auto_batch_size

        batch_size, _ = auto_batch_size(cand)
    total = ds.n
    order = np.random.default_rng([spec.seed, 0x6A7E]).permutation(total)
    looks = look_schedule(total) if policy.early_stop else [total]
    # Bonferroni over the looks fixed in advance keeps every look's decision valid (see the module docstring).
    level = 1 - (1 - policy.confidence) / len(looks)
    cand_ff = np.full(total, ROBUST, np.int32)
    base_ff = None if baseline is None else np.full(total, ROBUST, np.int32)
    inferences = 0
    done_n = 0
    look_log: list[dict] = []
    checks: list[Check] = []
    for k, n in enumerate(looks):
        pos = np.sort(order[done_n:n])
        part = _subset(ds, pos)
        out = run_protocol(cand, part, spec, batch_size=batch_size, progress=progress)
        cand_ff[pos] = out.first_failure
        inferences += out.inferences
        if base_model is not None:
            bout = run_protocol(base_model, part, spec, batch_size=batch_size)
            base_ff[pos] = bout.first_failure
            inferences += bout.inferences
        elif base_saved is not None:
            base_ff[pos] = base_saved[pos]
        done_n = n
        seen = order[:n]
        checks = compute_checks(policy, labels=ds.labels[seen], cand_ff=cand_ff[seen],
                                base_ff=None if base_ff is None else base_ff[seen], confidence=level, total=total,
                                n_classes=ds.n_classes)
        undecided = [c.name for c in checks if c.verdict == "inconclusive"]
        look_log.append({"look": k + 1, "images": n, "inferences": inferences, "confidence": level,
                         "undecided": undecided})
        log(f"look {k + 1}/{len(looks)}: {n} of {total} images, {len(undecided)} check(s) undecided")
        if not undecided:
            break
    decision = decide(checks)
    passed = decision == "pass" or (decision == "inconclusive" and policy.inconclusive == "pass")
    per_image = inferences / max(done_n, 1)
    return GateResult(
        decision=decision, passed=passed, checks=checks, images=total, images_evaluated=done_n, looks=look_log,
        inferences=inferences, inferences_full_estimate=int(per_image * total), policy=policy,
        candidate=_model_info(cand), baseline=base_info,
        dataset={"spec": dataset, "count": total, "sha256": ds.sha256, "source": ds.source,
                 "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "start": start, "stop": stop,
                 "limit": limit},
        settings={**spec.to_dict(), "batch_size": batch_size, "threads": cand.threads,
                  "looks_planned": looks, "confidence_per_look": level, "order_seed": spec.seed},
    )


def _check_saved_baseline(summary: dict, ds: Dataset, spec: NoiseSpec) -> None:
    diffs = []
    if summary["dataset"]["sha256"] != ds.sha256:
        diffs.append(f"it evaluated other data (SHA-256 {summary['dataset']['sha256'][:12]}…, this gate's data "
                     f"{ds.sha256[:12]}…)")
    saved = NoiseSpec.from_dict(summary["settings"]).to_dict()
    for key, value in spec.to_dict().items():
        if saved.get(key) != value:
            diffs.append(f"{key} {saved.get(key)!r} there, {value!r} here")
    if diffs:
        raise InvalidInput(f"the baseline results cannot be paired with this gate: {'; '.join(diffs)}. Evaluate the "
                           "baseline on the same data with the same settings, or pass the baseline model")


# --------------------------------------------------------------------------------------------------- reports
_ICON = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️"}


def _interval(c: Check) -> str:
    if c.kind.startswith("max_"):
        return f"{c.value:+.2%} [{c.interval[0]:+.2%}, {c.interval[1]:+.2%}]"
    return f"{c.value:.2%} [{c.interval[0]:.2%}, {c.interval[1]:.2%}]"


def _threshold(c: Check) -> str:
    return f"≤ {c.threshold:+.2%}" if c.kind.startswith("max_") else f"≥ {c.threshold:.2%}"


def markdown_summary(result: GateResult) -> str:
    head = {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive"}[result.decision]
    lines = [f"### pyrobust gate {head} {_ICON[result.decision]}", "",
             f"Candidate `{Path(result.candidate['path']).name}` (sha256 `{result.candidate['sha256'][:12]}`) on "
             f"`{result.dataset['spec']}`: {result.images_evaluated} of {result.images} images evaluated, "
             f"{result.inferences:,} inferences"
             + (f"; baseline `{Path(result.baseline.get('path', result.baseline.get('results', ''))).name}`"
                if result.baseline else "") + ".", "",
             "| check | value [interval] | threshold | verdict |", "|---|---|---|---|"]
    for c in result.checks:
        lines.append(f"| `{c.name}` | {_interval(c)} | {_threshold(c)} | {_ICON[c.verdict]} {c.verdict} |")
    lines.append("")
    conf = result.settings["confidence_per_look"]
    lines.append(f"Intervals at {conf:.2%} per look ({result.policy.confidence:.0%} overall across "
                 f"{len(result.settings['looks_planned'])} planned looks); noise: {result.settings['pixels']} pixels, "
                 f"{result.settings['max_steps']} steps, {result.settings['scheme']}, {result.settings['mode']}, "
                 f"seed {result.settings['seed']}.")
    for c in result.checks:
        if c.verdict == "inconclusive":
            lines.append(f"- `{c.name}` is inconclusive: {c.message.split('; ', 1)[-1]}")
    return "\n".join(lines) + "\n"


def junit_xml(result: GateResult) -> bytes:
    failing = {"fail"} | ({"inconclusive"} if result.policy.inconclusive == "fail" else set())
    suite = ET.Element("testsuite", name="pyrobust gate", tests=str(len(result.checks)),
                       failures=str(sum(c.verdict in failing for c in result.checks)),
                       skipped=str(sum(c.verdict == "inconclusive" and c.verdict not in failing
                                       for c in result.checks)),
                       errors="0", timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname=f"pyrobust.gate.{c.kind}", name=c.name)
        if c.verdict in failing:
            ET.SubElement(case, "failure", message=c.message, type=c.verdict).text = c.message
        elif c.verdict == "inconclusive":
            ET.SubElement(case, "skipped", message=c.message)
        out = ET.SubElement(case, "system-out")
        out.text = c.message
    root = ET.Element("testsuites", name="pyrobust", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def append_github_summary(markdown: str, path: str | os.PathLike) -> bool:
    """Append to ``$GITHUB_STEP_SUMMARY``, keeping the file under GitHub's 1 MiB limit; False if it did not fit."""
    p = Path(path)
    used = p.stat().st_size if p.exists() else 0
    data = markdown.encode()
    if used + len(data) > GITHUB_SUMMARY_LIMIT:
        data = b"pyrobust gate: summary omitted (the step summary is near GitHub's 1 MiB limit); see gate.json\n"
        if used + len(data) > GITHUB_SUMMARY_LIMIT:
            return False
    with open(p, "ab") as fh:
        fh.write(data)
    return True


def write_outputs(result: GateResult, *, out: Path | None = None, junit: Path | None = None,
                  summary: Path | None = None) -> list[Path]:
    written = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "gate.json", result.to_dict())
        written.append(out / "gate.json")
    if junit is not None:
        write_bytes_atomic(junit, junit_xml(result))
        written.append(junit)
    if summary is not None:
        write_bytes_atomic(summary, markdown_summary(result).encode())
        written.append(summary)
    return written
