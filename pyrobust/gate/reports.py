"""What the gate writes: ``gate.json``, the Markdown summary (GitHub's step summary, capped at its 1 MiB limit)
and the JUnit XML CI systems read; every foreign string in them is escaped for its format."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

from pyrobust.escape import md_code, md_text, xml_text
from pyrobust.files import write_bytes_atomic, write_json_atomic
from pyrobust.gate.policy import Check, GateResult

GITHUB_SUMMARY_LIMIT = 1024 * 1024  # GitHub refuses a step summary over 1 MiB


# --------------------------------------------------------------------------------------------------- reports
_ICON = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️"}


def _interval(c: Check) -> str:
    if math.isnan(c.value):
        return "not evaluated"
    if c.kind == "max_failure_prob":  # per-image probabilities: the deciding image's exact bounds
        return f"{c.value:.2%} [{c.interval[0]:.2%}, {c.interval[1]:.2%}]"
    if c.kind.startswith("max_"):
        return f"{c.value:+.2%} [{c.interval[0]:+.2%}, {c.interval[1]:+.2%}]"
    return f"{c.value:.2%} [{c.interval[0]:.2%}, {c.interval[1]:.2%}]"


def _threshold(c: Check) -> str:
    if c.kind == "max_failure_prob":
        return f"≤ {c.threshold:.2%} per image"
    return f"≤ {c.threshold:+.2%}" if c.kind.startswith("max_") else f"≥ {c.threshold:.2%}"


def throughput_line(result) -> str | None:
    """'throughput: candidate N inferences/s, baseline M (r× the baseline's)', or None when nothing was timed."""
    tp = result.throughput or {}
    cand, base = tp.get("candidate"), tp.get("baseline")
    if not cand or not cand.get("inferences_per_second"):
        return None
    line = f"throughput: candidate {cand['inferences_per_second']:,.0f} inferences/s"
    if base and base.get("inferences_per_second"):
        line += (f", baseline {base['inferences_per_second']:,.0f} ({tp['candidate_vs_baseline']:.2f}× the "
                 "baseline's, same images, noise and threads)")
    return line


def markdown_summary(result: GateResult) -> str:
    """The step summary (GitHub renders it as GFM, raw HTML included): every name the model, the data or a results
    folder chose is a code span or escaped text (:mod:`pyrobust.escape`), so none becomes markup."""
    head = {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive"}[result.decision]
    base = ""
    if result.baseline:
        base = f"; baseline {md_code(Path(result.baseline.get('path', result.baseline.get('results', ''))).name)}"
    lines = [f"### pyrobust gate {head} {_ICON[result.decision]}", "",
             f"Candidate {md_code(Path(result.candidate['path']).name)} (sha256 "
             f"`{result.candidate['sha256'][:12]}`) on {md_code(result.dataset['spec'])}: "
             f"{result.images_evaluated} of {result.images} images through the noise protocol, "
             f"{result.inferences:,} inferences{base}.", "",
             "| check | value [interval] | threshold | verdict |", "|---|---|---|---|"]
    for c in result.checks:
        lines.append(f"| {md_code(c.name, table=True)} | {_interval(c)} | {_threshold(c)} | {_ICON[c.verdict]} "
                     f"{c.verdict} |")
    lines.append("")
    p, noise = result.policy, result.settings["noise"]
    if "corruption" in noise:
        described = f"{md_code(noise['corruption'])}, {noise['max_steps']} steps, seed {noise['seed']}"
    else:
        described = (f"{noise['pixels']} pixels, {noise['max_steps']} steps, {noise['scheme']}, {noise['mode']}, "
                     f"seed {noise['seed']}")
    if result.conditions:
        described = "; ".join(
            f"{md_code(r['noise'])} {r['decision'] if r['evaluated'] else 'not run'}" for r in result.conditions)
        k = len(result.conditions)
        described = (f"{k} noise conditions, each at {result.settings['confidence_per_condition']:.2%} (Bonferroni): "
                     f"{described}" if k > 1 else
                     f"1 noise condition at {result.settings['confidence_per_condition']:.2%}: {described}")
    lines.append(f"Exact intervals at each check's per-look level ({p.confidence:.0%} overall: accuracy on the clean "
                 f"pass of every image, robustness over {len(result.settings['looks_planned'])} planned looks, "
                 f"error spent {p.spending}; fail verdicts controlled across checks: {p.family}); noise: "
                 f"{described}.")
    if result.stopped_early:
        lines.append(f"Stopped early: {md_text(result.stop_reason)}.")
    speed = throughput_line(result)
    if speed:
        lines.append(speed[0].upper() + speed[1:] + ".")
    for w in result.warnings:
        lines.append(f"- ⚠️ {md_text(w)}")
    for c in result.checks:
        if c.verdict == "inconclusive":
            lines.append(f"- {md_code(c.name)} is inconclusive: {md_text(c.message.split('; ', 1)[-1])}")
    return "\n".join(lines) + "\n"


def junit_xml(result: GateResult) -> bytes:
    failing = {"fail"} | ({"inconclusive"} if result.policy.inconclusive == "fail" else set())
    seconds = {c.stage: c.seconds for c in result.checks}  # each stage's wall time, once
    suite = ET.Element("testsuite", name="pyrobust gate", tests=str(len(result.checks)),
                       time=f"{sum(seconds.values()):.3f}",
                       failures=str(sum(c.verdict in failing for c in result.checks)),
                       skipped=str(sum(c.verdict == "inconclusive" and c.verdict not in failing
                                       for c in result.checks)),
                       errors="0", timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for c in result.checks:
        message = xml_text(c.message)  # XML 1.0 has no place for control characters: escaped, not written raw
        case = ET.SubElement(suite, "testcase", classname=xml_text(f"pyrobust.gate.{c.kind}"), name=xml_text(c.name),
                             time=f"{c.seconds:.3f}")  # the wall time of the stage that decided it
        if c.verdict in failing:
            ET.SubElement(case, "failure", message=message, type=c.verdict).text = message
        elif c.verdict == "inconclusive":
            ET.SubElement(case, "skipped", message=message)
        out = ET.SubElement(case, "system-out")
        out.text = message
    root = ET.Element("testsuites", name="pyrobust", tests=suite.get("tests", "0"), failures=suite.get("failures", "0"))
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
