"""Running the engine on a Dask cluster (``pyrobust[dask]``): ``--scheduler local:N`` or ``tcp://HOST:PORT``.

The images still to do are cut into shards (see :mod:`pyrobust.engine.backends`); each shard travels with its
images to a worker, which opens its own onnxruntime session once per model (the model travels once, as bytes, or as
a path every worker can read when it has external data, and is checked by SHA-256 on the worker) and runs the
engine on it.
Results are merged by position as shards finish, so one progress bar covers all workers, checkpoints work as in a
single process, and per-image results are bit-identical to a single-process run for any shard size and worker
count. A shard whose worker dies is rescheduled by Dask on another worker (``retries`` covers task errors too).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pyrobust.datasets import Dataset
from pyrobust.engine.backends import Update, make_shards
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import ClusterError, InvalidInput, MissingDependency, ModelError
from pyrobust.types import NoiseSpec

_SESSIONS: dict[tuple[str, int], OnnxModel] = {}  # per worker process: (model sha256, threads) -> session


def _dask():
    try:
        from dask import distributed
    except ImportError:
        raise MissingDependency("--scheduler needs dask: pip install 'pyrobust[dask]'") from None
    return distributed


def check_scheduler(scheduler: str) -> None:
    """``local:N`` (N >= 1) or ``tcp://HOST:PORT`` / ``tls://HOST:PORT``; anything else is a usage error."""
    from urllib.parse import urlsplit

    if not isinstance(scheduler, str):
        raise InvalidInput(f"scheduler takes local:N or tcp://HOST:PORT; got {scheduler!r}")
    if scheduler.startswith("local:"):
        n = scheduler.split(":", 1)[1]
        if not n.isdigit() or not 1 <= int(n) <= 1024:
            raise InvalidInput(f"scheduler local:N needs a number of workers in [1, 1024]; got {scheduler!r}")
        return
    parts = urlsplit(scheduler)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise InvalidInput(f"scheduler takes local:N or tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786); got "
                           f"{scheduler!r}")


def connect(scheduler: str):
    """(client, cluster or None) for ``local:N`` (a LocalCluster of N worker processes) or a scheduler address."""
    check_scheduler(scheduler)
    distributed = _dask()
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise InvalidInput(f"--scheduler local:N needs a number of workers >= 1; got {scheduler!r}")
        import logging

        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
        client._pyrobust_scheduler = scheduler
        return client, cluster
    if "://" not in scheduler:
        raise InvalidInput(f"--scheduler takes local:N or tcp://HOST:PORT; got {scheduler!r}")
    try:
        client = distributed.Client(scheduler, timeout="10s")
        client._pyrobust_scheduler = scheduler
        return client, None
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__}); start one "
                           "with 'dask scheduler' and 'dask worker', or use --scheduler local:N") from None


def disconnect(connection) -> None:
    """Close a ``connect()`` result; closing twice is harmless."""
    client, cluster = connection
    client.close()
    if cluster is not None:
        cluster.close()


def _worker_model(model: bytes | str, sha256: str, threads: int) -> OnnxModel:
    key = (sha256, threads)
    if key not in _SESSIONS:
        if isinstance(model, bytes):
            if hashlib.sha256(model).hexdigest() != sha256:
                raise ModelError(f"the model received by the worker has another SHA-256 than {sha256[:12]}…")
            # A private file (mkstemp: a fresh name, mode 0600, never an existing file or link), gone as soon as
            # onnxruntime has read it: no predictable name in $TMPDIR for anyone to plant a link or a file at.
            fd, tmp = tempfile.mkstemp(prefix="pyrobust-model-", suffix=".onnx")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(model)
                m = OnnxModel(tmp, threads=threads)
            finally:
                os.unlink(tmp)
        else:
            m = OnnxModel(Path(model), threads=threads)
        if m.sha256 != sha256:
            raise ModelError(f"{m.path}: on this worker the model has SHA-256 {m.sha256[:12]}…, not {sha256[:12]}…; "
                             "every worker must see the same file")
        _SESSIONS[key] = m
    return _SESSIONS[key]


def evaluate_shard(model, sha256: str, images: np.ndarray, labels: np.ndarray, index: np.ndarray, spec: dict,
                   batch_size: int, chunk_size: int, threads: int) -> dict:
    """Run on a worker: the engine on one shard. Returns its per-image arrays and counts."""
    m = _worker_model(model, sha256, threads)
    out = run_protocol(m, Dataset("shard", None, images, labels, index, "dask shard"), NoiseSpec.from_dict(spec),
                       batch_size=batch_size, chunk_size=chunk_size)
    return {"clean_prediction": out.clean_prediction, "first_failure": out.first_failure,
            "failure_label": out.failure_label, "inferences": out.inferences, "noisy": out.noisy_inferences,
            "pid": os.getpid()}


def dask_updates(model: OnnxModel, dataset: Dataset, spec: NoiseSpec, todo: np.ndarray, *, connection,
                 batch_size: int, chunk_size: int = 4096, shard_size: int | None = None,
                 info: dict) -> Iterator[Update]:
    """The back end for :func:`pyrobust.engine.backends.execute`: ``todo`` in shards of at most 512 images (results
    come back per shard, so the checkpoint is never far behind), an update per finished shard. ``connection`` is
    :func:`connect`'s result; it stays open (the caller closes it). ``info`` gets what ran where."""
    distributed = _dask()
    client, _ = connection
    futures: dict = {}
    try:
        client.wait_for_workers(1, timeout=60)
        workers = len(client.scheduler_info()["workers"])
        shards = make_shards(todo, workers=workers, shard_size=shard_size, max_size=512)
        external = any(t.data_location == 1 for t in _initializers(model.path))
        if external:  # weights in files beside the model: every worker reads the same path
            payload, transfer = str(Path(model.path).resolve()), "path"
        else:
            payload, transfer = client.scatter(Path(model.path).read_bytes(), broadcast=True), "bytes"
        info.update(scheduler=connection_address(connection), workers=workers, shards=len(shards),
                    model_transfer=transfer, threads_per_worker=1, worker_processes_used=0)
        spec_dict = spec.to_dict()
        for i, pos in enumerate(shards):
            f = client.submit(evaluate_shard, payload, model.sha256, dataset.images[pos], dataset.labels[pos],
                              dataset.index[pos], spec_dict, batch_size, chunk_size, 1, retries=2, pure=False,
                              key=f"pyrobust-shard-{model.sha256[:12]}-{dataset.sha256[:12]}-{i}-{time.time_ns()}")
            futures[f] = pos
        pids = set()
        for f in distributed.as_completed(futures):
            r = f.result()
            pids.add(r["pid"])
            info["worker_processes_used"] = len(pids)
            yield Update(futures[f], r["clean_prediction"], r["first_failure"], r["failure_label"],
                         r["inferences"], r["noisy"])
    finally:
        for f in futures:
            f.cancel()


def connection_address(connection) -> str:
    client, cluster = connection
    return getattr(client, "_pyrobust_scheduler", None) or str(client.scheduler.address)


def _initializers(path):
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(onnx.load(str(path), load_external_data=False)))
