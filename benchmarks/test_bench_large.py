"""Large RGB images: a ResNet-style 224×224×3 classifier (10 classes, exported from torch), the engine against bare
onnxruntime on the same number of inferences in batches of the same size, in one process.

At this size inference dominates: each image is 150,528 floats, and 3.5 % of the pixel positions (1,757) are
redrawn per step. The ratio says what the engine (noise kernel, slot bookkeeping, layout conversion) costs on top
of inference. Run: ``python -m pytest benchmarks/test_bench_large.py -p no:cacheprovider``; the figures go to
``benchmarks/last_large.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pyrobust.data.dataset import from_arrays
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.machine import default_threads
from pyrobust.types import NoiseSpec

torch = pytest.importorskip("torch")

THREADS = default_threads()
BATCH = 16
N_IMAGES = 48
SPEC = NoiseSpec(pixels="3.5%", max_steps=12, seed=0)
RESULTS: dict[str, dict] = {}
OUT = Path(__file__).with_name("last_large.json")


def _resnetish():
    nn = torch.nn

    def block(c_in, c_out, stride):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         block(32, 32, 1), block(32, 64, 2), block(64, 128, 2), block(128, 256, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)).eval()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from pyrobust.training import export_onnx

    path = tmp_path_factory.mktemp("large") / "resnetish224.onnx"
    export_onnx(_resnetish(), (224, 224, 3), path)
    return path


@pytest.fixture(scope="module")
def data(model_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N_IMAGES, 224, 224, 3), dtype=np.uint8)
    m = OnnxModel(model_path, threads=THREADS)
    m = m.bind((224, 224, 3), n_classes=10)
    y = np.argmax(m.run(m.to_flat(x.astype(np.float32) / 255)), axis=1)  # its own answers: every image counts
    return from_arrays(x, y)


def _record(name, benchmark, inferences, **extra):
    seconds = benchmark.stats.stats.min
    RESULTS[name] = {"inferences": inferences, "seconds": seconds, "inferences_per_second": inferences / seconds,
                     **extra}
    benchmark.extra_info.update(RESULTS[name])


def test_engine_224(benchmark, model_path, data):
    model = OnnxModel(model_path, threads=THREADS)
    run_protocol(model, data.select(limit=2), NoiseSpec(max_steps=1))  # warm-up
    holder = {}

    def run():
        holder["o"] = run_protocol(model, data, SPEC, batch_size=BATCH)

    benchmark.pedantic(run, rounds=2, iterations=1)
    _record("engine_224", benchmark, holder["o"].inferences)


def test_bare_onnxruntime_224(benchmark, model_path, data):
    total = RESULTS["engine_224"]["inferences"] if "engine_224" in RESULTS else N_IMAGES * 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(data.float_images(0, BATCH).transpose(0, 3, 1, 2))
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    calls = -(-total // BATCH)

    def run():
        for _ in range(calls):
            sess.run(None, {name: x})

    benchmark.pedantic(run, rounds=2, iterations=1)
    _record("bare_onnxruntime_224", benchmark, calls * BATCH)


def test_ratio_224():
    if not {"engine_224", "bare_onnxruntime_224"} <= set(RESULTS):
        pytest.skip("run the whole file: the ratio needs both runs")
    ratio = RESULTS["engine_224"]["inferences_per_second"] / RESULTS["bare_onnxruntime_224"]["inferences_per_second"]
    RESULTS["ratio_engine_to_bare"] = {"value": ratio, "threads": THREADS, "batch": BATCH,
                                       "pixels": 1757, "image": "224x224x3"}
    OUT.write_text(json.dumps(RESULTS, indent=2) + "\n")
    assert ratio > 0.5
