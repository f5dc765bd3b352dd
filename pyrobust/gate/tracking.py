"""The gate's evidence where releases are tracked: an MLflow run with the gate's verdict, checks, work and files.

``pyrobust gate --mlflow`` (or :func:`log_gate` from Python) logs to the tracking store ``$MLFLOW_TRACKING_URI``
names (a database such as ``sqlite:///mlflow.db``, or a tracking server ``http://host:5000``), in a new run of the
experiment ``--mlflow-experiment`` or into an existing run (``--mlflow-run-id``: the model's own training run, so a
registered model version shows its robustness beside it). What is logged:

* tags ``pyrobust.decision`` (pass / fail / inconclusive), ``pyrobust.exit_code``, ``pyrobust.candidate_sha256``,
  ``pyrobust.baseline_sha256``, ``pyrobust.dataset``;
* params: every threshold the policy sets, the confidence, the noise and the dataset (prefixed ``pyrobust.``);
* metrics: each check's value and interval bounds (``CHECK.value``, ``CHECK.low``, ``CHECK.high``; characters MLflow
  does not allow in a name become ``_``), ``pyrobust.passed``, the images, inferences and throughput;
* artifacts under ``pyrobust-gate/``: ``gate.json``, the summary, the JUnit file and the report folder's files.

MLflow is an optional extra (``pip install 'pyrobust[mlflow]'``); :func:`open_tracking` checks that it is installed
and that the store answers *before* the gate runs, so a wrong URI costs no evaluation.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyrobust.errors import InvalidInput, OutputError

_NAME_OK = re.compile(r"[^A-Za-z0-9_\-. /]")
PARAM_MAX = 500  # characters MLflow keeps of a param value (6000 on new servers; the smallest limit in use)


def metric_name(name: str) -> str:
    """An MLflow metric or param name from a check name (``min_robust@gaussian:sigma=0.1`` has ':', '=' and '@')."""
    return _NAME_OK.sub("_", name)


@dataclass
class Tracking:
    """Where the gate logs: the store, the experiment and the run (None: a new one)."""

    uri: str
    experiment: str
    run_id: str | None
    experiment_id: str


def open_tracking(experiment: str = "pyrobust-gate", run_id: str | None = None,
                  uri: str | None = None) -> Tracking:
    """Check, before any work, that MLflow is installed and the store answers; find or create the experiment (or
    the given run). Raises :class:`InvalidInput` (exit 2) naming the problem and its fix."""
    with _quiet():
        return _open(experiment, run_id, uri)


def _open(experiment: str, run_id: str | None, uri: str | None) -> Tracking:
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise InvalidInput("--mlflow needs MLflow: pip install 'pyrobust[mlflow]'") from None
    for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) are not the gate's output
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        raise InvalidInput("--mlflow logs to the store $MLFLOW_TRACKING_URI names, and it is not set: set it, e.g. "
                           "MLFLOW_TRACKING_URI=sqlite:///mlflow.db or http://HOST:5000")
    if not experiment or not experiment.strip():
        raise InvalidInput("--mlflow-experiment is empty: name the experiment")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    try:
        if run_id:
            run = client.get_run(run_id)
            return Tracking(uri, experiment, run_id, run.info.experiment_id)
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    except MlflowException as exc:
        if "failed with exception" in str(exc):  # MLflow's wording for a server that cannot be reached
            raise InvalidInput(f"MLflow at {uri} did not answer (connection refused or timed out); check "
                               "MLFLOW_TRACKING_URI and that the server is up") from None
        raise InvalidInput(f"MLflow at {uri}: {_first_line(exc)}; check MLFLOW_TRACKING_URI"
                           + (" and --mlflow-run-id" if run_id else "")) from None
    except Exception as exc:  # a server that does not answer: requests' and urllib3's errors have no common base
        raise InvalidInput(f"MLflow at {uri} did not answer ({type(exc).__name__}: {_first_line(exc)}); check "
                           "MLFLOW_TRACKING_URI and that the server is up") from None
    return Tracking(uri, experiment, None, exp_id)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _params(result) -> dict[str, str]:
    d = result.to_dict()
    policy = {k: v for k, v in d["policy"].items() if v is not None and not isinstance(v, (list, dict))}
    out = {f"pyrobust.policy.{k}": v for k, v in policy.items()}
    for k, v in d["settings"]["noise"].items():
        out[f"pyrobust.noise.{k}"] = v
    out["pyrobust.dataset"] = d["dataset"].get("spec") or d["dataset"].get("source")
    out["pyrobust.dataset_sha256"] = d["dataset"].get("sha256")
    out["pyrobust.images"] = d["images"]
    return {metric_name(k): str(v)[:PARAM_MAX] for k, v in out.items() if v is not None}


def _metrics(result) -> dict[str, float]:
    out: dict[str, float] = {"pyrobust.passed": float(result.passed), "pyrobust.images": float(result.images),
                             "pyrobust.images_evaluated": float(result.images_evaluated),
                             "pyrobust.inferences": float(result.inferences)}
    for c in result.checks:
        name = metric_name(c.name)
        lo, hi = c.interval
        for key, v in (("value", c.value), ("low", lo), ("high", hi)):
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[f"{name}.{key}"] = float(v)
    tp = result.throughput or {}
    for who in ("candidate", "baseline"):
        ips = (tp.get(who) or {}).get("inferences_per_second")
        if ips:
            out[f"pyrobust.{who}_inferences_per_second"] = float(ips)
    if tp.get("candidate_vs_baseline"):
        out["pyrobust.throughput_vs_baseline"] = float(tp["candidate_vs_baseline"])
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's and SQLAlchemy's own deprecation warnings are theirs to fix, not the gate's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def log_gate(result, tracking: Tracking, *, files: Sequence[Path] = (), run_name: str | None = None) -> str:
    """Log ``result`` (a :class:`~pyrobust.gate.policy.GateResult`) and ``files`` (the reports the gate wrote; a
    folder's plain files, symbolic links never followed) to MLflow; returns the run id. Raises
    :class:`OutputError` when the store refuses."""
    with _quiet():
        return _log(result, tracking, files, run_name)


def _log(result, tracking: Tracking, files: Sequence[Path], run_name: str | None) -> str:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking.uri)
    tags = {"pyrobust.decision": result.decision, "pyrobust.exit_code": str(result.exit_code),
            "pyrobust.candidate_sha256": str(result.candidate.get("sha256", "")),
            "pyrobust.dataset": str(result.dataset.get("spec") or result.dataset.get("source") or "")}
    if result.baseline:
        tags["pyrobust.baseline_sha256"] = str(result.baseline.get("sha256", ""))
    try:
        if tracking.run_id is None:
            run = client.create_run(tracking.experiment_id, run_name=run_name or "pyrobust gate",
                                    tags={"mlflow.source.name": "pyrobust gate"})
            run_id, end = run.info.run_id, True
        else:
            run_id, end = tracking.run_id, False
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        for k, v in _params(result).items():
            client.log_param(run_id, k, v)
        for k, v in _metrics(result).items():
            client.log_metric(run_id, k, v)
        for f in files:
            f = Path(f)
            if f.is_symlink():
                continue
            if f.is_file():
                client.log_artifact(run_id, str(f), artifact_path="pyrobust-gate")
            elif f.is_dir():
                for child in sorted(f.rglob("*")):
                    if child.is_file() and not child.is_symlink() and not any(
                            (f / p).is_symlink() for p in child.relative_to(f).parents if str(p) != "."):
                        rel = child.relative_to(f).parent
                        where = "pyrobust-gate/" + f.name + ("" if str(rel) == "." else "/" + rel.as_posix())
                        client.log_artifact(run_id, str(child), artifact_path=where)
        if end:
            client.set_terminated(run_id, "FINISHED")
    except Exception as exc:
        raise OutputError(f"the gate decided {result.decision.upper()} (above), but MLflow at {tracking.uri} "
                          f"refused the log: {_first_line(exc)}") from None
    return run_id
