"""Models out of onnxruntime's own optimisation flow (QDQ and QOperator from ``quantize_static``,
``quantize_dynamic``) and fp16 from onnxconverter-common load, evaluate and gate against their fp32 parent, with each
model's throughput in the gate's record and the per-image flips from ``compare``. ``quant_pre_process`` declares
operator domains its output never uses (ai.onnx.preview, org.pytorch.aten, ...), which pyrobust used to refuse; only
the domains the nodes use count."""

from __future__ import annotations

import json
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
    from onnxconverter_common import float16

    out["fp16"] = d / "fp16.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(bundled_model)), keep_io_types=True), str(out["fp16"]))
    return out


def test_the_pre_processor_declares_domains_it_does_not_use(variants):
    proto = onnx.load(str(variants["pre"]))
    declared = {o.domain for o in proto.opset_import}
    assert {"ai.onnx.preview", "org.pytorch.aten"} <= declared  # what made pyrobust refuse it
    assert used_domains(proto) <= {"", "ai.onnx", "com.microsoft"}


def test_the_fp16_variant_computes_in_half_precision(variants):
    proto = onnx.load(str(variants["fp16"]))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert [n.op_type for n in proto.graph.node].count("Cast") >= 2


@pytest.mark.parametrize("variant", ["pre", "QDQ", "QOperator", "dynamic", "fp16"])
def test_each_variant_evaluates_and_gates_against_its_parent(variant, variants, bundled_model, tmp_path, capsys):
    OnnxModel(variants[variant], threads=1)  # loads
    code = main(["gate", str(variants[variant]), "--dataset", "sample", "--limit", "200", "--max-steps", "20",
                 "--baseline", str(bundled_model), "--max-robust-drop", "10%", "--max-accuracy-drop", "5%",
                 "--out", str(tmp_path / "g"), "--summary", str(tmp_path / "g.md")])
    out, err = capsys.readouterr()
    assert code == 0, err + out
    assert "max_robust_drop" in out and "gate PASS" in out
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    tp = g["work"]["throughput"]
    # both models ran the same images: the clean pass (200 each) and the noise looks
    assert tp["candidate"]["inferences"] + tp["baseline"]["inferences"] == g["inferences"]
    assert tp["baseline"]["inferences"] >= 200 and tp["candidate"]["seconds"] > 0
    assert tp["candidate_vs_baseline"] == pytest.approx(
        tp["candidate"]["inferences_per_second"] / tp["baseline"]["inferences_per_second"])
    line = next(x for x in out.splitlines() if x.startswith("throughput: "))
    assert f"({tp['candidate_vs_baseline']:.2f}× the baseline's" in line
    assert line[0].upper() + line[1:] in (tmp_path / "g.md").read_text()


def test_compare_lists_the_images_a_variant_flips(variants, bundled_model, tmp_path, capsys):
    runs = {}
    for name, path in (("fp32", bundled_model), ("QDQ", variants["QDQ"])):
        runs[name] = tmp_path / name
        assert main(["evaluate", str(path), "--dataset", "sample", "--limit", "150", "--max-steps", "30",
                     "--out", str(runs[name])]) == 0
    assert main(["compare", str(runs["fp32"]), str(runs["QDQ"]), "--out", str(tmp_path / "cmp")]) == 0
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    a = np.load(runs["fp32"] / "results.npz")
    b = np.load(runs["QDQ"] / "results.npz")
    ra, rb = a["first_failure"] == -1, b["first_failure"] == -1  # robust: never fooled
    fragile, robust = np.flatnonzero(ra & ~rb), np.flatnonzero(~ra & rb)
    assert c["newly_fragile"]["count"] == fragile.size and c["newly_robust"]["count"] == robust.size
    assert sorted(c["newly_fragile"]["index"]) == sorted(a["index"][fragile].tolist())
    assert sorted(c["newly_robust"]["index"]) == sorted(a["index"][robust].tolist())
