"""Scaling from 100 images to many cores and processes (issue: small sets, all cores, Dask).

* Small sets: 100 MNIST test images with the paper's settings, with and without step packing, against the
  large-batch throughput of the same model on 2,000 images (useful inferences per second: the clean pass plus the
  steps up to each image's first failure).
* Cores: each measurement in a subprocess pinned to N cores (sched_setaffinity), every session layout of N cores,
  throughput as a fraction of linear (N × the 1-core throughput). N runs over the powers of two this machine has.
* Dask: a LocalCluster with 2 worker processes against the single process on the same machine.

Run: ``python -m pytest benchmarks/test_bench_scaling.py`` (writes ``last_scaling.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

from pyrobust import evaluate

DATA = Path(os.environ.get("PYROBUST_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS: dict = {}
CORES = [n for n in (1, 2, 4, 8, 16) if n <= len(os.sched_getaffinity(0))]


@pytest.fixture(scope="module")
def model():
    with resources.as_file(resources.files("pyrobust") / "assets" / "mnist-cnn.onnx") as p:
        return str(p)


def _useful_rate(ev) -> float:
    return ev.summary["performance"]["useful_inferences_per_second"]


def test_large_batch_reference(benchmark, model):
    evaluate(model, "mnist:test", data_dir=DATA, limit=50, max_steps=3)  # warm-up
    holder = {}
    benchmark.pedantic(lambda: holder.update(ev=evaluate(model, "mnist:test", data_dir=DATA, limit=2000,
                                                         batch_size=256, sessions=1)), rounds=1, iterations=1)
    RESULTS["large_2000_images"] = _useful_rate(holder["ev"])


@pytest.mark.parametrize("pack", [True, False])
def test_small_set(benchmark, model, pack):
    from pyrobust.data.load import load_dataset
    from pyrobust.engine.loop import run_protocol
    from pyrobust.engine.runtime import OnnxModel
    from pyrobust.store.results import build_summary
    from pyrobust.types import NoiseSpec

    ds = load_dataset("mnist:test", data_dir=DATA, limit=100)
    m = OnnxModel(model)
    spec = NoiseSpec()
    run_protocol(m, ds.select(limit=10), NoiseSpec(max_steps=3))
    holder = {}
    benchmark.pedantic(lambda: holder.update(o=run_protocol(m, ds, spec, batch_size=256, pack=pack)), rounds=3,
                       iterations=1)
    o = holder["o"]
    s = build_summary(o, spec=spec, model={}, dataset={}, settings={}, n_classes=10)
    rate = s["performance"]["useful_inferences"] / benchmark.stats.stats.min
    RESULTS[f"small_100_images_pack_{pack}"] = {"useful_per_second": rate, "inferences": o.inferences,
                                                 "useful_inferences": s["performance"]["useful_inferences"]}


_CORE_SCRIPT = """
import json, os, sys
os.sched_setaffinity(0, set(range(int(sys.argv[1]))))
from pyrobust import evaluate
evaluate(sys.argv[2], "mnist:test", data_dir=sys.argv[3], limit=50, max_steps=3, sessions=1, threads=1)
ev = evaluate(sys.argv[2], "mnist:test", data_dir=sys.argv[3], limit=1000, batch_size=256,
              sessions=int(sys.argv[4]), threads=int(sys.argv[1]))
print(json.dumps(ev.summary["performance"]))
"""


@pytest.mark.parametrize("cores", CORES)
def test_cores(benchmark, model, cores):
    layouts = [(s, cores // s) for s in (1, 2, 4, 8, 16) if s <= cores and cores % s == 0]
    rates = {}

    def run():
        for sessions, per in layouts:
            out = subprocess.run([sys.executable, "-c", _CORE_SCRIPT, str(cores), model, str(DATA), str(sessions)],
                                 capture_output=True, text=True, check=True)
            rates[f"{sessions}x{per}"] = json.loads(out.stdout.strip().splitlines()[-1])[
                "useful_inferences_per_second"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS.setdefault("cores", {})[cores] = rates


def test_dask_overhead(benchmark, model):
    pytest.importorskip("dask.distributed")
    evaluate(model, "mnist:test", data_dir=DATA, limit=50, max_steps=3)
    times = {}

    def run():
        t = time.perf_counter()
        single = evaluate(model, "mnist:test", data_dir=DATA, limit=2000, batch_size=256)
        times["single"] = (time.perf_counter() - t, _useful_rate(single))
        t = time.perf_counter()
        dist = evaluate(model, "mnist:test", data_dir=DATA, limit=2000, batch_size=256, scheduler="local:2")
        times["local_2_workers"] = (time.perf_counter() - t, _useful_rate(dist))

    benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS["dask"] = {k: {"wall_seconds": v[0], "useful_per_second_in_engine": v[1]} for k, v in times.items()}


def test_report_scaling(capsys):
    large = RESULTS.get("large_2000_images")
    if large is None or "small_100_images_pack_True" not in RESULTS:
        pytest.skip("run the whole file")
    RESULTS["small_vs_large"] = RESULTS["small_100_images_pack_True"]["useful_per_second"] / large
    RESULTS["small_vs_large_without_packing"] = RESULTS["small_100_images_pack_False"]["useful_per_second"] / large
    if "cores" in RESULTS:
        one = max(RESULTS["cores"][1].values())
        RESULTS["fraction_of_linear"] = {n: max(r.values()) / (n * one) for n, r in RESULTS["cores"].items()}
    Path(__file__).with_name("last_scaling.json").write_text(json.dumps(RESULTS, indent=2) + "\n")
    with capsys.disabled():
        print("\n" + json.dumps(RESULTS, indent=2))
    assert RESULTS["small_vs_large"] >= 0.8
