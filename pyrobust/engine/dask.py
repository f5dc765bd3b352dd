"""Running the engine on a Dask cluster (``pyrobust[dask]``): ``--scheduler local:N`` or ``tcp://HOST:PORT``.

The images still to do are cut into shards (see :mod:`pyrobust.engine.backends`); each shard travels with its
images to a worker, which opens its own onnxruntime session once per model (the model travels once, as the very
bytes the driver checked and loaded, external data already inlined, and is checked by SHA-256 on the worker) and
runs the engine on it.

**Workers prove what they are before they contribute.** Before any shard, every worker reports its identity
(Python, numpy, numba, onnx and onnxruntime versions, pyrobust's version and a SHA-256 of its kernel and engine
sources); a worker that differs from the driver is refused by name (``ClusterError``), since another version can
change results silently. Each shard's result carries the worker's identity again (for workers that join later)
and a SHA-256 of the images, labels and indices it received, both checked before the result is merged.
Results are merged by position as shards finish, so one progress bar covers all workers, checkpoints work as in a
single process, and per-image results are bit-identical to a single-process run for any shard size and worker
count. A shard whose worker dies is rescheduled by Dask on another worker (``retries`` covers task errors too).
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pyrobust.data.dataset import Dataset
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import BoundModel, OnnxModel
from pyrobust.engine.updates import Update, make_shards
from pyrobust.errors import ClusterError, InvalidInput, MissingDependency, ModelError
from pyrobust.types import NoiseSpec

_SESSIONS: dict[tuple[str, int], OnnxModel] = {}  # per worker process: (model sha256, threads) -> session
CONNECT_SECONDS = 20.0  # a scheduler that accepts the connection but never completes the handshake
_IDENTITY: dict = {}


def identity() -> dict:
    """What decides this process's per-image results: library versions and the SHA-256 of pyrobust's kernel and
    engine sources (so an edited install with the same version string is told apart too)."""
    if not _IDENTITY:
        import numba
        import onnx
        import onnxruntime

        import perturbcore
        from pyrobust import __version__

        h = hashlib.sha256()
        for pkg in (Path(perturbcore.__file__).parent, Path(__file__).resolve().parents[1]):
            for f in sorted(pkg.rglob("*.py")):
                h.update(str(f.relative_to(pkg.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
        _IDENTITY.update(python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
                         onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, pyrobust=__version__,
                         sources=h.hexdigest())
    return dict(_IDENTITY)


def _differs(theirs: dict, ours: dict) -> str | None:
    diff = [f"{k} {theirs.get(k)!s:.16} (here {ours[k]!s:.16})" for k in ours if theirs.get(k) != ours[k]]
    return ", ".join(diff) or None


def _shard_digest(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (images, labels, index):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.data)
    return h.hexdigest()


def check_workers(client) -> int:
    """Refuse the cluster when any worker is not the same software as the driver; returns the worker count."""
    ours = identity()
    try:
        theirs = client.run(identity)
    except Exception as exc:  # a worker that cannot even import pyrobust
        raise ClusterError(f"a Dask worker could not report its pyrobust version ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); install the same pyrobust on every worker") from None
    for address, ident in sorted(theirs.items()):
        diff = _differs(ident, ours)
        if diff:
            raise ClusterError(f"the Dask worker {address} runs other software than this process ({diff}); its "
                               "results could differ, so it may not contribute: install the same versions on "
                               "every worker")
    return len(theirs)


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

        # The scheduler always serves HTTP, on port 8787 when no address is given (dashboard_address=None does not
        # stop it): a free port on the loopback interface, so two local clusters never collide and none listens
        # beyond this machine.
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
        client._pyrobust_scheduler = scheduler
        return client, cluster
    if "://" not in scheduler:
        raise InvalidInput(f"--scheduler takes local:N or tcp://HOST:PORT; got {scheduler!r}")

    box: dict = {}

    def make() -> None:
        try:
            box["client"] = distributed.Client(scheduler, timeout="10s")
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    # distributed's own timeout covers the TCP connect, not a peer that accepts and then never answers the
    # handshake: the client is made on a thread the caller stops waiting for.
    maker = threading.Thread(target=make, daemon=True, name="pyrobust-dask-connect")
    maker.start()
    maker.join(CONNECT_SECONDS)
    if maker.is_alive():
        raise ClusterError(f"the Dask scheduler at {scheduler} accepted the connection but did not answer within "
                           f"{CONNECT_SECONDS:.0f} s; check that a Dask scheduler (not another service) listens "
                           "there, or use --scheduler local:N")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, (OSError, TimeoutError)):
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__}); start one "
                               "with 'dask scheduler' and 'dask worker', or use --scheduler local:N") from None
        raise exc
    client = box["client"]
    client._pyrobust_scheduler = scheduler
    return client, None


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
            "failure_label": out.failure_label, "failures": out.failures, "clean_margin": out.clean_margin,
            "inferences": out.inferences, "noisy": out.noisy_inferences,
            "pid": os.getpid(), "identity": identity(), "data_sha256": _shard_digest(images, labels, index)}


def dask_updates(model: BoundModel, dataset: Dataset, spec: NoiseSpec, todo: np.ndarray, *, connection,
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
        workers = check_workers(client)
        shards = make_shards(todo, workers=workers, shard_size=shard_size, max_size=512)
        # the bytes this process checked and loaded (external data inlined), never the file again: it may have
        # been swapped since, and a worker must not resolve paths of its own
        blob = model.model_bytes
        digest = hashlib.sha256(blob).hexdigest()
        payload, transfer = client.scatter(blob, broadcast=True), "bytes"
        ours = identity()
        info.update(scheduler=connection_address(connection), workers=workers, shards=len(shards),
                    model_transfer=transfer, threads_per_worker=1, worker_processes_used=0)
        spec_dict = spec.to_dict()
        for i, pos in enumerate(shards):
            f = client.submit(evaluate_shard, payload, digest, dataset.images[pos], dataset.labels[pos],
                              dataset.index[pos], spec_dict, batch_size, chunk_size, 1, retries=2, pure=False,
                              key=f"pyrobust-shard-{model.sha256[:12]}-{dataset.sha256[:12]}-{i}-{time.time_ns()}")
            futures[f] = pos
        pids = set()
        for f in distributed.as_completed(futures):
            r = f.result()
            pos = futures[f]
            diff = _differs(r.get("identity") or {}, ours)
            if diff:
                raise ClusterError(f"a Dask worker (process {r['pid']}) that joined during the run runs other "
                                   f"software than this process ({diff}); its results are not used: install the "
                                   "same versions on every worker")
            if r.get("data_sha256") != _shard_digest(dataset.images[pos], dataset.labels[pos], dataset.index[pos]):
                raise ClusterError(f"a Dask worker (process {r['pid']}) evaluated other images than it was sent; "
                                   "its results are not used")
            pids.add(r["pid"])
            info["worker_processes_used"] = len(pids)
            yield Update(futures[f], r["clean_prediction"], r["first_failure"], r["failure_label"],
                         r["inferences"], r["noisy"], r.get("failures"), r.get("clean_margin"))
    finally:
        for f in futures:
            f.cancel()


def connection_address(connection) -> str:
    client, cluster = connection
    return getattr(client, "_pyrobust_scheduler", None) or str(client.scheduler.address)
