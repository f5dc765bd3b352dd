"""``pyrobust gate --mlflow`` logs the verdict, checks, throughput and reports to a real MLflow store (SQLite, with
its artifact folder), into a new run or the model's own run; a store that cannot be used is refused before any work."""

from __future__ import annotations

import json

import pytest

from pyrobust.cli import main
from pyrobust.gate.tracking import metric_name

mlflow = pytest.importorskip("mlflow", reason="MLflow is the optional extra pyrobust[mlflow]")

pytestmark = pytest.mark.slow  # a database migration per store (seconds)
GATE = ["--dataset", "sample", "--limit", "100", "--max-steps", "20", "--sessions", "1"]


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_a_gate_logs_its_evidence_to_a_new_run(store, bundled_model, regressed, tmp_path, capsys):
    code = main(["gate", str(regressed), *GATE, "--baseline", str(bundled_model), "--max-robust-drop", "50%",
                 "--min-accuracy", "80%", "--out", str(tmp_path / "g"), "--junit", str(tmp_path / "g.xml"),
                 "--summary", str(tmp_path / "g.md"), "--mlflow", "--mlflow-experiment", "releases"])
    out = capsys.readouterr().out
    assert code == 0, out
    run_id = out.strip().splitlines()[-1].split()[4]
    client = mlflow.tracking.MlflowClient(store)
    run = client.get_run(run_id)
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert client.get_experiment(run.info.experiment_id).name == "releases"
    assert run.info.status == "FINISHED"
    assert run.data.tags["pyrobust.decision"] == "pass" and run.data.tags["pyrobust.exit_code"] == "0"
    assert run.data.tags["pyrobust.candidate_sha256"] == g["candidate"]["sha256"]
    assert run.data.tags["pyrobust.baseline_sha256"] == g["baseline"]["sha256"]
    for c in g["checks"]:
        assert run.data.metrics[f"{c['name']}.value"] == pytest.approx(c["value"])
        assert run.data.metrics[f"{c['name']}.low"] == pytest.approx(c["interval"][0])
    assert run.data.metrics["pyrobust.passed"] == 1.0
    assert run.data.metrics["pyrobust.inferences"] == g["inferences"]
    assert run.data.metrics["pyrobust.throughput_vs_baseline"] == pytest.approx(
        g["work"]["throughput"]["candidate_vs_baseline"])
    assert run.data.params["pyrobust.policy.min_accuracy"] == "0.8"
    assert run.data.params["pyrobust.noise.max_steps"] == "20"
    listed = {a.path for a in client.list_artifacts(run_id, "pyrobust-gate")}
    assert {"pyrobust-gate/g.xml", "pyrobust-gate/g.md", "pyrobust-gate/g"} <= listed
    assert "pyrobust-gate/g/gate.json" in {a.path for a in client.list_artifacts(run_id, "pyrobust-gate/g")}


def test_a_failed_gate_logs_into_the_models_own_run(store, bundled_model, tmp_path, capsys):
    mlflow.set_experiment("training")
    with mlflow.start_run() as training:
        mlflow.log_param("epochs", 3)
    code = main(["gate", str(bundled_model), *GATE, "--noise-check", "patch:size=9 min_robust=99%",
                 "--mlflow", "--mlflow-run-id", training.info.run_id])
    out = capsys.readouterr().out
    assert code == 1
    assert f"logged to MLflow run {training.info.run_id}" in out
    run = mlflow.tracking.MlflowClient(store).get_run(training.info.run_id)
    assert run.data.params["epochs"] == "3" and run.data.tags["pyrobust.decision"] == "fail"
    name = metric_name("min_robust@patch:size=9,fill=constant,value=0")
    assert name == "min_robust_patch_size_9_fill_constant_value_0"
    assert run.data.metrics["pyrobust.passed"] == 0.0 and f"{name}.value" in run.data.metrics


@pytest.mark.parametrize("setup,args,message", [
    ("unset", ["--mlflow"], "$MLFLOW_TRACKING_URI names, and it is not set"),
    ("store", ["--mlflow", "--mlflow-run-id", "0123456789abcdef"], "check MLFLOW_TRACKING_URI and --mlflow-run-id"),
    ("store", ["--mlflow-run-id", "0123"], "give --mlflow too"),
    ("store", ["--mlflow", "--mlflow-experiment", " "], "--mlflow-experiment is empty"),
    ("server", ["--mlflow"], "did not answer"),
])
def test_a_store_that_cannot_be_used_is_refused_before_any_work(setup, args, message, store, bundled_model,
                                                                 tmp_path, monkeypatch, capsys):
    if setup == "unset":
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    if setup == "server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    code = main(["gate", str(bundled_model), *GATE, "--min-robust", "50%", "--out", str(tmp_path / "g"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g" / "gate.json").exists()  # no work was done


def test_links_in_a_report_folder_are_never_followed(store, bundled_model, tmp_path):
    from pyrobust.gate.policy import GatePolicy
    from pyrobust.gate.run import run_gate
    from pyrobust.gate.tracking import log_gate, open_tracking
    from pyrobust.types import NoiseSpec

    result = run_gate(bundled_model, "sample", policy=GatePolicy(min_accuracy=0.8), noise=NoiseSpec(max_steps=5),
                      limit=50, sessions=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the tracking server")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "key").write_text("nor this")
    report = tmp_path / "report"
    (report / "sub").mkdir(parents=True)
    (report / "gate.json").write_text("{}")
    (report / "sub" / "fig.png").write_bytes(b"png")
    (report / "leak.txt").symlink_to(secret)
    (report / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    run_id = log_gate(result, open_tracking("links"), files=[report, tmp_path / "missing.md"])
    client = mlflow.tracking.MlflowClient(store)

    def walk(path):
        for a in client.list_artifacts(run_id, path):
            yield from walk(a.path) if a.is_dir else [a.path]

    assert sorted(walk("pyrobust-gate")) == ["pyrobust-gate/report/gate.json", "pyrobust-gate/report/sub/fig.png"]
    assert client.get_run(run_id).data.tags["pyrobust.decision"] == "pass"
