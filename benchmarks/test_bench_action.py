"""The GitHub Action's run time with a cold and a warm numba kernel cache (what its actions/cache step saves), run
as a runner runs it (tests/test_ci_recipes.py's Runner): the bundled model, 1,000 MNIST test images, the paper's
noise. The cold run compiles every kernel into an empty cache folder; the warm run finds them there.

Run: ``python -m pytest benchmarks/test_bench_action.py`` (writes ``benchmarks/last_action.json``). The ratio is
cold / warm, measured in this one process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.test_ci_recipes import Runner

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PYROBUST_TEST_DATA", HERE.parents[1] / "shared" / "data"))
MODEL = HERE.parent / "pyrobust" / "assets" / "mnist-cnn.onnx"


def test_action_cold_and_warm(tmp_path, monkeypatch):
    if not (DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"needs the MNIST test set in {DATA}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # an empty kernel cache: the cold run fills it
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    seconds = {}
    for label in ("cold", "warm"):
        ws = tmp_path / label / "ws"
        (ws / "models").mkdir(parents=True)
        shutil.copy(MODEL, ws / "models" / "candidate.onnx")
        (ws / "gate.toml").write_text('[gate]\nmin_accuracy = "90%"\nmin_robust = "50%"\n')
        run = Runner(ws, {"model": "models/candidate.onnx", "config": "gate.toml", "dataset": "mnist:test",
                          "data-dir": str(DATA), "args": "--limit 1000", "pyrobust-version": "pyrobust"})
        t = time.perf_counter()
        assert run.run() == 0, "\n".join(run.log)
        seconds[label] = time.perf_counter() - t
    result = {"images": 1000, "cold_s": seconds["cold"], "warm_s": seconds["warm"],
              "cold_over_warm": seconds["cold"] / seconds["warm"]}
    (HERE / "last_action.json").write_text(json.dumps(result, indent=1) + "\n")
