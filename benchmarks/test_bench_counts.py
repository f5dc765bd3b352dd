"""What failure counts cost: the counting protocol (every step of every correctly classified image) against the
first-failure protocol, on the study's committed CNNs (``docs/results/DATASET/models/M.onnx`` and ``M_R.onnx``),
timed in this one process on the same 1000 test images with the paper's settings (28 pixels, 250 steps).

The ratio is wall time counting / wall time first-failure; the issue expects 1.1-1.4x on the study's CNNs, whose
robust fractions are high (a robust image costs all 250 steps either way; only fooled images cost more).

Run: ``python -m pytest benchmarks/test_bench_counts.py`` (about 3 minutes on 2 cores; needs the MNIST and
Fashion-MNIST test files under ``../shared/data`` or ``$PYROBUST_TEST_DATA``); writes ``last_counts.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pyrobust.data.load import load_dataset
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.machine import default_threads
from pyrobust.types import NoiseSpec

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PYROBUST_TEST_DATA", ROOT.parent / "shared" / "data"))
N_IMAGES = 1000
RESULTS: dict[str, dict] = {}


def _data(name):
    try:
        return load_dataset(f"{name}:test", data_dir=DATA, limit=N_IMAGES)
    except Exception as exc:  # a user's clone has no data
        pytest.skip(f"needs the {name} test files under {DATA} ({type(exc).__name__})")


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("model", ["M", "M_R"])
@pytest.mark.parametrize("protocol", ["first-failure", "counts"])
def test_protocol_cost(benchmark, dataset, model, protocol):
    data = _data(dataset)
    m = OnnxModel(ROOT / "docs" / "results" / dataset / "models" / f"{model}.onnx", threads=default_threads())
    spec = NoiseSpec(count_failures=protocol == "counts")
    run_protocol(m, data.select(limit=32), NoiseSpec(max_steps=3))  # JIT and session warm-up
    holder = {}

    def run():
        holder["out"] = run_protocol(m, data, spec, batch_size=256)

    benchmark.pedantic(run, rounds=2, iterations=1)
    out = holder["out"]
    RESULTS[f"{dataset}/{model}/{protocol}"] = {
        "seconds": benchmark.stats.stats.min, "inferences": int(out.inferences),
        "robust_of_correct": float(out.robust.sum() / max(1, out.correct.sum())),
        "mean_failures_of_fooled": float(np.mean(out.failures[out.first_failure > 0]))
        if out.failures is not None and (out.first_failure > 0).any() else None}


def test_write_ratios():
    rows = {}
    for key in sorted({k.rsplit("/", 1)[0] for k in RESULTS}):
        first, counts = RESULTS.get(f"{key}/first-failure"), RESULTS.get(f"{key}/counts")
        if first and counts:
            rows[key] = {"first_failure_seconds": first["seconds"], "counts_seconds": counts["seconds"],
                         "ratio": counts["seconds"] / first["seconds"],
                         "inference_ratio": counts["inferences"] / first["inferences"],
                         "robust_of_correct": first["robust_of_correct"]}
    if not rows:
        pytest.skip("no dataset was available")
    (Path(__file__).parent / "last_counts.json").write_text(json.dumps(rows, indent=1) + "\n")
    for row in rows.values():
        assert row["inference_ratio"] >= 1
