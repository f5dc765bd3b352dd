"""Models out of onnxruntime's own optimisation flow load, evaluate and gate against their fp32 parent:
``quant_pre_process`` declares operator domains its output never uses (ai.onnx.preview, org.pytorch.aten, ...),
which pyrobust used to refuse; only the domains the nodes use count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pyrobust.cli import main
from pyrobust.engine.modelfile import used_domains
from pyrobust.engine.runtime import OnnxModel

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier

quantization = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime's quantiser")


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self, name: str, images: np.ndarray) -> None:
        self._it = iter([{name: images[i:i + 1].transpose(0, 3, 1, 2).astype(np.float32)} for i in range(32)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def variants(tmp_path_factory, bundled_model, sample) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quant")
    pre = d / "pre.onnx"
    quantization.quant_pre_process(str(bundled_model), str(pre))
    name = onnx.load(str(pre)).graph.input[0].name
    out = {"pre": pre}
    for fmt in ("QDQ", "QOperator"):
        out[fmt] = d / f"{fmt}.onnx"
        quantization.quantize_static(str(pre), str(out[fmt]), _Calibration(name, sample.float_images(0, 32)),
                                     quant_format=getattr(quantization.QuantFormat, fmt))
    out["dynamic"] = d / "dynamic.onnx"
    quantization.quantize_dynamic(str(pre), str(out["dynamic"]))
    return out


def test_the_pre_processor_declares_domains_it_does_not_use(variants):
    proto = onnx.load(str(variants["pre"]))
    declared = {o.domain for o in proto.opset_import}
    assert {"ai.onnx.preview", "org.pytorch.aten"} <= declared  # what made pyrobust refuse it
    assert used_domains(proto) <= {"", "ai.onnx", "com.microsoft"}


@pytest.mark.parametrize("variant", ["pre", "QDQ", "QOperator", "dynamic"])
def test_each_variant_evaluates_and_gates_against_its_parent(variant, variants, bundled_model, tmp_path, capsys):
    OnnxModel(variants[variant], threads=1)  # loads
    code = main(["gate", str(variants[variant]), "--dataset", "sample", "--limit", "200", "--max-steps", "20",
                 "--baseline", str(bundled_model), "--max-robust-drop", "10%", "--max-accuracy-drop", "5%",
                 "--out", str(tmp_path / "g")])
    out, err = capsys.readouterr()
    assert code == 0, err + out
    assert "max_robust_drop" in out and "gate PASS" in out
