"""``pyrobust reproduce --quick`` end to end on the real MNIST files, and stage resumption."""

import json
import re

import numpy as np
import pytest

from pyrobust.cli import main
from pyrobust.store.results import load_results
from pyrobust.study.reproduce import StudyConfig, reproduce

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

UPSTREAM = ["train_M", "eval_M_test", "eval_M_train"]
DOWNSTREAM_OF_SELECTION = ["select_robust", "train_M_R", "eval_M_R_test", "select_random", "train_M_rand",
                           "eval_M_rand_test"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("study")
    code = main(["reproduce", "--dataset", "mnist", "--data-dir", str(shared_data), "--out", str(out), "--quick",
                 "--schemes"])
    assert code == 0
    return out


def _pct(r):
    return f"{100 * r['fraction']:.2f} % [{100 * r['ci95'][0]:.2f}, {100 * r['ci95'][1]:.2f}]"


def test_outputs_exist_and_are_well_formed(study):
    for f in ("report.md", "report.html", "report.json", "stages.json", "survival_test.png", "per_class_train.png",
              "examples_train.png", "failure_test.png", "flip_matrix.png", "models/M.onnx", "models/M_R.onnx",
              "models/M_rand.onnx", "select/robust.npz", "select/robust.json", "select/random.npz"):
        assert (study / f).stat().st_size > 0, f
    for f in study.glob("*.png"):
        assert f.read_bytes()[:4] == b"\x89PNG"
    html = (study / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and html.endswith("</html>")
    rep = json.loads((study / "report.json").read_text())
    assert set(rep["models"]) == {"M", "M_R", "M_rand"}
    assert len(rep["schemes"]) == 4
    assert {s["stage"] for s in rep["stages"]} >= set(UPSTREAM + DOWNSTREAM_OF_SELECTION)


def test_report_numbers_equal_the_json_files(study):
    md = (study / "report.md").read_text()
    for name, folder in (("M", "M-test"), ("M_R", "M_R-test"), ("M_rand", "M_rand-test")):
        _, s = load_results(study / "eval" / folder)
        m = s["metrics"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == _pct(m["accuracy"])
        assert cells[3] == _pct(m["robust"])
        assert cells[4] == _pct(m["robust_of_correct"])
    _, train = load_results(study / "eval" / "M-train")
    assert f"Accuracy {_pct(train['metrics']['accuracy'])}; robust {_pct(train['metrics']['robust'])}." in md
    # both denominators in the paired comparisons: robust of correct changes with the bootstrap over images
    from pyrobust.stats import paired_ratio_difference

    a, b = load_results(study / "eval" / "M-test").outcome, load_results(study / "eval" / "M_R-test").outcome
    change, lo, hi = paired_ratio_difference(a.robust, a.correct, b.robust, b.correct)
    row = next(line for line in md.splitlines() if line.startswith("| M → M_R |"))
    assert f"{100 * change:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}]" in row
    assert "robust, of correct images (95 % CI)" in md and "robust, of correct ones" in md
    sel = json.loads((study / "select" / "robust.json").read_text())
    assert f"{sel['images']} images selected." in md
    with np.load(study / "select" / "robust.npz") as z:
        assert z["y"].size == sel["images"]
    rep = json.loads((study / "report.json").read_text())
    for name, folder in (("M", "M-test"), ("M_R", "M_R-test"), ("M_rand", "M_rand-test")):
        _, s = load_results(study / "eval" / folder)
        assert sum(map(sum, rep["flip_matrix"][name])) == s["metrics"]["fooled"]
    for s in rep["schemes"]:
        assert f"| {s['scheme']} | {s['mode']} | {_pct(s['accuracy'])} | {_pct(s['robust'])} |" in md
    stages = json.loads((study / "stages.json").read_text())
    for name, rec in stages.items():
        assert re.search(rf"\| {re.escape(name)} \| .* \| {rec['seconds']:.1f} \|", md), name


def _run(study, shared_data, **kwargs):
    lines = []
    reproduce(StudyConfig.quick_config("mnist", data_dir=str(shared_data), schemes=True, **kwargs), study,
              log=lines.append)
    ran = [m.group(1) for line in lines if (m := re.match(r"\[(\w[\w-]*)\] done in", line))]
    fresh = [m.group(1) for line in lines if (m := re.match(r"\[(\w[\w-]*)\] .*: up to date", line))]
    return ran, fresh


def test_a_second_run_redoes_nothing(study, shared_data):
    ran, fresh = _run(study, shared_data)
    assert ran == [] and set(UPSTREAM + DOWNSTREAM_OF_SELECTION) <= set(fresh)


def test_changed_inputs_rerun_only_what_depends_on_them(study, shared_data):
    ran, fresh = _run(study, shared_data, per_class=15)
    assert set(UPSTREAM) <= set(fresh)
    assert ran == DOWNSTREAM_OF_SELECTION
    sel = json.loads((study / "select" / "robust.json").read_text())
    assert sel["per_class"] == 15


def test_a_damaged_output_is_redone(study, shared_data):
    _run(study, shared_data, per_class=15)
    (study / "eval" / "M_R-test" / "summary.json").unlink()
    ran, _ = _run(study, shared_data, per_class=15)
    assert ran == ["eval_M_R_test"]
    original = (study / "models" / "M_rand.onnx").read_bytes()
    (study / "models" / "M_rand.onnx").write_bytes(b"tampered")
    ran, fresh = _run(study, shared_data, per_class=15)
    # training is deterministic: the rebuilt model is byte-identical, so its evaluation is still up to date
    assert ran == ["train_M_rand"] and "eval_M_rand_test" in fresh
    assert (study / "models" / "M_rand.onnx").read_bytes() == original


def test_the_scheduler_reaches_every_evaluation(monkeypatch, tmp_path, shared_data):
    """``reproduce --scheduler`` hands the scheduler to each evaluation (Dask itself is tested in test_parallel)."""
    import dataclasses

    import pyrobust.evaluation

    seen = []
    real = pyrobust.evaluation.evaluate

    def spy(*args, options, **kwargs):
        seen.append(options.scheduler)
        # run in this process: the point is only what was asked for
        return real(*args, options=dataclasses.replace(options, scheduler=None), **kwargs)

    monkeypatch.setattr(pyrobust.evaluation, "evaluate", spy)
    reproduce(StudyConfig.quick_config("mnist", data_dir=str(shared_data), scheduler="local:2"), tmp_path)
    assert len(seen) == 4 and set(seen) == {"local:2"}  # M on test and train, M_R, M_rand


def test_report_has_the_paired_comparisons_and_a_conclusion(study):
    import numpy as np

    from pyrobust.store.results import load_results
    from pyrobust.study.report import conclusion

    rep = json.loads((study / "report.json").read_text())
    md = (study / "report.md").read_text()
    a, _ = load_results(study / "eval" / "M_rand-test")
    b, _ = load_results(study / "eval" / "M_R-test")
    pr = rep["paired"]["M_rand->M_R"]["robust"]
    assert pr["lost"] == int((a.robust & ~b.robust).sum()) and pr["gained"] == int((~a.robust & b.robust).sum())
    assert np.isclose(pr["change"], b.robust.mean() - a.robust.mean())
    assert pr["ci95"][0] <= pr["change"] <= pr["ci95"][1]
    assert f"{100 * pr['change']:+.2f} points" in md and "## Conclusion" in md
    assert "Its numbers are not results" in md  # a quick run says so
    full = {**rep, "quick": False}
    text = conclusion(full)
    assert "M_R is" in text and f"{100 * pr['change']:+.2f} points" in text and "training randomness" in text
