"""Scaling: parallel sessions, measured batch sizes and layouts, and Dask; results identical to one process."""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest

import pyrobust
from pyrobust.cli import main
from pyrobust.engine.runtime import OnnxModel
from pyrobust.errors import ClusterError, InvalidInput, MissingDependency, ModelError
from pyrobust.types import NoiseSpec, Outcome

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier


@pytest.fixture(scope="module")
def reference(bundled_model):
    return pyrobust.evaluate(bundled_model, "sample", max_steps=40, seed=1, sessions=1, batch_size=256).outcome


def _same(a: Outcome, b: Outcome) -> None:
    for name in Outcome.ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("sessions,shard_size,batch_size", [(2, None, 256), (2, 7, 64), (2, 500, 1), (1, None, 33)])
def test_parallel_sessions_are_bit_identical(bundled_model, reference, sessions, shard_size, batch_size):
    ev = pyrobust.evaluate(bundled_model, "sample", max_steps=40, seed=1, sessions=sessions, threads=2,
                           shard_size=shard_size, batch_size=batch_size)
    _same(ev.outcome, reference)
    par = ev.summary["settings"]["parallel"]
    assert par["sessions"] == sessions and par["choice"] == "given"
    if sessions > 1:
        assert par["shards"] == (-(-500 // shard_size) if shard_size else 8)


def test_sessions_cannot_exceed_threads(bundled_model):
    with pytest.raises(InvalidInput, match=r"sessions \(3\) cannot exceed threads \(2\)"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, sessions=3, threads=2)
    with pytest.raises(InvalidInput, match="sessions must be an integer >= 1 or auto"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, sessions=0)
    with pytest.raises(InvalidInput, match="batch_size must be an integer >= 1 or auto"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, batch_size="big")


def test_auto_batch_size_and_layout_are_measured_once_and_cached(bundled_model, tmp_path, monkeypatch):
    from pyrobust.engine import tuning

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: the first call must measure
    m = OnnxModel(bundled_model, threads=2)
    m = m.bind((28, 28, 1), n_classes=10)
    size, how = tuning.auto_batch_size(m)
    assert size in tuning.BATCH_SIZES and how == "measured"
    assert tuning.auto_batch_size(m) == (size, "cached")
    cache = json.loads(tuning.cache_path().read_text())
    (entry,) = [v for k, v in cache["batch_size"].items() if k.startswith(m.sha256)]
    assert set(entry["rates"]) == {str(s) for s in tuning.BATCH_SIZES}
    best = max(entry["rates"].values())
    assert entry["rates"][str(size)] >= tuning.NEAR_BEST * best
    s, per, how = tuning.auto_layout(m, threads=2, batch_size=size, image_shape=(28, 28, 1), n_classes=10)
    assert (s, per) in tuning.layouts(2) and how == "measured"
    assert tuning.auto_layout(m, threads=2, batch_size=size, image_shape=(28, 28, 1), n_classes=10)[2] == "cached"
    ev = pyrobust.evaluate(bundled_model, "sample", limit=20, max_steps=3, threads=2)
    assert ev.summary["settings"]["batch_size"] == size and ev.summary["settings"]["batch_size_choice"] == "cached"
    assert ev.summary["settings"]["parallel"]["choice"] == "cached"


def test_layout_candidates():
    from pyrobust.engine.tuning import layouts

    assert layouts(1) == [(1, 1)]
    assert layouts(2) == [(1, 2), (2, 1)]
    assert layouts(16) == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]


def test_cli_scaling_options(capsys, tmp_path, bundled_model):
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "30", "--max-steps", "5",
                 "--sessions", "2", "--threads", "2", "--batch-size", "auto", "--no-report", "--json",
                 "--out", str(tmp_path)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["settings"]["parallel"]["sessions"] == 2 and s["settings"]["batch_size_choice"] in ("measured", "cached")
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--batch-size", "lots", "--out",
                 str(tmp_path / "x")]) == 2
    assert "expected a whole number or 'auto'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- dask
dask = pytest.importorskip("dask.distributed", reason="the Dask tests need pyrobust[dask]")


@pytest.mark.parametrize("workers,shard_size", [(2, 37), (1, None)])
def test_dask_local_cluster_is_bit_identical(bundled_model, reference, workers, shard_size):
    ev = pyrobust.evaluate(bundled_model, "sample", max_steps=40, seed=1, scheduler=f"local:{workers}",
                           shard_size=shard_size, batch_size=256)
    _same(ev.outcome, reference)
    par = ev.summary["settings"]["parallel"]
    assert par["workers"] == workers and par["model_transfer"] == "bytes"
    assert ev.summary["settings"]["parallel"]["worker_processes_used"] >= 1
    assert par["shards"] == (-(-500 // shard_size) if shard_size else 4)


def test_a_killed_worker_is_replaced_and_the_results_do_not_change(bundled_model, reference):
    from pyrobust.data.load import load_dataset
    from pyrobust.engine.backends import Layout, execute
    from pyrobust.engine.dask import connect, disconnect
    from pyrobust.engine.loop import bind_model

    killed: list[int] = []
    connection = connect("local:2")
    pids = dict(connection[0].run(os.getpid))

    def progress(done, total, inferences):
        if not killed:  # the first shard is in: kill one worker process while the others are busy
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    m = OnnxModel(bundled_model)
    ds = load_dataset("sample")
    spec = NoiseSpec(max_steps=40, seed=1)
    m, spec = bind_model(m, ds, spec)
    try:
        outcome, info = execute(m, ds, spec, layout=Layout("dask", scheduler="local:2", shard_size=25),
                                batch_size=256, connection=connection, progress=progress)
    finally:
        disconnect(connection)
    assert killed and info["shards"] == 20
    _same(outcome, reference)


def test_dask_errors(bundled_model, monkeypatch, capsys, tmp_path):
    with pytest.raises(InvalidInput, match="scheduler takes local:N or tcp://HOST:PORT"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, scheduler="somewhere")
    with pytest.raises(InvalidInput, match=r"local:N needs a number of workers in \[1, 1024\]"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, scheduler="local:0")
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, scheduler="tcp://127.0.0.1:9")
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--scheduler", "tcp://127.0.0.1:9",
                 "--out", str(tmp_path / "o")]) == 3
    assert not (tmp_path / "o").exists()  # nothing written before the cluster was reached
    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(MissingDependency, match=r"pip install 'pyrobust\[dask\]'"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, scheduler="local:1")


def test_worker_checks_the_model_digest(bundled_model):
    from pyrobust.engine.dask import evaluate_shard

    ds = pyrobust.load_dataset("sample").select(limit=3)
    with pytest.raises(ModelError, match="the model received by the worker has another SHA-256"):
        evaluate_shard(bundled_model.read_bytes(), "0" * 64, ds.images, ds.labels, ds.index, NoiseSpec().to_dict(),
                       8, 64, 1)


def test_the_terminal_summary_says_where_it_ran(capsys, tmp_path, bundled_model):
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "40", "--max-steps", "5",
                 "--scheduler", "local:2", "--shard-size", "10", "--no-report", "--out", str(tmp_path / "d")]) == 0
    assert "Dask local:2: 2 workers, 4 shards" in capsys.readouterr().out
    assert main(["evaluate", str(bundled_model), "--dataset", "sample", "--limit", "40", "--max-steps", "5",
                 "--sessions", "2", "--threads", "2", "--no-report", "--out", str(tmp_path / "s")]) == 0
    assert "2 sessions × 1 thread," in capsys.readouterr().out


def test_a_cluster_opened_before_a_refused_run_is_closed(bundled_model, tmp_path, monkeypatch):
    """The scheduler is reached before outputs are checked; when the output is then refused, the cluster closes."""
    import pyrobust.engine.dask as d

    closed = []
    real = d.disconnect
    monkeypatch.setattr(d, "disconnect", lambda c: (closed.append(c), real(c)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(pyrobust.OutputError, match="exists and is not a folder"):
        pyrobust.evaluate(bundled_model, "sample", limit=5, scheduler="local:1", out=tmp_path / "file")
    assert len(closed) == 1


def _serve_silence():
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []

    def accept():
        while True:
            try:
                held.append(srv.accept()[0])  # accepted, and never a byte in reply
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return srv, held


def test_a_scheduler_that_never_answers_is_given_up(bundled_model, monkeypatch):
    import time

    import pyrobust.engine.dask as d

    monkeypatch.setattr(d, "CONNECT_SECONDS", 2.0)
    srv, held = _serve_silence()
    start = time.monotonic()
    try:
        with pytest.raises(ClusterError, match="accepted the connection but did not answer within 2 s"):
            pyrobust.evaluate(bundled_model, "sample", limit=5, scheduler=f"tcp://127.0.0.1:{srv.getsockname()[1]}")
    finally:
        srv.close()
        for c in held:
            c.close()
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("skew", ["version", "sources"])
def test_a_worker_with_other_software_may_not_contribute(bundled_model, skew):
    from pyrobust.data.load import load_dataset
    from pyrobust.engine.backends import Layout, execute
    from pyrobust.engine.dask import connect, disconnect
    from pyrobust.engine.loop import bind_model

    def tamper(what):
        import pyrobust
        import pyrobust.engine.dask as wd

        wd.identity()
        if what == "version":
            pyrobust.__version__ = "0.0.9"
            wd._IDENTITY["pyrobust"] = "0.0.9"
        else:
            wd._IDENTITY["sources"] = "0" * 64
        return True

    connection = connect("local:2")
    try:
        client = connection[0]
        first = sorted(client.scheduler_info()["workers"])[0]
        client.run(tamper, skew, workers=[first])
        m = OnnxModel(bundled_model)
        ds = load_dataset("sample")
        spec = NoiseSpec(max_steps=5)
        m, spec = bind_model(m, ds, spec)
        with pytest.raises(ClusterError, match=rf"the Dask worker {first} runs other software .*{skew}"):
            execute(m, ds, spec, layout=Layout("dask", scheduler="local:2"), batch_size=64, connection=connection)
    finally:
        disconnect(connection)


def test_a_result_from_a_changed_worker_is_not_merged(bundled_model, monkeypatch):
    """A worker that changes after the start (or joins later) is caught by the identity its results carry."""
    import pyrobust.engine.dask as d
    from pyrobust.data.load import load_dataset
    from pyrobust.engine.backends import Layout, execute
    from pyrobust.engine.loop import bind_model

    connection = d.connect("local:1")
    try:
        monkeypatch.setattr(d, "check_workers", lambda client: 1)  # as if it had joined after the check

        def upgrade_numba():
            import pyrobust.engine.dask as wd

            wd.identity()
            wd._IDENTITY["numba"] = "0.1"

        connection[0].run(upgrade_numba)
        m = OnnxModel(bundled_model)
        ds = load_dataset("sample").select(limit=20)
        spec = NoiseSpec(max_steps=3)
        m, spec = bind_model(m, ds, spec)
        with pytest.raises(ClusterError, match="joined during the run runs other software .*numba 0.1"):
            execute(m, ds, spec, layout=Layout("dask", scheduler="local:1"), batch_size=16, connection=connection)
    finally:
        d.disconnect(connection)


def test_local_clusters_do_not_take_port_8787(bundled_model):
    """A local cluster serves its HTTP routes on a free loopback port: one holding 8787 (another cluster, a user's
    dashboard) does not stop a run."""
    import socket

    from pyrobust.engine.dask import connect, disconnect

    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("0.0.0.0", 8787))
            holder.listen()
        except OSError:
            pass  # already taken by something else: the point stands either way
        connection = connect("local:1")
        try:
            address = connection[0].dashboard_link
            assert "127.0.0.1" in address and ":8787" not in address, address
        finally:
            disconnect(connection)
    finally:
        holder.close()
