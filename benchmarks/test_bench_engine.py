"""Throughput of the evaluation engine against bare onnxruntime and a plain PyTorch loop, the noise kernel alone,
numba's compile time with and without its cache, and the numba/onnxruntime thread-pool interaction.

Run: ``python -m pytest benchmarks`` (not part of the default test run). Every ratio is between runs made in this
one process, on 2000 MNIST test images with the paper's settings (28 pixels, 250 steps, uniform [0, 1)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import perturbcore
from pyrobust.data.load import load_dataset
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.machine import default_threads
from pyrobust.types import NoiseSpec

torch = pytest.importorskip("torch")
from benchmarks.torch_protocol import torch_model_from_onnx, torch_protocol  # noqa: E402

DATA = Path(os.environ.get("PYROBUST_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
N_IMAGES = 2000
BATCH = 256
THREADS = default_threads()
PAPER = NoiseSpec()  # 28 pixels, 250 steps, uniform [0, 1), restart
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def model_path():
    with resources.as_file(resources.files("pyrobust") / "assets" / "mnist-cnn.onnx") as p:
        return Path(p)


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist:test", data_dir=DATA, limit=N_IMAGES)


def _record(name, benchmark, inferences, **extra):
    seconds = benchmark.stats.stats.min
    RESULTS[name] = {"inferences": inferences, "seconds": seconds, "inferences_per_second": inferences / seconds,
                     **extra}
    benchmark.extra_info.update(RESULTS[name])


def test_engine(benchmark, model_path, data):
    model = OnnxModel(model_path, threads=THREADS)
    run_protocol(model, data.select(limit=64), NoiseSpec(max_steps=3))  # JIT and session warm-up
    holder = {}

    def run():
        holder["o"] = run_protocol(model, data, PAPER, batch_size=BATCH)

    benchmark.pedantic(run, rounds=2, iterations=1)
    o = holder["o"]
    _record("engine", benchmark, o.inferences, robust=int((o.first_failure == -1).sum()))


def test_driver(benchmark, model_path, data):
    """The same run through the driver every command uses (pyrobust.engine.backends.execute: updates folded into
    the run state after each batch, progress and checkpoint hooks), in this thread."""
    from pyrobust.engine.backends import Layout, execute
    from pyrobust.engine.loop import bind_model

    model = OnnxModel(model_path, threads=THREADS)
    model, spec = bind_model(model, data, PAPER)
    execute(model, data.select(limit=64), NoiseSpec(max_steps=3), layout=Layout())
    holder = {}

    def run():
        holder["o"], _ = execute(model, data, spec, layout=Layout(), batch_size=BATCH, progress=lambda *a: None)

    benchmark.pedantic(run, rounds=2, iterations=1)
    _record("driver", benchmark, holder["o"].inferences)


def test_bare_onnxruntime(benchmark, model_path, data):
    """The same number of inferences, in full batches of the same size, on a session with onnxruntime's default
    options (spinning on) and the same thread count: nothing but inference."""
    total = RESULTS["engine"]["inferences"] if "engine" in RESULTS else 400_000
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(data.float_images(0, BATCH).transpose(0, 3, 1, 2))
    for _ in range(5):
        sess.run(None, {"image": x})
    calls = -(-total // BATCH)

    def run():
        for _ in range(calls):
            sess.run(None, {"image": x})

    benchmark.pedantic(run, rounds=2, iterations=1)
    _record("bare_onnxruntime", benchmark, calls * BATCH)


def test_torch_loop(benchmark, model_path, data):
    torch.set_num_threads(THREADS)
    net = torch_model_from_onnx(model_path)
    images, labels = data.float_images(), data.labels
    torch_protocol(net, images[:64], labels[:64], max_steps=2)
    holder = {}

    def run():
        holder["r"] = torch_protocol(net, images, labels, batch_size=BATCH)

    benchmark.pedantic(run, rounds=1, iterations=1)
    first, inferences = holder["r"]
    _record("torch_loop", benchmark, inferences, robust=int((first == -1).sum()))


def test_noise_kernel(benchmark, data):
    """The kernel alone: one batch of 256 MNIST images at the paper's settings, written into a model buffer."""
    src = data.float_images(0, BATCH).reshape(BATCH, -1).copy()
    out = np.empty_like(src)
    idx = data.index[:BATCH].copy()
    steps = np.arange(1, BATCH + 1, dtype=np.int64)
    rows = np.arange(BATCH, dtype=np.int64)

    def run():
        perturbcore.perturb_flat(src, rows=rows, indices=idx, steps=steps, out=out, pixels=28, n_positions=784,
                                 channels=1, seed=0, threads=1)

    run()
    benchmark(run)
    seconds = benchmark.stats.stats.median
    RESULTS["noise_kernel"] = {"batch": BATCH, "seconds_per_batch": seconds, "images_per_second": BATCH / seconds}
    benchmark.extra_info.update(RESULTS["noise_kernel"])


_COMPILE_SCRIPT = """
import json, time
t0 = time.perf_counter()
import numpy as np
import perturbcore
t1 = time.perf_counter()
x = np.zeros((2, 16), np.float32)
perturbcore.perturb_flat(x, indices=[0, 1], steps=[1, 1], pixels=2, n_positions=16, channels=1, seed=0)
perturbcore.predict(np.zeros((2, 3), np.float32))
z = np.zeros(2, np.int64)
perturbcore.record_batch(np.zeros(2, np.int32), z, slot_label=z, slot_step=z.copy(), slot_pos=z, max_steps=1,
                         clean_prediction=np.zeros(2, np.int32), first_failure=np.zeros(2, np.int32),
                         failure_label=np.zeros(2, np.int32))
perturbcore.random_u64(0, [0], [0], [0])
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first_calls": t2 - t1}))
"""


def test_numba_compile_time(benchmark, tmp_path):
    """First calls of every kernel in a fresh process: with an empty cache (compile) and with a warm one (load)."""

    def once(cache_dir):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
        out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)

    cold = [once(tmp_path / f"cold{i}") for i in range(2)]
    warm_dir = tmp_path / "warm"
    once(warm_dir)
    warm = []
    benchmark.pedantic(lambda: warm.append(once(warm_dir)), rounds=3, iterations=1)
    RESULTS["numba_compile"] = {
        "cold_first_calls_s": min(c["first_calls"] for c in cold),
        "cached_first_calls_s": min(w["first_calls"] for w in warm),
        "import_s": min(w["import"] for w in warm),
    }
    benchmark.extra_info.update(RESULTS["numba_compile"])


@pytest.mark.parametrize("kernel_threads,spinning", [(1, False), (1, True), (THREADS, False), (THREADS, True)])
def test_thread_pools(benchmark, monkeypatch, model_path, data, kernel_threads, spinning):
    """numba's pool beside onnxruntime's: the engine's choice (serial kernel, passive onnxruntime threads) against
    a parallel kernel (patched in: the engine has no such option, this measurement is why) and/or spinning
    onnxruntime workers, on 500 images."""
    from perturbcore.noise import PreparedNoise

    serial = PreparedNoise.perturb
    monkeypatch.setattr(PreparedNoise, "perturb", lambda self, *a, threads=1: serial(self, *a, threads=kernel_threads))
    model = OnnxModel(model_path, threads=THREADS, spinning=spinning)
    ds = data.select(limit=500)
    run_protocol(model, ds.select(limit=64), NoiseSpec(max_steps=3))
    holder = {}

    def run():
        holder["o"] = run_protocol(model, ds, PAPER, batch_size=BATCH)

    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(f"pools_kernel{kernel_threads}_spin{int(spinning)}", benchmark, holder["o"].inferences)


def test_ratios(capsys):
    """The claims, from the runs above (run the whole file)."""
    needed = ("engine", "bare_onnxruntime", "torch_loop")
    if not all(k in RESULTS for k in needed):
        pytest.skip("run the whole benchmarks file: the ratios need the engine and both baselines")
    ips = {k: RESULTS[k]["inferences_per_second"] for k in needed}
    RESULTS["ratios"] = {
        "engine_vs_bare_onnxruntime": ips["engine"] / ips["bare_onnxruntime"],
        "engine_vs_torch_loop": ips["engine"] / ips["torch_loop"],
        **({"driver_vs_bare_onnxruntime": RESULTS["driver"]["inferences_per_second"] / ips["bare_onnxruntime"]}
           if "driver" in RESULTS else {}),
        "threads": THREADS, "batch_size": BATCH, "images": N_IMAGES,
    }
    out = Path(__file__).with_name("last_run.json")
    out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    with capsys.disabled():
        print("\n" + json.dumps(RESULTS, indent=2))
    assert RESULTS["ratios"]["engine_vs_bare_onnxruntime"] >= 0.9
    assert RESULTS["ratios"]["engine_vs_torch_loop"] >= 5.0
