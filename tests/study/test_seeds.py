"""Training seeds as an axis of the study: seed parsing, the seed-level statistics against hand-computed values,
and a tiny end-to-end multi-seed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from pyrobust.cli import main
from pyrobust.errors import DataError, InvalidInput
from pyrobust.study.seeds import _paired_stats, parse_seeds, seed_report, to_markdown


def test_seed_lists():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("3,1,1,7") == [3, 1, 7]
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    for bad in ("", "a-b", "5-3", "-1", "0-2000"):
        with pytest.raises(InvalidInput):
            parse_seeds(bad)


def test_paired_statistics_match_scipy():
    d = np.array([-0.022, 0.029, 0.004, -0.055, -0.046])  # the five MNIST seeds, M_R - M_rand
    s = _paired_stats(d)
    t = stats.ttest_1samp(d, 0.0)
    ci = t.confidence_interval(0.95)
    assert s["mean"] == pytest.approx(d.mean()) and s["sd"] == pytest.approx(d.std(ddof=1))
    assert s["t_ci95"] == pytest.approx([ci.low, ci.high])
    # exact sign-flip test over all 32 patterns: the share with |mean| at least the observed one
    flips = np.array(np.meshgrid(*[[1, -1]] * 5)).reshape(5, -1).T
    assert s["permutation_p"] == pytest.approx(np.mean(np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12))
    # five seeds: no sign pattern is rarer than 2/32 > 5 %, so the sign-flip interval is unbounded, and says so
    assert s["permutation_ci95"] is None and "6 or more seeds" in s["note"]
    one = _paired_stats(np.array([0.01]))
    assert one["t_ci95"] is None and one["permutation_ci95"] is None and "one seed" in one["note"]


def _brute_sign_flip_interval(d):
    """The shifts mu on a fine grid at which the exact sign-flip test of d - mu gives p > 5 %."""
    flips = np.array(np.meshgrid(*[[1, -1]] * d.size)).reshape(d.size, -1).T
    grid = np.linspace(d.min(), d.max(), 20001)
    keep = [mu for mu in grid
            if np.mean(np.abs((flips * (d - mu)).mean(1)) >= abs((d - mu).mean()) - 1e-12) > 0.05]
    return min(keep), max(keep)


@pytest.mark.slow
@pytest.mark.parametrize("d", [
    np.array([-0.022, 0.029, 0.004, -0.055, -0.046, 0.012]),
    np.array([0.01, 0.02, 0.015, 0.04, -0.01, 0.03, 0.0, 0.025, 0.012, 0.05]),
    np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.1]),  # ties and an outlier
])
def test_the_sign_flip_interval_inverts_the_exact_test(d):
    lo, hi = _paired_stats(d)["permutation_ci95"]
    blo, bhi = _brute_sign_flip_interval(d)
    step = (d.max() - d.min()) / 20000
    assert lo == pytest.approx(blo, abs=step) and hi == pytest.approx(bhi, abs=step)
    assert lo <= d.mean() <= hi


def test_seeds_that_all_agree_give_a_point_interval():
    s = _paired_stats(np.full(7, 0.02))
    assert s["sd"] == 0 and s["t_ci95"] == pytest.approx([0.02, 0.02])
    assert s["permutation_ci95"] == pytest.approx([0.02, 0.02]) and s["permutation_p"] == pytest.approx(2 / 128)


def _coverage(n, draw, reps=400, truth=0.01):
    """Share of simulated studies whose paired-t / sign-flip interval holds the true mean difference."""
    rng = np.random.default_rng([n, reps, len(draw.__name__)])
    t_hits = flip_hits = 0
    for _ in range(reps):
        s = _paired_stats(draw(rng, n) + truth)
        t_hits += s["t_ci95"][0] <= truth <= s["t_ci95"][1]
        ci = s["permutation_ci95"]
        flip_hits += ci is None or ci[0] <= truth <= ci[1]
    return t_hits / reps, flip_hits / reps


def normal(rng, n):  # seed-to-seed SD of 4.5 points, as on MNIST-5k
    return rng.normal(0, 0.045, n)


def heavy(rng, n):  # Student t with 3 degrees of freedom: an occasional seed far off
    return 0.03 * rng.standard_t(3, n)


def skewed(rng, n):  # exponential, centred: most seeds a little below, a few far above
    return rng.exponential(0.03, n) - 0.03


def coarse(rng, n):  # differences on a 0.1-point grid with a small spread: ties are common
    return np.round(rng.normal(0, 0.01, n), 3)


@pytest.mark.slow
@pytest.mark.parametrize("draw", [normal, heavy, skewed, coarse])
@pytest.mark.parametrize("n", [5, 6, 10])
def test_seed_level_intervals_cover(n, draw):
    """The coverage the seed report states (1,500 studies per condition gave: normal, heavy-tailed and coarse
    differences 94-98 % for both intervals; exponential ones 89-90 % for t and 90-93 % for the sign-flip interval).
    Here 400 studies, a standard error of about 1.1 points: both must hold 92 %, or 85 % on skewed differences,
    where both fall short of 95 % (the report says so)."""
    t_cov, flip_cov = _coverage(n, draw)
    floor = 0.85 if draw is skewed else 0.92
    assert t_cov >= floor and flip_cov >= floor
    if draw is skewed:
        assert t_cov < 0.93  # the shortfall the report states is real


def _fake(seed, m, r, mrand, pixels=28):
    def model(acc, rob):
        return {"accuracy": {"fraction": acc}, "robust": {"fraction": rob},
                "robust_of_correct": {"fraction": rob / acc}, "train_images": 100}

    change = {"change": r - mrand, "ci95": [r - mrand - 0.01, r - mrand + 0.01], "lost": 1, "gained": 1}
    return {"noise": {"pixels": pixels, "max_steps": 250, "seed": 0},
            "models": {"M": model(0.98, m), "M_R": model(0.97, r), "M_rand": model(0.97, mrand)},
            "paired": {"M->M_R": {"robust": change, "accuracy": change},
                       "M_rand->M_R": {"robust": change, "accuracy": change}}}


def test_the_seed_report_reads_each_seeds_report():
    rep = seed_report({0: _fake(0, 0.8, 0.85, 0.82), 1: _fake(1, 0.81, 0.84, 0.80), 2: _fake(2, 0.79, 0.86, 0.83)})
    assert rep["models"]["M_R"]["robust"]["mean"] == pytest.approx(0.85)
    assert rep["models"]["M_R"]["robust_of_correct"]["mean"] == pytest.approx(0.85 / 0.97)
    assert rep["contrasts"]["M_R - M_rand"]["robust_of_correct"]["per_seed"] == pytest.approx(
        [0.03 / 0.97, 0.04 / 0.97, 0.03 / 0.97])
    assert "robust of correct ones, mean ± SD" in to_markdown(rep)
    older = {k: _fake(k, 0.8, 0.85, 0.82) for k in range(2)}  # study reports from before both denominators
    for r in older.values():
        for m in r["models"].values():
            del m["robust_of_correct"]
    assert "robust_of_correct" not in seed_report(older)["models"]["M"]
    c = rep["contrasts"]["M_R - M_rand"]["robust"]
    assert c["per_seed"] == pytest.approx([0.03, 0.04, 0.03]) and c["t_ci95"][0] > 0
    assert "more robust than" in rep["conclusion"] and "training randomness" in rep["conclusion"]
    # three seeds: t excludes zero, the sign-flip test cannot, and the conclusion says the finding is only suggestive
    assert "Only the t interval" in rep["conclusion"] and "p = 0.25" in rep["conclusion"]
    assert rep["noise"]["pixels"] == 28 and rep["operating_point"] is None
    text = to_markdown(rep)
    assert "the same images and noise for every seed" in text and "| pixels |" not in text


def test_a_seed_report_at_an_operating_point_names_each_seeds_pixels():
    reports = {0: _fake(0, 0.3, 0.35, 0.32, pixels=61), 1: _fake(1, 0.29, 0.3, 0.31, pixels=74)}
    reports[1]["selection"] = {"empty_classes": [1, 9]}  # the robust selection left two classes empty
    rep = seed_report(reports, config={"target_robust": 0.3})
    assert rep["noise"]["pixels"] is None  # no one count for the whole study
    assert [row["pixels"] for row in rep["per_seed"]] == [61, 74]
    assert rep["operating_point"] == {"target": 0.3, "pixels_min": 61, "pixels_max": 74, "pixels_mean": 67.5}
    assert "61 to 74 pixels" in rep["conclusion"]
    assert "Only the t interval" not in rep["conclusion"]  # t includes zero here
    text = to_markdown(rep)
    assert "| seed | pixels |" in text and "| 1 | 74 |" in text and "own operating point" in text
    assert "the same images and noise for every seed" not in text
    assert "in 1 of 2 seeds a class had no robust training images" in text and "seed 1 (1, 9)" in text


@pytest.mark.slow
def test_a_tiny_multi_seed_study_end_to_end(tmp_path, shared_data, capsys):
    out = tmp_path / "seeds"
    code = main(["reproduce", "--dataset", "mnist", "--data-dir", str(shared_data), "--out", str(out), "--quick",
                 "--train-seeds", "0-1", "--quiet"])
    text = capsys.readouterr().out
    assert code == 0 and "over 2 seeds" in text
    rep = json.loads((out / "seeds.json").read_text())
    assert rep["seeds"] == [0, 1] and len(rep["per_seed"]) == 2 and (out / "seeds.md").exists()
    r0, r1 = (json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (0, 1))
    assert r0["datasets"] == r1["datasets"]  # the same images for every seed
    assert r0["models"]["M"]["model_sha256"] != r1["models"]["M"]["model_sha256"]  # different networks
    assert main(["reproduce", "--dataset", "mnist", "--data-dir", str(shared_data), "--out", str(out), "--quick",
                 "--train-seeds", "0-1", "--quiet"]) == 0  # resumed: every stage is already done


@pytest.mark.slow
def test_the_papers_other_readings_in_one_quick_study(tmp_path, shared_data, capsys):
    """--target-robust, --retrain-from finetune, --retrain-budget updates and --pixel-count random together."""
    out = tmp_path / "study"
    code = main(["reproduce", "--dataset", "mnist", "--data-dir", str(shared_data), "--out", str(out), "--quick",
                 "--target-robust", "30%", "--retrain-from", "finetune", "--retrain-budget", "updates",
                 "--pixel-count", "random", "--quiet"])
    assert code == 0, capsys.readouterr().err
    point = json.loads((out / "operating_point.json").read_text())
    tried = {t["pixels"]: t["robust"] for t in point["tried"]}
    assert point["robust"] <= 0.30 and all(r > 0.30 for p, r in tried.items() if p < point["pixels"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["noise"]["pixels"] == point["pixels"] and rep["config"]["noise"]["pixel_count"] == "random"
    assert rep["operating_point"] == point
    assert rep["selection"]["empty_classes"] == [r["class"] for r in rep["selection"]["table"] if r["taken"] == 0]
    from pyrobust.study.report import blocks, to_markdown

    empty = {**rep, "selection": {**rep["selection"], "empty_classes": [3, 7]}}
    assert "**Warning:** classes 3, 7 had no robust training images" in to_markdown(blocks(empty))
    assert "**Warning:**" not in to_markdown(blocks({**rep, "selection": {**rep["selection"], "empty_classes": []}}))
    # an operating point swapped by hand for another point that was tried, while the evaluations ran elsewhere
    from pyrobust.study.report import gather

    other = next(t for t in point["tried"] if t["pixels"] != point["pixels"])
    (out / "operating_point.json").write_text(json.dumps({**point, **other}))
    stages = json.loads((out / "stages.json").read_text())
    with pytest.raises(DataError, match="operating_point.json says .* but eval/M-test ran with"):
        gather(out, config=rep["config"], stages=stages, test_spec="mnist:test", train_spec="mnist:train")
    assert f"Operating point: {point['pixels']} pixels" in (out / "report.md").read_text()
    summary = json.loads((out / "eval" / "M_R-test" / "summary.json").read_text())
    assert summary["noise"]["pixels"] == point["pixels"] and summary["noise"]["pixel_count"] == "random"
    from pyrobust.training import training_updates

    m, m_r = out / "models" / "M.onnx", out / "models" / "M_R.onnx"
    assert training_updates(m_r) == training_updates(m)  # the same number of steps as M
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(m_r)).metadata_props}
    assert meta["pyrobust.init_from_sha256"] == rep["models"]["M"]["model_sha256"]  # fine-tuned from M


def _point(**change):
    point = {"target": 0.3, "pixels": 61, "robust": 0.29, "images": 1000, "seed": 0,
             "tried": [{"pixels": 60, "robust": 0.31}, {"pixels": 61, "robust": 0.29}, {"pixels": 784, "robust": 0.0}]}
    point.update(change)
    return point


@pytest.mark.parametrize("bad", [
    "not json", "[]",
    _point(extra=1),  # a key pyrobust does not write
    _point(robust=1.5), _point(target=True), _point(pixels=0), _point(pixels="61"),
    _point(pixels=62),  # not among the points tried
    _point(tried=[{"pixels": 61, "robust": 0.29}, {"pixels": 60, "robust": 0.31}]),  # out of order
    _point(tried=[{"pixels": 61, "robust": 0.29, "x": 1}]),
])
def test_a_crafted_operating_point_is_refused(tmp_path, bad):
    from pyrobust.study.report import read_operating_point

    path = tmp_path / "operating_point.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(DataError, match="operating_point.json.*rerun reproduce"):
        read_operating_point(path)


def test_an_operating_point_reads_back_and_is_never_followed_through_a_link(tmp_path):
    from pyrobust.study.report import read_operating_point

    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps(_point()))
    assert read_operating_point(real) == _point()
    link = tmp_path / "operating_point.json"
    link.symlink_to(real)
    with pytest.raises(DataError, match="link"):
        read_operating_point(link)
