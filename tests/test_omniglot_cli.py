"""Omniglot end to end through the CLI: learning, evaluate, episode, bad input (kill -9: test_fault_tolerance)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest
from conftest import assert_one_line_error, assert_one_line_error_text, run_cli, run_in_process

from experiments import omniglot

QUICK = ["--preset", "quick", "--no-progress"]


@pytest.fixture(scope="module")
def env(omniglot_dir, jaxmeta_cache_dir, omniglot_characters):
    """The CLI's environment: the archives and the session's prepared cache."""
    return {"JAXMETA_OMNIGLOT_DIR": str(omniglot_dir), "JAXMETA_CACHE_DIR": str(jaxmeta_cache_dir)}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("omniglot") / "run"
    proc = run_cli("experiments.omniglot", "train", "--ways", "5", "--shots", "1", "--algo", "maml", *QUICK,
                   "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_maml_learns_far_above_chance(quick_run):
    out, proc = quick_run
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["tasks"] == 600 and evaluation["inner_steps"] == 3
    assert evaluation["accuracy"] > 0.6, evaluation  # chance is 0.2
    assert 0 < evaluation["ci95"] < 0.05
    # Adaptation is what helps: accuracy before the first inner step is far lower.
    assert evaluation["accuracy_per_step"][0] < evaluation["accuracy"] - 0.2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 300
    assert {"train/loss", "train/query_accuracy_post", "val/accuracy", "val/loss"} <= set(rows[-1])
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(proc.stdout.splitlines()[0])["accuracy"] == evaluation["accuracy"]


def test_evaluate_command(quick_run, env):
    out, _ = quick_run
    proc = run_cli("experiments.omniglot", "evaluate", "--run", str(out), "--tasks", "100", "--inner-steps", "5",
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.splitlines()[-1])
    assert printed["tasks"] == 100 and printed["inner_steps"] == 5
    assert 0.6 < printed["accuracy"] <= 1.0
    assert json.loads((out / "eval.json").read_text())["accuracy"] == printed["accuracy"]


def test_evaluate_non_transductive_writes_its_own_file(quick_run, env, capsys, monkeypatch):
    """Reptile's evaluation mode: each query example scored with the support set alone, in its own file."""
    out, _ = quick_run
    before = (out / "eval.json").read_text()
    code, stderr, _ = run_in_process(omniglot.main, ["evaluate", "--run", str(out), "--tasks", "100",
                                                     "--eval-mode", "non-transductive"], capsys, env=env,
                                     monkeypatch=monkeypatch)
    assert code == 0, stderr
    evaluation = json.loads((out / "eval-non-transductive.json").read_text())
    assert evaluation["eval_mode"] == "non-transductive" and evaluation["tasks"] == 100
    assert evaluation["accuracy"] > 0.5, evaluation  # chance is 0.2
    assert evaluation["accuracy_per_step"] == [evaluation["accuracy"]]  # scored after the last step alone
    assert (out / "eval.json").read_text() == before
    assert json.loads(before)["eval_mode"] == "transductive"


def make_episode(root, omniglot_dir, *, classes=5, support=1, query=2, skip_query_class=False):
    """A folder episode of real Omniglot PNGs (105x105, unpreprocessed) from held-out characters."""
    with zipfile.ZipFile(omniglot_dir / "images_evaluation.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        chars = sorted({os.path.dirname(n) for n in names})[:: 37][:classes]
        for c, char in enumerate(chars):
            files = [n for n in names if os.path.dirname(n) == char][: support + query]
            for i, name in enumerate(files):
                role = "support" if i < support else "query"
                if role == "query" and skip_query_class and c == 0:
                    continue
                target = root / role / f"char{c}" / os.path.basename(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    return root / "support", root / "query"


def test_episode_command_on_a_folder_episode(quick_run, env, omniglot_dir, tmp_path):
    out, _ = quick_run
    sdir, qdir = make_episode(tmp_path, omniglot_dir)
    proc = run_cli("experiments.omniglot", "episode", "--run", str(out), "--support", str(sdir), "--query", str(qdir),
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    expected = sorted(str(p.relative_to(qdir)) for p in qdir.rglob("*.png"))
    assert sorted(result["predictions"]) == expected
    assert set(result["predictions"].values()) <= {f"char{c}" for c in range(5)}
    correct = np.mean([pred == path.split("/")[0] for path, pred in result["predictions"].items()])
    assert result["accuracy"] == pytest.approx(correct)


@pytest.fixture
def corrupt_archives(tmp_path):
    bad = tmp_path / "bad_archives"
    bad.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        (bad / name).write_bytes(b"this is not a zip file")
    return bad


def test_bad_input_is_one_clear_line(tmp_path, env, quick_run, omniglot_dir, corrupt_archives, capsys, monkeypatch):
    run_dir, _ = quick_run
    out = str(tmp_path / "o")
    fresh_cache = str(tmp_path / "empty_cache")
    (tmp_path / "empty_dir").mkdir()
    cases = [
        (["train", "--ways", "5000", "--out", out], env, "ways=5000 exceeds"),
        (["train", "--shots", "10", "--queries", "15", "--out", out], env, "exceeds the 20 examples"),
        (["train", "--meta-steps", "0", "--out", out], env, "--meta-steps"),
        (["train", "--inner-lr", "nan", "--out", out], env, "--inner-lr"),
        (["train", "--algo", "maml3", "--out", out], env, "--algo"),
        (["train", "--algo", "imaml", "--imaml-cg-steps", "0", "--out", out], env, "--imaml-cg-steps"),
        (["train", "--algo", "imaml", "--imaml-cg-damping", "-1", "--out", out], env, "--imaml-cg-damping"),
        (["train", "--per-step-bn", "--out", out], env, "per-step-bn: MAML++'s protocol (--algo mamlpp), not maml's"),
        (["train", "--out", "/etc/passwd/run"], env, "cannot create output directory"),
        (["train", "--data-dir", str(tmp_path / "nowhere"), "--cache-dir", fresh_cache, "--out", out], env,
         "nowhere"),
        (["train", "--data-dir", str(corrupt_archives), "--cache-dir", fresh_cache, "--out", out], env,
         "images_background.zip"),
        # The session cache holds the real archives' characters: a directory named must still be the data used.
        (["train", "--data-dir", str(tmp_path / "empty_dir"), "--out", out], env,
         f"Omniglot archive not found: {tmp_path / 'empty_dir' / 'images_background.zip'}"),
        (["train", "--data-dir", str(corrupt_archives), "--out", out], env, "corrupt or unreadable zip archive"),
        (["train", "--out", str(run_dir)], env, "already holds a run"),
        (["train", "--resume", "--inner-lr", "0.1", "--out", str(run_dir)], env, "--inner-lr"),
        (["train", "--resume", "--meta-steps", "100", "--out", str(run_dir)], env, "already ran 300"),
        (["train", "--resume", "--out", str(tmp_path / "new")], env, "config.json is missing"),
        (["evaluate", "--run", str(tmp_path / "missing")], env, "does not exist"),
        (["evaluate", "--run", str(run_dir), "--shots", "5"], env, "trained on its own 1-shot tasks"),
        (["train", "--devices", "3", "--out", out], env, "only 1 are available"),
    ]
    for args, e, fragment in cases[:2]:  # two through a real process: exit code, one line, no traceback
        proc = run_cli("experiments.omniglot", *args, env=e, timeout=300)
        assert_one_line_error(proc, fragment)
    for args, e, fragment in cases[2:]:  # the rest through the same entry point, in this process (faster)
        code, stderr, _ = run_in_process(omniglot.main, args, capsys, env=e, monkeypatch=monkeypatch)
        assert_one_line_error_text(code, stderr, fragment)
    assert not os.path.exists(fresh_cache) or not any(p.suffix == ".npz" for p in __import__("pathlib").Path(
        fresh_cache).rglob("*"))
    assert not os.path.exists(out) or not os.listdir(out)  # no run was started on other data


def test_config_records_the_data_and_evaluate_says_when_it_differs(tmp_path, env, quick_run, omniglot_dir, capsys,
                                                                    monkeypatch):
    from jaxmeta.data import omniglot as data

    run_dir, _ = quick_run
    recorded = json.loads((run_dir / "config.json").read_text())["data"]
    assert recorded == data.source_identity(omniglot_dir)
    assert set(recorded["files"]) == {"images_background.zip", "images_evaluation.zip"}
    code, stderr, _ = run_in_process(omniglot.main, ["evaluate", "--run", str(run_dir), "--tasks", "20"], capsys,
                                     env=env, monkeypatch=monkeypatch)
    assert code == 0 and "warning" not in stderr, stderr  # the same archives: nothing to say
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["files"]["images_evaluation.zip"]["sha256"] = "0" * 64  # trained on another copy
    (copy / "config.json").write_text(json.dumps(config))
    code, stderr, stdout = run_in_process(omniglot.main, ["evaluate", "--run", str(copy), "--tasks", "20",
                                                          "--no-progress"], capsys, env=env, monkeypatch=monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 0 and json.loads(stdout.splitlines()[-1])["tasks"] == 20
    assert len(lines) == 1 and lines[0].startswith("warning: evaluating "), stderr
    assert "other than it was trained on: changed: images_evaluation.zip" in lines[0]


def test_episode_bad_folders(tmp_path, env, quick_run, omniglot_dir, capsys, monkeypatch):
    run_dir, _ = quick_run
    empty = tmp_path / "empty"
    (empty / "support" / "a").mkdir(parents=True)
    (empty / "query" / "a").mkdir(parents=True)
    cases = [
        (make_episode(tmp_path / "mismatch", omniglot_dir, skip_query_class=True), "classes differ"),
        ((empty / "support", empty / "query"), "no images"),
        (make_episode(tmp_path / "too_many", omniglot_dir, classes=7), "7 classes"),
        ((tmp_path / "absent", tmp_path / "absent"), "absent"),
    ]
    for (sdir, qdir), fragment in cases:
        args = ["episode", "--run", str(run_dir), "--support", str(sdir), "--query", str(qdir)]
        code, stderr, _ = run_in_process(omniglot.main, args, capsys, env=env, monkeypatch=monkeypatch)
        assert_one_line_error_text(code, stderr, fragment)


def test_corrupt_checkpoint_is_refused_and_left_alone(tmp_path, env, quick_run):
    run_dir, _ = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for path in (copy / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "identity" not in str(path):
            path.write_bytes(b"\0" * 16)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    proc = run_cli("experiments.omniglot", "evaluate", "--run", str(copy), env=env)
    assert_one_line_error(proc, "checkpoint")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_compare_figure_of_runs(tmp_path, quick_run, capsys):
    run_dir, _ = quick_run
    figure = tmp_path / "compare.png"
    code, stderr, stdout = run_in_process(omniglot.main, ["compare", "--runs", str(run_dir), "--out", str(figure)],
                                          capsys)
    assert code == 0, stderr
    assert figure.read_bytes()[:4] == b"\x89PNG"
    code, stderr, _ = run_in_process(omniglot.main, ["compare", "--runs", str(tmp_path / "none"), "--out",
                                                     str(tmp_path / "x.png")], capsys)
    assert_one_line_error_text(code, stderr, "does not exist")
    assert not (tmp_path / "x.png").exists()


def test_identity_of_later_fields_is_compatible_with_earlier_checkpoints():
    from experiments.fewshot.pipeline import FewShotConfig

    # A checkpoint written before iMAML's and MAML++'s switches existed stored none of them: at their
    # defaults they stay out of the identity, so such a run still resumes and evaluates.
    base = FewShotConfig().identity()
    assert not {"imaml_lam", "imaml_cg_steps", "imaml_cg_damping", "per_step_bn"} & set(base)
    assert FewShotConfig(algo="imaml", imaml_cg_damping=22.0).identity()["imaml_cg_damping"] == 22.0
    assert FewShotConfig(algo="imaml", imaml_lam=2.0).identity()["imaml_lam"] == 2.0
    assert FewShotConfig(algo="mamlpp", per_step_bn=True).identity()["per_step_bn"] is True


def test_checkpoint_ensemble_records_and_the_results_table(tmp_path, quick_run, env, capsys, monkeypatch):
    """evaluate --ensemble K (the K best checkpoints by validation); each evaluation writes a result record,
    and table builds the results table from the records alone."""
    from experiments.fewshot import pipeline as fewshot
    from experiments.fewshot import records as fewshot_table

    run = tmp_path / "run"
    shutil.copytree(quick_run[0], run)
    for name in os.listdir(run):
        if name.startswith("eval") or name.startswith("omniglot-"):
            os.remove(run / name)
    results = tmp_path / "results"
    args = ["evaluate", "--run", str(run), "--tasks", "100", "--results", str(results)]
    code, stderr, _ = run_in_process(omniglot.main, args, capsys, env=env, monkeypatch=monkeypatch)
    assert code == 0, stderr
    single = json.loads((run / "eval.json").read_text())

    # Validated checkpoints at 150 and 300 (quick preset); an ensemble of two, best first.
    code, stderr, stdout = run_in_process(omniglot.main, [*args, "--ensemble", "2"], capsys, env=env)
    assert code == 0, stderr
    ensemble = json.loads((run / "eval-ensemble2.json").read_text())
    assert json.loads(stdout.splitlines()[-1])["ensemble"] == 2
    assert sorted(ensemble["member_steps"]) == [150, 300] and ensemble["tasks"] == 100
    assert ensemble["member_accuracy"][ensemble["member_steps"].index(300)] == pytest.approx(single["accuracy"])
    assert ensemble["accuracy"] > 0.6  # chance is 0.2
    assert min(ensemble["member_accuracy"]) - 0.1 < ensemble["accuracy"]

    # The mean of identical members' probabilities is each member's prediction, in both evaluation modes.
    config = fewshot.read_config(str(run))
    for mode in fewshot.EVAL_MODES:
        cfg = dataclasses.replace(config, eval_mode=mode, test_tasks=20)
        model, loss_fn, _ = fewshot.build(cfg)
        _, _, test_images = fewshot.load_data(cfg)
        _, params = fewshot.load_params(str(run), cfg, model, test_images.shape[2:])
        tasks = fewshot.fixed_tasks(cfg, test_images, num_tasks=20, seed=fewshot.TEST_SEED)
        alone = fewshot.score(cfg, loss_fn, params, tasks, 3)
        twice = fewshot.ensemble_score(cfg, loss_fn, [params, params], tasks, 3)
        assert twice["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-6), mode
        assert twice["member_accuracy"] == pytest.approx([alone["accuracy"]] * 2, abs=1e-6)

    code, stderr, _ = run_in_process(omniglot.main, [*args, "--ensemble", "3"], capsys, env=env)
    assert_one_line_error_text(code, stderr, "fewer than the ensemble's 3", "--keep-best 3")
    assert not (run / "eval-ensemble3.json").exists()

    # The records: one per evaluation, named for the cell, with everything the table needs.
    code, stderr, _ = run_in_process(omniglot.main, [*args, "--eval-mode", "non-transductive",
                                                     "--note", "a quick run"], capsys, env=env)
    assert code == 0, stderr
    names = sorted(os.listdir(results))
    assert names == sorted(["omniglot-5w1s-maml-quick-non-transductive.json",
                            "omniglot-5w1s-maml-quick-transductive.json",
                            "omniglot-5w1s-maml-quick-transductive-ensemble2.json"])
    record = json.loads((results / "omniglot-5w1s-maml-quick-transductive.json").read_text())
    assert set(fewshot_table.RECORD_FIELDS) <= set(record)
    assert (record["accuracy"], record["ci95"], record["meta_steps"]) == (single["accuracy"], single["ci95"], 300)
    assert record["paper_meta_steps"] == 60_000 and record["preset"] == "quick" and record["test_inner_steps"] == 3
    training = json.loads((run / "train.json").read_text())
    assert record["wall_s"] == training["train_seconds_total"] and record["commit"] == training["commit"]
    assert record["data"]["digest"] == json.loads((run / "config.json").read_text())["data"]["digest"]
    assert len(json.dumps(record)) < 1_000

    table = tmp_path / "table.md"
    code, stderr, stdout = run_in_process(omniglot.main, ["table", "--results", str(results), "--out", str(table)],
                                          capsys)
    assert code == 0, stderr
    lines = table.read_text().splitlines()
    assert stdout == table.read_text() and len(lines) == 2 + 3 + 2 + 2
    plain = next(line for line in lines if "| transductive, 3 steps |" in line)
    assert f"**{100 * single['accuracy']:.2f}% ± {100 * single['ci95']:.2f}** (100 tasks)" in plain
    assert "| 5-way 1-shot | MAML |" in plain and "| 300 of 60,000 (0.5%) | `quick` |" in plain
    assert plain.endswith("| 98.7 ± 0.4 |")
    assert any(f"**{100 * ensemble['accuracy']:.2f}%" in line and "top-2 ensemble" in line for line in lines)
    assert "[1]" in next(line for line in lines if "non-transductive" in line) and lines[-3] == "[1] a quick run"
    # Then what is still to run: every cell with a published figure or budget but no record.
    assert lines[-1].startswith(f"Without a record yet ({len(omniglot.PAPER_RESULTS) - 1} of "
                                f"{len(omniglot.PAPER_RESULTS)} cells): 5-way 1-shot: first-order MAML, Reptile,")
    assert "; 5-way 5-shot: MAML, first-order MAML, Reptile, pre-training;" in lines[-1]
    code, stderr, _ = run_in_process(omniglot.main, ["table", "--results", str(tmp_path / "none")], capsys)
    assert_one_line_error_text(code, stderr, "does not exist")
    (results / "broken.json").write_text('{"accuracy": 0.9}')
    code, stderr, _ = run_in_process(omniglot.main, ["table", "--results", str(results)], capsys)
    assert_one_line_error_text(code, stderr, "broken.json is not a result record", "dataset")


def test_an_interrupted_evaluation_goes_on_from_its_finished_slices(tmp_path, quick_run, env, capsys, monkeypatch):
    """evaluate keeps each finished slice of tasks in RUN/eval-partial/ until it ends; the same command
    after an interruption scores only the rest, and its numbers are those of an uninterrupted evaluation."""
    from experiments.fewshot import pipeline as fewshot

    run = tmp_path / "run"
    shutil.copytree(quick_run[0], run)
    config = dataclasses.replace(fewshot.read_config(str(run)), test_tasks=20)
    monkeypatch.setattr(fewshot, "EVAL_IMAGES", 8 * (5 + 5 * config.test_queries))  # slices of 8 tasks
    model, loss_fn, _ = fewshot.build(config)
    _, _, test_images = fewshot.load_data(config)
    step, params = fewshot.load_params(str(run), config, model, test_images.shape[2:])
    tasks = fewshot.fixed_tasks(config, test_images, num_tasks=20, seed=fewshot.TEST_SEED)
    straight = fewshot.per_task_results(config, loss_fn, params, tasks, 3)
    # The slices (the last padded) equal one call over all 20 tasks.
    whole = fewshot.evaluate(fewshot.learner_of(config), params, tasks, steps=3, loss_fn=loss_fn, has_aux=True,
                             chunk_size=None, key=jax.random.PRNGKey(config.seed))
    np.testing.assert_allclose(straight["loss"], whole.per_task["loss"], rtol=1e-5)
    np.testing.assert_array_equal(straight["accuracy"], whole.per_task["accuracy"])

    folder = fewshot.partial_dir(str(run), "eval.json", step)
    saved = fewshot.per_task_results(config, loss_fn, params, tasks, 3, save_in=folder)
    assert sorted(os.listdir(folder)) == ["identity.json", "tasks-00000.npz", "tasks-00008.npz", "tasks-00016.npz"]
    # Killed after its first slice: a rerun computes the other two, and gives the uninterrupted numbers.
    for name in ("tasks-00008.npz", "tasks-00016.npz"):
        os.remove(os.path.join(folder, name))
    resumed = fewshot.per_task_results(config, loss_fn, params, tasks, 3, save_in=folder)
    assert "1 of 3 slices of tasks already scored" in capsys.readouterr().err
    for result in (saved, resumed):
        assert set(result) == set(straight)
        for k in straight:
            np.testing.assert_array_equal(result[k], straight[k])

    # The command reads the saved slices rather than recomputing them: a marked first slice shows in its result.
    for name in ("tasks-00008.npz", "tasks-00016.npz"):
        os.remove(os.path.join(folder, name))
    first = os.path.join(folder, "tasks-00000.npz")
    with np.load(first) as part:
        marked = {**part, "accuracy": np.zeros_like(part["accuracy"])}
    np.savez(first, **marked)
    code, stderr, _ = run_in_process(omniglot.main, ["evaluate", "--run", str(run), "--tasks", "20", "--no-progress"],
                                     capsys, env=env, monkeypatch=monkeypatch)
    assert code == 0, stderr
    assert "going on from there" in stderr
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(straight["accuracy"][8:, -1].sum() / 20, rel=1e-6)
    assert evaluation["accuracy"] < fewshot.score(config, loss_fn, params, tasks, 3)["accuracy"] - 0.1
    assert not (run / fewshot.PARTIAL_DIR).exists()  # a finished evaluation leaves no slices behind

    # Slices of other settings (here other inner steps) are discarded, never mixed in.
    fewshot.per_task_results(config, loss_fn, params, tasks, 3, save_in=folder)
    os.remove(os.path.join(folder, "tasks-00016.npz"))
    other = fewshot.per_task_results(config, loss_fn, params, tasks, 2, save_in=folder)
    assert "other settings; starting over" in capsys.readouterr().err
    np.testing.assert_array_equal(other["accuracy"], straight["accuracy"][:, :3])


def test_a_record_names_the_preset_whose_budget_the_run_trained_toward():
    """At 5-way 1-shot the paper and cpu presets differ in their budgets alone: a record names the one the run
    trained toward; a run that matches no preset's identity is custom."""
    from experiments.fewshot import cli as fewshot_cli

    parser = fewshot_cli.build_parser("omniglot", omniglot.PRESETS, "JAXMETA_OMNIGLOT_DIR")
    for flags, expected in ((["--preset", "cpu", "--algo", "anil"], "cpu"), (["--preset", "paper", "--algo", "anil"],
                                                                              "paper"),
                            (["--preset", "cpu"], "cpu"), (["--preset", "paper"], "paper"),
                            (["--preset", "cpu", "--ways", "20", "--meta-steps", "6000"], "cpu"),
                            (["--preset", "cpu", "--inner-steps", "4"], "custom")):
        config = fewshot_cli.config_from_args("omniglot", omniglot.preset,
                                              parser.parse_args(["train", *flags, "--out", "x"]))
        assert fewshot_cli.preset_of(config, omniglot.preset, omniglot.PRESETS) == expected, flags


def test_keep_best_is_a_train_flag_outside_the_run_identity():
    from experiments.fewshot import cli as fewshot_cli

    parser = fewshot_cli.build_parser("omniglot", omniglot.PRESETS, "JAXMETA_OMNIGLOT_DIR")
    args = parser.parse_args(["train", "--preset", "paper", "--algo", "reptile", "--keep-best", "5", "--out", "x"])
    config = fewshot_cli.config_from_args("omniglot", omniglot.preset, args)
    assert config.keep_best == 5 and "keep_best" not in config.identity()
    assert config.identity() == fewshot_cli.config_from_args(
        "omniglot", omniglot.preset, parser.parse_args(["train", "--preset", "paper", "--algo", "reptile",
                                                         "--out", "x"])).identity()


def test_gpu_table_script_trains_evaluates_and_records_on_the_cpu(tmp_path, env):
    """scripts/gpu-table.sh at a tiny budget on the CPU: a cell trains, is evaluated, writes its record,
    and the table is printed from the records."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    results = tmp_path / "results"
    script_env = {**os.environ, **env, "CELLS": "5:1", "BUDGET_S": "600", "PRESET": "quick", "PYTHON": sys.executable,
                  "TRAIN_ARGS": "--meta-steps 20 --log-every 10 --val-every 10 --checkpoint-every 10 --val-tasks 10 "
                                "--test-tasks 20", "EVAL_ARGS": "--tasks 50"}
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu-table.sh"), str(tmp_path / "runs"), str(results)],
                          env=script_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished its budget" in proc.stdout
    record = json.loads((results / "omniglot-5w1s-maml-quick-transductive.json").read_text())
    assert record["meta_steps"] == 20 and record["tasks"] == 50 and record["paper_meta_steps"] == 60_000
    assert "CPU cores" in record["machine"]  # the machine's own name (a GPU's on a lent GPU)
    assert "| 5-way 1-shot | MAML |" in proc.stdout and "| 20 of 60,000 (0.033%) | `quick` |" in proc.stdout


def test_evaluation_chunks_bound_the_images_in_flight():
    """A non-transductive 20-way task scores 300 queries each with the 20 support images; 50 such tasks
    at once took more than 24 GB (the evaluation was killed), so fewer go at once. Chunking changes no
    number: each task is adapted and scored on its own."""
    from experiments.fewshot import pipeline as fewshot

    def chunk(ways, shots, mode):
        config = fewshot.FewShotConfig(dataset="omniglot", ways=ways, shots=shots, eval_mode=mode)
        per_task = ways * shots + ways * config.test_queries * (ways * shots + 1 if mode == "non-transductive" else 1)
        return fewshot.eval_chunk(config), per_task

    assert chunk(5, 1, "transductive")[0] == chunk(5, 1, "non-transductive")[0] == 50  # as before
    tasks, per_task = chunk(20, 1, "non-transductive")
    assert tasks < 50 and tasks * per_task <= fewshot.EVAL_IMAGES < (tasks + 1) * per_task
