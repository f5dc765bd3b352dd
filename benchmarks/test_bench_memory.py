"""Peak memory (RSS) of ``pyrobust evaluate`` on the 60,000 Fashion-MNIST training images, against 10,000 and 1,000
of them, from gzip files (decompressed into memory: 784 bytes an image) and from raw IDX files (read into memory), with
one session (each further parallel session adds its own slot and chunk buffers, ~26 MiB at the default chunk).

Each run is a fresh subprocess; peak RSS is its ``ru_maxrss``. Steps are limited to 3: memory does not depend on
the step budget, and the run still converts, perturbs and scores every image. Run: ``python -m pytest benchmarks``.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

DATA = Path(os.environ.get("PYROBUST_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS: dict[str, float] = {}

_SCRIPT = """
import json, resource, sys
from pyrobust import evaluate
ev = evaluate(sys.argv[1], "fashion-mnist:train", data_dir=sys.argv[2], limit=int(sys.argv[3]), max_steps=3,
              out=sys.argv[4], report=False, sessions=1, batch_size=256)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = lambda key: int(status[key].split()[0]) / 1024
print(json.dumps({"images": ev.outcome.n, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_rss_mib": kib("RssAnon"), "file_rss_mib": kib("RssFile")}))
"""


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw") / "fashion-mnist"
    d.mkdir()
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (d / f).write_bytes(gzip.decompress((DATA / "fashion-mnist" / f"{f}.gz").read_bytes()))
    return d.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 10-class model of the right shape: the bundled MNIST CNN (its accuracy on Fashion-MNIST is irrelevant)."""
    with resources.as_file(resources.files("pyrobust") / "assets" / "mnist-cnn.onnx") as p:
        return str(p)


@pytest.mark.parametrize("source", ["gzip", "raw"])
@pytest.mark.parametrize("images", [1000, 10000, 60000])
def test_peak_rss(benchmark, tmp_path, model, raw_dir, source, images):
    data_dir = str(DATA) if source == "gzip" else str(raw_dir)
    holder = {}

    def run():
        out = subprocess.run([sys.executable, "-c", _SCRIPT, model, data_dir, str(images), str(tmp_path / "o")],
                             capture_output=True, text=True, check=True)
        holder.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS[f"{source}_{images}"] = holder
    benchmark.extra_info.update(holder)


def test_report_memory(capsys):
    if len(RESULTS) < 6:
        pytest.skip("run the whole file")
    Path(__file__).with_name("last_memory.json").write_text(json.dumps(RESULTS, indent=2) + "\n")
    with capsys.disabled():
        print("\npeak RSS (MiB):", json.dumps(RESULTS, indent=2))
    peak = {k: v["peak_rss_mib"] for k, v in RESULTS.items()}
    # From gzip the whole file is decompressed (47 MiB for 60k images) whatever the limit; beyond it, 60k images
    # cost only per-image arrays and a full chunk buffer more than 1k images.
    assert peak["gzip_60000"] - peak["gzip_1000"] < 30
    # Raw files are read, not memory-mapped (a file rewritten during a run cannot change it): the same as gzip.
    assert all(abs(peak[f"gzip_{n}"] - peak[f"raw_{n}"]) < 10 for n in (1000, 10000, 60000))
