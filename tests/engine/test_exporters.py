"""Models from other tools: scikit-learn's outputs (labels, ZipMaps, probabilities), several candidate outputs,
0-255 and uint8 inputs, normalisation stated in metadata, and the warnings that keep a wrong setup from passing
for a measurement. The graphs are built by hand with the operators the exporters emit (skl2onnx's
LinearClassifier + ZipMap; the Cast / Div prefix of Keras and torch exports that take 0-255 or uint8 pixels)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import perturbcore
import pyrobust
from pyrobust.cli import main
from pyrobust.engine.loop import NormalisationWarning
from pyrobust.engine.runtime import LabelsDisagreeWarning, OnnxModel
from pyrobust.errors import InvalidInput, ModelError
from pyrobust.evaluation import ResultLooksWrongWarning
from tests import naive

FAST = dict(limit=80, max_steps=15, batch_size=64, sessions=1)


def _linear(classes=10):
    """A nearest-class-mean classifier of the bundled sample: far above chance, as a fitted model would be."""
    from pyrobust.data.load import bundled_sample

    ds = bundled_sample()
    x = ds.float_images().reshape(ds.n, -1)
    means = np.stack([x[ds.labels == k].mean(axis=0) for k in range(classes)])
    coef = 20 * means
    return coef.astype(np.float32), (-10 * (means**2).sum(axis=1)).astype(np.float32)


def _sklearn_model(path, *, zipmap=True, zipmap_first=False, string_labels=False, label_offset=0):
    """What skl2onnx writes for a LogisticRegression on 28x28 images: a flat float input, LinearClassifier (labels
    and probabilities) and, by default, a ZipMap of the probabilities."""
    coef, intercept = _linear()
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1)]
    labels = ([str(k) for k in range(10)] if string_labels else None)
    attrs = dict(coefficients=coef.ravel().tolist(), intercepts=intercept.tolist(), post_transform="SOFTMAX",
                 multi_class=1)
    if string_labels:
        attrs["classlabels_strings"] = labels
    else:
        attrs["classlabels_ints"] = [k + label_offset for k in range(10)]
    nodes.append(helper.make_node("LinearClassifier", ["flat"], ["label", "probabilities"], domain="ai.onnx.ml",
                                  **attrs))
    label_type = TensorProto.STRING if string_labels else TensorProto.INT64
    outs = [helper.make_tensor_value_info("label", label_type, ["N"])]
    if zipmap:
        key = "classlabels_strings" if string_labels else "classlabels_int64s"
        nodes.append(helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                                      **{key: labels if string_labels else list(range(10))}))
        kt = TensorProto.STRING if string_labels else TensorProto.INT64
        outs.append(helper.make_value_info("output_probability", helper.make_sequence_type_proto(
            helper.make_map_type_proto(kt, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))))
    else:
        outs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]))
    if zipmap_first:
        outs.reverse()
    graph = helper.make_graph(nodes, "skl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _prefixed(path, bundled_model, *, uint8=False, metadata=None):
    """The bundled CNN behind a prefix: it takes 0-255 pixels (float, or uint8 when ``uint8``) and divides by 255."""
    base = onnx.load(str(bundled_model))
    graph = base.graph
    inner = graph.input[0].name
    elem = TensorProto.UINT8 if uint8 else TensorProto.FLOAT
    prefix = [helper.make_node("Cast", ["pixels"], ["pixels_f"], to=TensorProto.FLOAT)] if uint8 else []
    prefix.append(helper.make_node("Div", ["pixels_f" if uint8 else "pixels", "c255"], [inner]))
    graph.initializer.append(helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]))
    nodes = prefix + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("pixels", elem, ["N", 1, 28, 28]))
    del base.metadata_props[:]
    for k, v in (metadata or {}).items():
        base.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(base, str(path))
    return path


# ------------------------------------------------------------------------------------------------ output choice
def test_every_sklearn_form_is_evaluated_alike(tmp_path):
    forms = {"zipmap": {}, "zipmap_first": {"zipmap_first": True}, "probabilities": {"zipmap": False}}
    runs = {name: pyrobust.evaluate(_sklearn_model(tmp_path / f"{name}.onnx", **kw), "sample", **FAST)
            for name, kw in forms.items()}
    ref = runs["probabilities"]
    for name, ev in runs.items():
        assert np.array_equal(ev.first_failure, ref.first_failure), name
        assert ev.summary["model"]["output"] in ("output_probability", "probabilities")
    assert runs["zipmap"].summary["model"]["output_type"].startswith("seq(map(")


def test_the_label_output_is_checked_against_the_scores(tmp_path):
    m = OnnxModel(_sklearn_model(tmp_path / "a.onnx"))
    assert m.label_output.name == "label" and m.zipmap
    m = m.bind((28, 28, 1), n_classes=10)
    assert m.label_agreement == 1.0
    shifted = _sklearn_model(tmp_path / "b.onnx", label_offset=0, zipmap=False)
    proto = onnx.load(str(shifted))  # labels that are not the argmax: a mislabelled export
    for node in proto.graph.node:
        if node.op_type == "LinearClassifier":
            for a in node.attribute:
                if a.name == "classlabels_ints":
                    a.ints[:] = [(k + 1) % 10 for k in range(10)]
    onnx.save(proto, str(shifted))
    with pytest.warns(LabelsDisagreeWarning, match="label output 'label' differs from the argmax"):
        OnnxModel(shifted).bind((28, 28, 1), n_classes=10)


def test_string_class_labels_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ModelError, match="ZipMap's classes are str labels; pyrobust needs integer class labels"):
        pyrobust.evaluate(_sklearn_model(tmp_path / "s.onnx", string_labels=True), "sample", **FAST)


def _two_outputs(path, bundled_model):
    """The CNN's logits beside a 120-wide 'embedding' (a float N×C output that is not the scores)."""
    base = onnx.load(str(bundled_model))
    g = base.graph
    flat_src = g.input[0].name
    g.node.extend([helper.make_node("Flatten", [flat_src], ["flat_e"], axis=1),
                   helper.make_node("MatMul", ["flat_e", "We"], ["embedding"])])
    g.initializer.append(helper.make_tensor("We", TensorProto.FLOAT, [784, 120],
                                            np.random.default_rng(0).normal(size=784 * 120).astype(np.float32)))
    logits = g.output[0]
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 120]), logits])
    onnx.save(base, str(path))
    return path


@pytest.mark.slow
def test_several_candidate_outputs_are_refused_until_one_is_named(tmp_path, bundled_model, capsys):
    model = _two_outputs(tmp_path / "two.onnx", bundled_model)
    with pytest.raises(ModelError, match=r"2 outputs could be class scores \('embedding' tensor\(float\) \[N, 120\]; "
                                         r"'logits'.*pass --output NAME"):
        pyrobust.evaluate(model, "sample", **FAST)
    ev = pyrobust.evaluate(model, "sample", output="logits", **FAST)
    ref = pyrobust.evaluate(bundled_model, "sample", **FAST)
    assert np.array_equal(ev.first_failure, ref.first_failure) and ev.summary["model"]["output"] == "logits"
    assert main(["evaluate", str(model), "--dataset", "sample", "--output", "embedding", "--limit", "40",
                 "--max-steps", "5", "--out", str(tmp_path / "o"), "--no-report", "--quiet"]) == 0
    assert "predictions_outside_labels" in json.loads((tmp_path / "o" / "summary.json").read_text())["metrics"]
    err = capsys.readouterr().err
    assert "classes >= 10, which the labels never use" in err and "accuracy" in err  # both sanity warnings
    assert main(["evaluate", str(model), "--dataset", "sample", "--output", "nope", "--out",
                 str(tmp_path / "p")]) == 3
    assert "no output named 'nope'; the model's outputs are: 'embedding'" in capsys.readouterr().err


def test_a_label_output_is_never_scores(tmp_path):
    with pytest.raises(ModelError, match="output 'label' holds integer labels .* not scores"):
        pyrobust.evaluate(_sklearn_model(tmp_path / "a.onnx"), "sample", output="label", **FAST)


# ------------------------------------------------------------------------------------------- scale and type
def test_a_0_255_model_fed_0_1_data_is_flagged_and_fixed_by_pixel_range(tmp_path, bundled_model):
    model = _prefixed(tmp_path / "div255.onnx", bundled_model)
    with pytest.warns(ResultLooksWrongWarning, match=r"near chance .*--pixel-range 0,255"):
        wrong = pyrobust.evaluate(model, "sample", **FAST)
    assert wrong.summary["warnings"]
    right = pyrobust.evaluate(model, "sample", pixel_range=255, **FAST)
    ref = pyrobust.evaluate(bundled_model, "sample", **FAST)
    assert right.summary["warnings"] == [] and right.summary["noise"]["pixel_range"] == 255
    assert np.array_equal(right.outcome.clean_prediction, ref.outcome.clean_prediction)
    assert abs(right.robust_fraction - ref.robust_fraction) <= 0.05


@pytest.mark.slow
def test_the_gate_reports_a_chance_level_candidate(tmp_path, bundled_model):
    model = _prefixed(tmp_path / "div255.onnx", bundled_model)
    assert main(["gate", str(model), "--dataset", "sample", "--limit", "80", "--min-accuracy", "50%",
                 "--out", str(tmp_path / "g"), "--quiet"]) == 1
    g = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert any("near chance" in w for w in g["warnings"])


def test_a_uint8_model_gets_integer_pixels_and_integer_noise(tmp_path, bundled_model):
    model = _prefixed(tmp_path / "u8.onnx", bundled_model, uint8=True)
    ev = pyrobust.evaluate(model, "sample", out=tmp_path / "o", report=False, **FAST)
    assert ev.summary["noise"]["pixel_range"] == 255 and ev.summary["noise"]["integer"] is True
    assert ev.summary["model"]["input_type"] == "tensor(uint8)" and not ev.summary["warnings"]
    ref = pyrobust.evaluate(bundled_model, "sample", **FAST)
    assert np.array_equal(ev.outcome.clean_prediction, ref.outcome.clean_prediction)  # exact pixels in, 0..255
    fooled = int(np.flatnonzero(ev.first_failure > 0)[0])
    r = pyrobust.replay(tmp_path / "o", index=int(ev.index[fooled]))
    assert r.matches
    raw = np.round(r.perturbed * 255)
    assert np.allclose(r.perturbed * 255, raw, atol=1e-3) and raw.max() <= 255  # whole numbers in 0..255
    with pytest.raises(InvalidInput, match="takes integer pixels .* pixel_range must be 0,255"):
        pyrobust.evaluate(model, "sample", pixel_range=1, **FAST)


@pytest.mark.parametrize("scheme", ["uniform", "salt-pepper"])
def test_integer_noise_matches_the_reference(scheme):
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (6, 7, 3)).astype(np.float32)
    for step in (1, 2, 9):
        got = perturbcore.perturb_flat(img.reshape(1, -1), indices=[11], steps=[step], pixels=9, n_positions=42,
                                       channels=3, seed=5, low=0, high=255, scheme=scheme, integer=True)
        want = naive.perturb_image(img, seed=5, index=11, step=step, pixels=9, low=0, high=255, scheme=scheme,
                                   integer=True)
        assert np.array_equal(got.reshape(img.shape), want)
        assert np.array_equal(got, np.round(got)) and got.min() >= 0 and got.max() <= 255
    values = perturbcore.perturb_flat(np.zeros((1, 4096), np.float32), indices=[0], steps=[1], pixels=4096,
                                      n_positions=4096, channels=1, seed=1, low=0, high=255, integer=True)
    assert values.max() == 255  # both ends included
    with pytest.raises(ValueError, match="whole-number bounds"):
        perturbcore.prepare_noise(pixels=1, n_positions=4, channels=1, seed=0, low=0.5, high=255, integer=True)


# ---------------------------------------------------------------------------------------------- metadata
def test_the_normalisation_in_the_metadata_is_applied(tmp_path, bundled_model):
    meta = {"pyrobust.pixel_range": "0,1", "pyrobust.mean": "0.1307", "pyrobust.std": "0.3081"}
    model = tmp_path / "norm.onnx"
    proto = onnx.load(str(bundled_model))
    for k, v in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(proto, str(model))
    ev = pyrobust.evaluate(model, "sample", **FAST)
    assert ev.summary["noise"]["mean"] == [0.1307] and ev.summary["noise"]["std"] == [0.3081]
    given = pyrobust.evaluate(bundled_model, "sample", mean=0.1307, std=0.3081, **FAST)
    assert np.array_equal(ev.first_failure, given.first_failure)
    with pytest.warns(NormalisationWarning, match="metadata says it expects mean=\\[0.1307\\]"):
        pyrobust.evaluate(model, "sample", mean=0.5, std=0.5, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalisationWarning)
        pyrobust.evaluate(model, "sample", mean=0.1307, std=0.3081, **FAST)  # the same values: nothing to say
