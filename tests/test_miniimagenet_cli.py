"""Mini-ImageNet end to end on synthetic data in both layouts: detect, cache, sample, learn, evaluate, episode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_line_error_text, run_in_process
from miniimagenet_fixtures import make_synthetic_miniimagenet
from PIL import Image

from experiments import miniimagenet


@pytest.fixture(scope="module")
def pickle_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    data = make_synthetic_miniimagenet(root / "data", "pickle", classes=(8, 6, 6), per_class=20)
    out = root / "run"
    result = miniimagenet.main(["train", "--preset", "quick", "--ways", "5", "--shots", "1", "--data-dir", str(data),
                                "--cache-dir", str(root / "cache"), "--out", str(out), "--no-progress",
                                "--test-tasks", "100", "--meta-steps", "60"])
    return data, out, result, root


def test_short_training_learns_on_synthetic_classes(pickle_run):
    _, out, result, _ = pickle_run
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation == result
    assert evaluation["tasks"] == 100
    assert evaluation["accuracy"] > 0.5  # chance is 0.2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 60 and "val/accuracy" in rows[-1]


def test_csv_layout_gives_the_same_data_and_evaluation(pickle_run, tmp_path, capsys, monkeypatch):
    data, out, result, root = pickle_run
    csv_data = make_synthetic_miniimagenet(tmp_path / "csv", "csv", classes=(8, 6, 6), per_class=20)
    code, stderr, _ = run_in_process(miniimagenet.main, ["evaluate", "--run", str(out), "--tasks", "100",
                                                      "--data-dir", str(csv_data), "--cache-dir",
                                                      str(tmp_path / "cache")], capsys)
    assert code == 0, stderr
    again = json.loads((out / "eval.json").read_text())
    assert again["accuracy_per_step"] == pytest.approx(result["accuracy_per_step"], abs=1e-6)


def test_episode_on_image_folders_of_any_size(pickle_run, tmp_path, capsys):
    _, out, _, _ = pickle_run
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    for role, count in (("support", 1), ("query", 2)):
        for c, colour in enumerate(colours):
            folder = tmp_path / role / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 10, (120, 90, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    code, stderr, stdout = run_in_process(miniimagenet.main, ["episode", "--run", str(out), "--support",
                                                              str(tmp_path / "support"), "--query",
                                                              str(tmp_path / "query")], capsys)
    assert code == 0, stderr
    printed = json.loads(stdout)
    assert sorted(printed["predictions"]) == [f"class{c}/{i}.jpg" for c in range(3) for i in range(2)]
    correct = np.mean([pred == path.split("/")[0] for path, pred in printed["predictions"].items()])
    assert printed["accuracy"] == pytest.approx(correct)


def test_missing_layout_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, stderr, _ = run_in_process(miniimagenet.main, ["train", "--data-dir", str(tmp_path / "empty"), "--cache-dir",
                                                      str(tmp_path / "c"), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error_text(code, stderr, "train.csv")
