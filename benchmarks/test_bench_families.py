"""What each noise family costs: its kernel against one inference of the bundled CNN, and the whole engine against
bare onnxruntime with a family in force (the L0 noise as the baseline, measured in the same process).

Run: ``python -m pytest benchmarks/test_bench_families.py`` (writes ``benchmarks/last_families.json`` and ``.md``).
Every number is a ratio of times measured in this one process, interleaved, best of the rounds.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import perturbcore
from perturbcore.families import FAMILIES, Sweep, parse, prepare
from pyrobust.data.load import load_dataset
from pyrobust.engine.loop import run_protocol
from pyrobust.engine.runtime import OnnxModel
from pyrobust.machine import default_threads
from pyrobust.types import NoiseSpec

HERE = Path(__file__).resolve().parent
RANDOM = {name: cls for name, cls in FAMILIES.items() if not issubclass(cls, Sweep)}
BATCH = 256
THREADS = default_threads()
ROUNDS = 5
# Mild settings: most images survive, so a run is mostly full batches of noise (what a family's cost shows in)
ENGINE_FAMILIES = [None, "uniform:eps=0.05", "gaussian:sigma=0.05", "impulse:density=0.005", "dropout:rate=0.01",
                   "patch:size=3", "speckle:sigma=0.1"]
RESULTS: dict = {}


@pytest.fixture(scope="module")
def model_path():
    with resources.as_file(resources.files("pyrobust") / "assets" / "mnist-cnn.onnx") as p:
        return Path(p)


def _best(fn, *args, rounds=ROUNDS):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def _session(model_path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def test_kernel_cost_against_one_inference(model_path):
    """Each family's kernel on a batch of 256 images, serial as the engine runs it, against one batch inference of
    the bundled CNN (28×28 grey); and per image at 32×32 RGB and 224×224 RGB (channels first)."""
    sess = _session(model_path)
    x = np.random.default_rng(0).random((BATCH, 784), dtype=np.float32)
    feed = {sess.get_inputs()[0].name: x.reshape(BATCH, 1, 28, 28)}
    for _ in range(5):
        sess.run(None, feed)
    rows = np.arange(BATCH, dtype=np.int64)
    out = np.empty_like(x)
    table = {}
    kernels = {"l0:pixels=28": perturbcore.prepare_noise(pixels=28, n_positions=784, channels=1, seed=0)}
    kernels.update({name: prepare(cls(), height=28, width=28, channels=1, seed=0) for name, cls in RANDOM.items()})
    inference = _best(sess.run, None, feed, rounds=10)
    for name, k in kernels.items():
        steps = np.arange(1, BATCH + 1, dtype=np.int64)
        k.perturb(x, rows, steps, rows, out)
        seconds = min(_best(k.perturb, x, rows, steps, rows, out, rounds=10),
                      _best(k.perturb, x, rows, steps + 7, rows, out, rounds=10))
        inference = min(inference, _best(sess.run, None, feed, rounds=3))
        table[name] = {"kernel_ms_per_batch": seconds * 1e3}
    for row in table.values():
        row["of_one_inference"] = row["kernel_ms_per_batch"] / (inference * 1e3)
    for h, n in ((32, 64), (224, 4)):
        big = np.random.default_rng(1).random((n, h * h * 3), dtype=np.float32)
        bout = np.empty_like(big)
        r = np.arange(n, dtype=np.int64)
        for name, cls in RANDOM.items():
            f = cls()
            if name == "patch":
                f = parse("patch:size=8")
            k = prepare(f, height=h, width=h, channels=3, seed=0, channels_first=True)
            k.perturb(big, r, r + 1, r, bout)
            table[name][f"us_per_image_{h}x{h}x3"] = _best(k.perturb, big, r, r + 1, r, bout) / n * 1e6
    RESULTS["kernels"] = {"inference_ms_per_batch": inference * 1e3, "batch": BATCH, "threads": THREADS,
                          "families": table}


def test_engine_against_bare_onnxruntime(model_path):
    """The engine (one session, ``THREADS`` threads, batch 256) on the bundled sample at 250 steps with each family,
    against the same number of inferences on a bare onnxruntime session; rounds interleaved."""
    ds = load_dataset("sample")
    model = OnnxModel(model_path, threads=THREADS)
    sess = _session(model_path)
    xb = np.ascontiguousarray(ds.float_images(0, BATCH).transpose(0, 3, 1, 2))
    feed = {sess.get_inputs()[0].name: xb}
    table = {}
    for text in ENGINE_FAMILIES:
        spec = NoiseSpec() if text is None else NoiseSpec(corruption=text)
        run_protocol(model, ds.select(limit=64), NoiseSpec(max_steps=3, corruption=spec.corruption))  # compile, warm
        holder = {}
        engine, bare = [], []
        for _ in range(3):
            t = time.perf_counter()
            holder["o"] = run_protocol(model, ds, spec, batch_size=BATCH)
            engine.append(time.perf_counter() - t)
            calls = -(-holder["o"].inferences // BATCH)
            t = time.perf_counter()
            for _ in range(calls):
                sess.run(None, feed)
            bare.append((time.perf_counter() - t) / (calls * BATCH) * holder["o"].inferences)
        o = holder["o"]
        table[text or "l0:pixels=28 (the paper's)"] = {
            "inferences": o.inferences, "robust": int(o.robust.sum()), "engine_s": min(engine), "bare_s": min(bare),
            "engine_over_bare": min(bare) / min(engine)}
    RESULTS["engine"] = {"images": ds.n, "max_steps": 250, "batch": BATCH, "threads": THREADS, "families": table}


def test_write_results():
    if "kernels" not in RESULTS or "engine" not in RESULTS:
        pytest.skip("the measurements did not run")
    (HERE / "last_families.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
    k, e = RESULTS["kernels"], RESULTS["engine"]
    lines = [f"Kernel per batch of {k['batch']} (28×28 grey, serial) against one inference of the bundled CNN "
             f"({k['inference_ms_per_batch']:.2f} ms, {k['threads']} threads):", "",
             "| family | kernel ms / batch | of one inference | µs / image 32×32×3 | µs / image 224×224×3 |",
             "|---|---|---|---|---|"]
    for name, row in k["families"].items():
        lines.append(f"| {name} | {row['kernel_ms_per_batch']:.3f} | {row['of_one_inference']:.3f}× | "
                     f"{row.get('us_per_image_32x32x3', float('nan')):.1f} | "
                     f"{row.get('us_per_image_224x224x3', float('nan')):.0f} |")
    lines += ["", f"Engine against bare onnxruntime, {e['images']} images × {e['max_steps']} steps, batch "
              f"{e['batch']}, {e['threads']} threads (1.0: the engine costs nothing beside inference):", "",
              "| noise | inferences | engine / bare onnxruntime |", "|---|---|---|"]
    for name, row in e["families"].items():
        lines.append(f"| {name} | {row['inferences']:,} | {row['engine_over_bare']:.2f}× |")
    (HERE / "last_families.md").write_text("\n".join(lines) + "\n")
