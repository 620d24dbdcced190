"""The sinusoid toy: MAML beats pre-training on the quick preset; bad input is one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import assert_one_line_error, run_cli

from experiments import sinusoid


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sinusoid")
    results = sinusoid.main(["--preset", "quick", "--algos", "maml,pretrain", "--out", str(out), "--no-progress"])
    return out, results


def test_quick_preset_maml_is_clearly_better_than_pretraining(quick_results):
    out, _ = quick_results
    results = json.loads((out / "results.json").read_text())
    mse = results["mse"]
    assert set(mse) == {"maml", "pretrain"}
    for algo in mse:
        assert set(mse[algo]) == {"5", "10", "20"}
        for shots in mse[algo]:
            assert set(mse[algo][shots]) == {"1", "5", "10"}
            assert all(set(v) == {"mean", "ci95"} for v in mse[algo][shots].values())
    maml, pre = mse["maml"]["5"]["10"], mse["pretrain"]["5"]["10"]
    # Clearly below: the gap exceeds both confidence intervals and halves the error.
    assert maml["mean"] + maml["ci95"] < pre["mean"] - pre["ci95"]
    assert maml["mean"] < 0.5 * pre["mean"]
    # More inner steps help MAML on held-out points.
    assert mse["maml"]["5"]["10"]["mean"] < mse["maml"]["5"]["1"]["mean"]
    # One model, trained at K = 10 as in the paper, scores every test K; no test task overflowed.
    assert results["config"]["trained_with_shots"] == {"5": 10, "10": 10, "20": 10}
    assert results["nonfinite"]["maml"]["5"] == {"1": 0, "5": 0, "10": 0}


def test_train_shots_maps_each_test_k_to_its_own_model():
    paper = sinusoid.PRESETS["paper"]
    assert sinusoid.training_shots(paper) == {5: 10, 10: 10, 20: 10}
    matched = dataclasses.replace(paper, train_shots=(20, 5, 10))
    assert sinusoid.training_shots(matched) == {5: 5, 10: 10, 20: 20}
    assert sinusoid.model_config(matched, 5).shots == 5
    assert sinusoid.model_config(matched, 5).train_shots == ()


def test_figures_are_written(quick_results):
    out, _ = quick_results
    for name in ("toy_fit.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reevaluates_a_finished_run(quick_results, tmp_path):
    out, first = quick_results
    again = sinusoid.main(["--preset", "quick", "--algos", "maml", "--out", str(out), "--no-progress", "--resume"])
    assert again["mse"]["maml"] == first["mse"]["maml"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--meta-steps", "0"], "--meta-steps"),
        (["--inner-lr", "-0.1"], "--inner-lr"),
        (["--imaml-lam", "0"], "--imaml-lam"),
        (["--imaml-cg-damping", "inf"], "--imaml-cg-damping"),
        (["--meta-batch", "x"], "--meta-batch"),
        (["--algos", "maml,foo"], "foo"),
        (["--eval-shots", "5,200"], "K=200"),
        (["--train-shots", "5,10"], "K=20"),
        (["--shots", "5", "--train-shots", "5,10,20"], "--train-shots"),
        (["--preset", "huge"], "--preset"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, fragment):
    proc = run_cli("experiments.sinusoid", *args, "--out", str(tmp_path / "o"), timeout=120)
    assert_one_line_error(proc, fragment)


def test_existing_output_is_refused_without_resume(quick_results):
    out, _ = quick_results
    proc = run_cli("experiments.sinusoid", "--preset", "quick", "--algos", "maml", "--out", str(out), timeout=300)
    assert_one_line_error(proc, "already holds a run")
