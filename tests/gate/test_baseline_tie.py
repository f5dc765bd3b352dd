"""A results folder used as the gate's baseline must be the model it claims: tied to the model file or a pinned
SHA-256, every clean prediction replayed, and a random sample of images replayed through the whole protocol before
the folder decides anything. A doctored folder, or one of another model, is refused (exit 3)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from onnx import helper

from pyrobust.cli import main
from pyrobust.engine.plan import RunOptions, plan_run
from pyrobust.errors import DataError
from pyrobust.files import file_sha256
from pyrobust.gate.policy import GatePolicy
from pyrobust.gate.run import run_gate, verify_saved_baseline
from pyrobust.store.results import load_results
from pyrobust.types import ROBUST, NoiseSpec
from tests.builders import image_input, logits_output, save_model

COMMON = ["--dataset", "sample", "--limit", "120", "--max-steps", "15"]


def _gate(capsys, *args):
    code = main(["gate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, bundled_model):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["evaluate", str(bundled_model), *COMMON, "--no-report", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def constant(tmp_path_factory):
    """Always class 3: accurate on a tenth of the images, robust on all of those."""
    d = tmp_path_factory.mktemp("const")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("ReduceSum", ["f"], ["s"], axes=[1], keepdims=1),
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Add", ["z", "const"], ["y"])]
    from tests.builders import tensor

    c = np.zeros((1, 10))
    c[0, 3] = 1
    return save_model(d / "constant.onnx", nodes, [image_input()], [logits_output()],
                      [tensor("zero", np.zeros(1)), tensor("const", c)], opset=11)


@pytest.mark.slow
def test_a_results_baseline_must_be_tied_to_its_model(capsys, baseline_run, bundled_model):
    code, _, err = _gate(capsys, bundled_model, *COMMON, "--baseline", baseline_run, "--max-robust-drop", "1%")
    assert code == 2
    assert "are not tied to a model" in err and "--baseline-model FILE" in err and "--baseline-sha256 HEX" in err


@pytest.mark.slow
def test_a_tied_baseline_is_verified_and_recorded(capsys, tmp_path, baseline_run, bundled_model):
    code, out, err = _gate(capsys, bundled_model, *COMMON, "--baseline", baseline_run, "--baseline-model",
                           bundled_model, "--max-robust-drop", "5%", "--out", tmp_path / "g")
    assert code == 0, err
    assert "baseline results verified" in err and "64 images replayed" in err
    record = json.loads((tmp_path / "g" / "gate.json").read_text())
    v = record["baseline"]["verified"]
    assert v["clean_predictions"] == 120 and v["replayed"] == 64 and len(set(v["replayed_indices"])) == 64
    assert v["model"]["sha256"] == file_sha256(bundled_model) and not v["sha256_pinned"]
    # the same with a pinned digest instead of the file (the file is the one the results name)
    code, _, err = _gate(capsys, bundled_model, *COMMON, "--baseline", baseline_run, "--baseline-sha256",
                         file_sha256(bundled_model).upper(), "--max-robust-drop", "5%")
    assert code == 0, err


@pytest.mark.slow
def test_a_wrong_pin_or_another_model_is_refused(capsys, baseline_run, bundled_model, constant):
    code, _, err = _gate(capsys, bundled_model, *COMMON, "--baseline", baseline_run, "--baseline-sha256", "0" * 64,
                         "--max-robust-drop", "5%")
    assert code == 3 and "not the pinned 0000000000000000" in err
    code, _, err = _gate(capsys, bundled_model, *COMMON, "--baseline", baseline_run, "--baseline-model", constant,
                         "--max-robust-drop", "5%")
    assert code == 3 and "are of the model with SHA-256" in err and "give the model they came from" in err
    code, _, err = _gate(capsys, bundled_model, *COMMON, "--baseline", baseline_run, "--baseline-sha256", "xyz",
                         "--max-robust-drop", "5%")
    assert code == 2 and "must be a SHA-256" in err
    code, _, err = _gate(capsys, bundled_model, *COMMON, "--baseline", bundled_model, "--baseline-model",
                         bundled_model, "--max-robust-drop", "5%")
    assert code == 2 and "the baseline is a model here" in err


@pytest.mark.slow
def test_a_doctored_folder_cannot_pass_a_constant_classifier(capsys, tmp_path, bundled_model, constant):
    """The attack: results of a bad model relabelled as the production model's (counts all consistent), so that
    a constant classifier 'loses' nothing against them."""
    doctored = tmp_path / "doctored"
    assert main(["evaluate", str(constant), *COMMON, "--no-report", "--out", str(doctored)]) == 0
    summary = json.loads((doctored / "summary.json").read_text())
    summary["model"]["sha256"] = file_sha256(bundled_model)
    summary["model"]["path"] = str(bundled_model)
    (doctored / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    code, _, err = _gate(capsys, constant, *COMMON, "--baseline", doctored, "--baseline-model", bundled_model,
                         "--max-robust-drop", "1%", "--max-accuracy-drop", "1%")
    assert code == 3 and "do not match their model" in err and "clean predictions differ" in err


@pytest.mark.slow
def test_one_altered_robust_flag_is_caught_when_replayed(baseline_run, bundled_model, sample):
    """Doctoring that keeps every clean prediction (a fooled image made robust) is found by the replay of that
    image; which images are replayed is drawn from fresh entropy, so a doctored folder cannot know."""
    record = load_results(baseline_run)
    out = record.outcome
    fooled = np.flatnonzero(out.first_failure > 0)
    assert fooled.size
    i = int(fooled[0])
    ff, fl = out.first_failure.copy(), out.failure_label.copy()
    ff[i], fl[i] = ROBUST, ROBUST
    doctored = replace(record, outcome=replace(out, first_failure=ff, failure_label=fl))
    from pyrobust.data.dataset import DataSelection
    from pyrobust.engine.plan import load_data

    ds, _ = load_data("sample", selection=DataSelection(limit=120))
    spec = NoiseSpec(max_steps=15)
    with plan_run(bundled_model, ds, spec, RunOptions(batch_size=32, sessions=1)) as plan:
        class Pick:  # a generator whose "random" choice is the altered image and a few others
            def choice(self, a, size, replace):
                return np.array([i, *[j for j in a if j != i][: size - 1]])
        with pytest.raises(DataError, match=rf"image #{int(out.index[i])} replays as fooled at step \d+ .* but the "
                                            "results say robust"):
            verify_saved_baseline(doctored, plan, pinned=None, log=lambda line: None, replays=8, rng=Pick())
        v = verify_saved_baseline(record, plan, pinned=None, log=lambda line: None, replays=8, rng=Pick())
        assert v["replayed"] == 8 and int(out.index[i]) in v["replayed_indices"]
    del sample


@pytest.mark.slow
def test_the_library_names_python_arguments(baseline_run, bundled_model):
    from pyrobust.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"baseline_model=FILE\) or pin its SHA-256 \(baseline_sha256=HEX"):
        run_gate(bundled_model, "sample", policy=GatePolicy(max_robust_drop=0.05), baseline=baseline_run,
                 limit=120, max_steps=15)


@pytest.mark.slow
def test_the_library_verifies_a_tied_baseline_without_a_status_callback(baseline_run, bundled_model):
    r = run_gate(bundled_model, "sample", policy=GatePolicy(max_robust_drop=0.05), baseline=baseline_run,
                 baseline_model=bundled_model, limit=120, max_steps=15)
    assert r.baseline["verified"]["replayed"] == 64 and r.decision == "pass"
