"""The translation model (padding, cached decoding), scoring, the MetaNMT experiment end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, assert_one_line_error, run_in_process

from experiments.translation import pipeline as tr
from jaxmeta import tokens
from jaxmeta.data import translation as tdata
from jaxmeta.models.transformer import (
    Transformer,
    TransformerConfig,
    greedy_decode,
    init_params,
    translation_loss,
)

SMALL = TransformerConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64)


def _batch(texts, length):
    src = tokens.encode_batch([s for s, _ in texts], length).astype(np.int32)
    tgt = tokens.encode_batch([t for _, t in texts], length + 1, bos=True, eos=True).astype(np.int32)
    return jnp.asarray(src), jnp.asarray(tgt)


PAIRS = [("Bună dimineața!", "Good morning!"), ("Спасибо", "Thanks"), ("고맙습니다", "Thank you"), ("Ja", "Yes")]


def test_padding_does_not_change_the_loss_or_its_gradient():
    model = Transformer(SMALL)
    loss_fn = translation_loss(model)
    params = init_params(model, jax.random.PRNGKey(0))
    short = _batch(PAIRS, 24)
    long = _batch(PAIRS, 40)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # compiled: op-by-op is slow
    (l1, a1), g1 = value_and_grad(params, short)
    (l2, a2), g2 = value_and_grad(params, long)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(a1["accuracy"], a2["accuracy"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
    # and the loss is not blind to the content: another target changes it.
    other = (short[0], _batch([(s, t[::-1]) for s, t in PAIRS], 24)[1])
    assert abs(float(value_and_grad(params, other)[0][0]) - float(l1)) > 1e-3


def test_cached_greedy_decoding_equals_rerunning_the_full_decoder():
    model = Transformer(SMALL)
    params = init_params(model, jax.random.PRNGKey(3))
    # Sharpen the output distribution so greedy choices are not ties.
    params = jax.tree.map(lambda p: p * 3.0, params)
    src, _ = _batch(PAIRS, 24)
    steps = 12
    cached = np.asarray(jax.jit(lambda p, s: greedy_decode(model, p, s, steps))(params, src))
    # Re-run the whole decoder on the prefix so far (later positions hold filler, which the
    # causal mask keeps out of position t: one compiled shape for every step).
    full = jax.jit(lambda p, s, y: model.apply({"params": p}, s, y))
    prefix = np.full((src.shape[0], steps + 1), tokens.PAD, np.int32)
    prefix[:, 0] = tokens.BOS
    done = np.zeros(src.shape[0], bool)
    for t in range(steps):
        logits = full(params, src, jnp.asarray(prefix[:, :steps]))
        nxt = np.asarray(jnp.argmax(logits[:, t], -1)).astype(np.int32)
        nxt = np.where(done, tokens.PAD, nxt)
        done |= nxt == tokens.EOS
        prefix[:, t + 1] = nxt
    np.testing.assert_array_equal(cached, prefix[:, 1:])
    assert len({tuple(r) for r in cached}) > 1  # outputs depend on the source


def test_scores_equal_the_sacrebleu_command_line(tmp_path):
    hyps = ["The cat sat on the mat.", "I don't know what to do", "Good morning, Tom!", "Where is it?"]
    refs = ["The cat is on the mat.", "I don't know what to do.", "Good morning!", "Where's the station?"]
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
    ours = tr.scores(hyps, refs)
    for metric in ("bleu", "chrf"):
        out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i",
                              str(tmp_path / "hyp.txt"), "-m", metric, "-b", "-w", "4"],
                             capture_output=True, text=True, check=True)
        assert ours[metric] == pytest.approx(float(out.stdout.strip()), abs=1e-4)
    assert 0 < ours["bleu"] < 100 and 0 < ours["chrf"] < 100
    assert tr.scores(refs, refs) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}


# --------------------------------------------------------------------------------------
# The experiment, end to end (the quick preset), and its errors.
# --------------------------------------------------------------------------------------


def _main(argv, capsys):
    from experiments.translation import main

    return run_in_process(main, argv, capsys)


# The quick preset at a test's budget (60% of its meta-steps, half its fine-tuning steps):
# checkpoints at MID and LAST.
MID, LAST = 120, 240
TEST_BUDGET = ["--meta-steps", str(LAST), "--val-every", str(MID), "--log-every", "40", "--finetune-steps", "50"]


@pytest.fixture(scope="module")
def quick_runs(translation_dir, tmp_path_factory):
    """``all --preset quick`` at the test budget: FOMAML, MultiNMT and scratch, fine-tuned on Romanian
    and Korean.

    Each run's checkpoint and rate are chosen by the fine-tuned validation loss.
    """
    out = tmp_path_factory.mktemp("translation") / "quick"
    proc = subprocess.run([sys.executable, "-m", "experiments.translation", "all", "--preset", "quick",
                           *TEST_BUDGET, "--out", str(out), "--checkpoint-selection", "finetuned",
                           "--no-progress"],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          timeout=1200, env={**os.environ, tdata.DATA_DIR_ENV: str(translation_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_quick_metanmt_translates_a_held_out_language_better_than_copying(quick_runs):
    from jaxmeta.io import read_jsonl

    out, stdout = quick_runs
    rows = read_jsonl(os.path.join(out, "grid", tr.RESULTS_FILE))
    assert {r["algo"] for r in rows} == {"fomaml", "pretrain", "scratch"}
    tuned = {(r["lang"], r["algo"]): r for r in rows if r["size"] == "400"}
    # Korean (a script meta-training never saw): better than copying the source.
    korean = tuned[("kor", "fomaml")]
    assert korean["tatoeba_chrf"] > korean["copy_chrf"] + 5.0, (korean["tatoeba_chrf"], korean["copy_chrf"])
    # The meta-learned initialisation is what makes this possible: fine-tuned on the same 400 pairs
    # from a random initialisation, the model is far worse (held-out development loss, nats per byte).
    for lang in ("kor", "ron"):
        assert tuned[(lang, "fomaml")]["dev_loss"] < tuned[(lang, "scratch")]["dev_loss"] - 0.3, lang
        assert tuned[(lang, "fomaml")]["dev_loss"] < tuned[(lang, "fomaml")]["dev_loss_before"] - 0.3, lang
    assert os.path.isfile(os.path.join(out, "grid", "scores.png"))
    assert "Tatoeba test chrF" in stdout and "MetaNMT (FOMAML)" in stdout


def test_each_method_picks_its_checkpoint_by_its_own_validation_objective(quick_runs):
    import json

    out, _ = quick_runs
    for algo, metric in (("fomaml", "val/loss"), ("pretrain", "val/loss_before"), ("scratch", "val/loss_before")):
        assert tr.selection_metric(algo) == metric
        with open(os.path.join(out, algo, tr.SUMMARY_FILE)) as f:
            summary = json.load(f)
        rows = summary["validation"]
        assert summary["selected_by"] == metric and len(rows) == (1 if algo == "scratch" else 2)
        assert summary["best_step"] == min(rows, key=lambda r: r[metric])["step"]
        assert summary["best_val_loss"] == min(r[metric] for r in rows)
    assert tr.selection_metric("reptile") == tr.selection_metric("maml") == "val/loss"

    # RUN@STEP (evaluate --runs) loads that checkpoint instead of the chosen one; grids key it apart.
    run = str(out / "fomaml")
    with open(os.path.join(run, tr.SUMMARY_FILE)) as f:
        chosen = json.load(f)["best_step"]
    flat = {step: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tr.load_initialisation(f"{run}@{step}")[1])])
            for step in (MID, LAST)}
    default = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tr.load_initialisation(run)[1])])
    np.testing.assert_array_equal(default, flat[chosen])
    assert not np.array_equal(flat[MID], flat[LAST])
    assert tr.run_key(f"{run}@{MID}") == os.path.abspath(run) + f"@{MID}" and tr.run_key(run) == os.path.abspath(run)
    assert tr.split_run("a@b/run") == ("a@b/run", None)


def test_finetuned_selection_picks_checkpoint_and_rate_by_the_validation_languages_loss_and_resumes(
        quick_runs, tmp_path, monkeypatch):
    import json

    from jaxmeta.io import read_jsonl

    out, output = quick_runs
    grid = out / "grid"
    with open(grid / tr.SELECTION_FILE) as f:
        record = json.load(f)
    with open(grid / "finetune_lrs.json") as f:
        rates = json.load(f)
    rows = read_jsonl(grid / tr.RESULTS_FILE)
    chosen = {}
    for algo, steps in (("fomaml", [str(MID), str(LAST)]), ("pretrain", [str(MID), str(LAST)]), ("scratch", ["0"])):
        run = str(out / algo)
        measured = record[os.path.abspath(run)]
        assert sorted(measured, key=int) == steps and all(set(v) == {"0.001", "0.0001"} for v in measured.values())
        loss, step, lr = min((v, int(s), float(lr)) for s, losses in measured.items() for lr, v in losses.items())
        with open(os.path.join(run, tr.SUMMARY_FILE)) as f:
            recorded = json.load(f)["best_step"]
        key = tr.run_key(run if step == recorded else f"{run}@{step}")
        assert rates[key]["lr"] == lr and rates[key]["selected_by"] == "finetuned"
        assert {(r["run"], r["checkpoint"], r["finetune_lr"]) for r in rows if r["algo"] == algo and r["size"] != "0"} \
            == {(key, step, lr)}
        assert f"{run}: checkpoint {step} and fine-tuning rate {lr:g} chosen" in output
        chosen[algo] = (step, lr, loss)
    assert "Checkpoint selection" in (grid / "results.md").read_text()

    # The recorded number is the validation languages' mean development loss after fine-tuning
    # that checkpoint at that rate: measure one (MultiNMT's step MID, the other rate) directly.
    config, params = tr.load_initialisation(f"{out / 'pretrain'}@{MID}")
    config = config.resolved()
    corpus = tr.held_out_corpus(config)
    tuner = tr.Finetuner(config, tr.grid_capacity(config, corpus))
    direct = np.mean([tuner.finetune(params, tr.training_subset(config, corpus, c, config.finetune_val_pairs, 0),
                                     tr.dev_subset(config, corpus, c), 0, 1e-4)[1]["dev_loss"]
                      for c in config.val_langs])
    np.testing.assert_allclose(direct, record[os.path.abspath(out / "pretrain")][str(MID)]["0.0001"], rtol=1e-5)

    # An interrupted selection resumes: only the checkpoint with no losses yet is fine-tuned again,
    # to the same numbers, and the choice is the same.
    again = tmp_path / "grid"
    again.mkdir()
    partial = json.loads(json.dumps(record))
    del partial[os.path.abspath(out / "fomaml")][str(MID)]
    (again / tr.SELECTION_FILE).write_text(json.dumps(partial))
    measured = []
    real = tr.Finetuner.choose_lr
    monkeypatch.setattr(tr.Finetuner, "choose_lr", lambda self, *a: measured.append(1) or real(self, *a))
    step, lr, _ = tr.select_by_finetuning(str(out / "fomaml"), tuner, corpus, str(again), progress=False)
    assert len(measured) == 1 and (step, lr) == chosen["fomaml"][:2]
    with open(again / tr.SELECTION_FILE) as f:
        resumed = json.load(f)
    for lr, value in record[os.path.abspath(out / "fomaml")][str(MID)].items():
        np.testing.assert_allclose(resumed[os.path.abspath(out / "fomaml")][str(MID)][lr], value, rtol=1e-6)


def test_candidate_checkpoints_are_evenly_spaced_back_from_the_last_and_keep_the_recorded_one():
    steps = range(1_000, 30_001, 1_000)
    assert tr.candidate_steps(steps, 6, 16_000) == [5_000, 10_000, 15_000, 16_000, 20_000, 25_000, 30_000]
    assert tr.candidate_steps(steps, 6, 30_000) == [5_000, 10_000, 15_000, 20_000, 25_000, 30_000]
    assert tr.candidate_steps(range(250, 3_001, 250), 4) == [750, 1_500, 2_250, 3_000]
    assert tr.candidate_steps(steps, 0) == list(steps)
    assert tr.candidate_steps([250, 500], 6, 500) == [250, 500]
    with pytest.raises(tr.ConfigError, match="unknown checkpoint-selection 'best'"):
        tr.TranslationConfig(checkpoint_selection="best").validate()


def test_a_run_selected_by_the_old_rule_keeps_its_checkpoint_and_says_which_the_new_rule_picks(capsys):
    rows = [{"step": 5000, "val/loss": 1.611, "val/loss_before": 1.165},
            {"step": 16000, "val/loss": 1.738, "val/loss_before": 1.122}]
    tr._note_old_selection("R/pretrain", "pretrain", {"best_step": 5000, "validation": rows})
    assert capsys.readouterr().err.strip() == (
        "note: R/pretrain uses its recorded checkpoint 5000, chosen by val/loss before per-method selection; "
        "by val/loss_before it would be step 16000 (1.1220)")
    # Silent for runs written with the rule, for meta-learners (unchanged rule) and where both rules agree.
    tr._note_old_selection("R", "pretrain", {"best_step": 5000, "validation": rows, "selected_by": "val/loss"})
    tr._note_old_selection("R", "fomaml", {"best_step": 5000, "validation": rows})
    tr._note_old_selection("R", "pretrain", {"best_step": 16000, "validation": rows})
    assert capsys.readouterr().err == ""


def test_finetune_keeps_a_model_that_translate_uses(quick_runs, capsys):
    import json

    out, _ = quick_runs
    run = str(out / "fomaml")
    code, err, stdout = _main(["finetune", "--run", run, "--lang", "ron", "--size", "100", "--lr", "1e-3"], capsys)
    assert code == 0, err
    assert "chrF" in stdout and os.path.isdir(os.path.join(run, "finetuned", "ron-100-s0"))
    with open(os.path.join(run, "finetuned", "ron-100-s0", "scores.json")) as f:
        assert json.load(f)["finetune_lr"] == 1e-3
    code, err, stdout = _main(["translate", "--run", run, "--lang", "ron", "Mulțumesc foarte mult.", "Nu știu."],
                              capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines)
    assert all(line.isascii() for line in lines)  # English out of Romanian in


def test_a_run_records_its_corpus_and_translate_says_when_the_files_differ(quick_runs, translation_dir, tmp_path,
                                                                          capsys):
    import json
    import shutil

    out, _ = quick_runs
    run = out / "fomaml"
    config = json.loads((run / "config.json").read_text())
    files = config["data"]["files"]
    codes = config["meta_langs"] + config["val_langs"] + config["target_langs"]
    assert {"tatoeba/manifest.tsv", *(f"tatoeba/{c}.tsv.gz" for c in codes)} <= set(files)
    assert config["data"] == tdata.corpus_identity(config["data_dir"], codes)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    config["data"]["files"]["tatoeba/ron.tsv.gz"]["sha256"] = "0" * 64  # trained on another copy of Romanian
    (copy / "config.json").write_text(json.dumps(config))
    code, err, stdout = _main(["translate", "--run", str(copy), "--lang", "ron", "Nu știu."], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 0 and len(stdout.strip().splitlines()) == 1, err
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "changed: tatoeba/ron.tsv.gz" in lines[0], err
    code, err, _ = _main(["translate", "--run", str(run), "--lang", "ron", "Nu știu."], capsys)
    assert code == 0 and "warning" not in err, err


@pytest.mark.parametrize("argv, fragment", [
    (["finetune", "--run", "{run}", "--lang", "xx9", "--size", "10"], "unknown language code"),
    (["finetune", "--run", "{run}", "--lang", "ron", "--size", "999999"], "cannot fine-tune on 999999"),
    (["finetune", "--run", "{run}", "--lang", "ron", "--size", "-3"], "data size"),
    (["translate", "--run", "{run}", "--lang", "qqq", "hello"], "unknown language code"),
    (["translate", "--run", "/nonexistent/run", "--lang", "ron", "hello"], "not a translation run"),
    (["meta-train", "--preset", "quick", "--out", "{tmp}/m", "--meta-langs", "fra,zz1"], "unknown language code"),
    (["meta-train", "--preset", "quick", "--out", "{tmp}/m", "--meta-langs", "fra,ron"], "both meta-trained"),
    (["all", "--preset", "quick", "--out", "{tmp}/a", "--sizes", "0,999999"], "cannot fine-tune on 999999"),
    (["evaluate", "--runs", "{run}@7", "--out", "{tmp}/g"], f"has no checkpoint at step 7 (it has {MID}, {LAST})"),
    (["finetune", "--run", f"{{run}}@{MID}", "--lang", "ron", "--size", "10"], "RUN@STEP picks a checkpoint for evaluate"),
    (["evaluate", "--runs", "{run}", "--out", "{tmp}/g", "--checkpoint-selection", "best"], "invalid choice: 'best'"),
    (["evaluate", "--runs", "{run}", "--out", "{tmp}/g", "--selection-candidates", "-1"], "selection-candidates"),
])
def test_bad_input_is_one_line(quick_runs, tmp_path, capsys, argv, fragment):
    out, _ = quick_runs
    argv = [a.format(run=out / "fomaml", tmp=tmp_path) for a in argv]
    code, err, _ = _main(argv, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err


def test_a_malformed_data_file_is_one_line_and_writes_nothing(translation_dir, tmp_path):
    data = tmp_path / "data"
    (data / "tatoeba").mkdir(parents=True)
    (data / "tatoeba" / "manifest.tsv").write_text((translation_dir / "tatoeba" / "manifest.tsv").read_text())
    import gzip
    import shutil

    for code in ("fra", "spa", "ita", "por", "deu", "ukr", "isl"):
        shutil.copy(translation_dir / "tatoeba" / f"{code}.tsv.gz", data / "tatoeba" / f"{code}.tsv.gz")
    with gzip.open(data / "tatoeba" / "nld.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("Goedemorgen\tGood morning\nkapotte regel zonder tab\n")
    with gzip.open(data / "tatoeba" / "ron.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("")
    proc = subprocess.run([sys.executable, "-m", "experiments.translation", "meta-train", "--preset", "quick",
                           "--out", str(tmp_path / "run"), "--data-dir", str(data)], cwd=REPO_ROOT, check=False,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "nld.tsv.gz:2")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_seed_statistics_use_student_t_and_pair_by_seed():
    assert tr.seed_ci95([1.0]) == 0.0
    assert tr.seed_ci95([1.0, 2.0, 3.0]) == pytest.approx(4.303 * 1.0 / np.sqrt(3))
    rows = [{"lang": "ron", "size": "100", "seed": s, "algo": a, "method": tr.METHOD_NAMES[a], "pairs": 100,
             "tatoeba_chrf": v, "dev_loss": v / 10, "copy_chrf": 15.0}
            for s, (m, p) in enumerate([(20.0, 18.0), (22.0, 21.0), (21.0, 17.0)])
            for a, v in (("fomaml", m), ("pretrain", p))]
    gaps = tr.paired_gaps(rows, "fomaml", "pretrain")
    mean, ci, n = gaps[("ron", "100")]
    assert (mean, n) == (pytest.approx(7.0 / 3), 3)
    assert ci == pytest.approx(tr.seed_ci95([2.0, 1.0, 4.0]))
    table = tr.results_table(rows)
    assert "| ron | 100 | 21.0 ± " in table and "+2.3 ±" in table and "chrF ron 15.0" in table
    # The development loss gets its own paired gap table, to three decimals.
    assert "MultiNMT, development loss" in table and "| ron | 100 | +0.233 ± " in table


def test_grid_sizes_a_language_cannot_fill_are_skipped_for_it_alone(translation_dir, capsys):
    config = tr.preset("quick", data_dir=str(translation_dir), target_langs=("ron", "kor"),
                       sizes=("0", "1600", "all")).resolved()
    corpus = tr.load_corpus(config)
    kor = len(tr.training_subset(config, corpus, "kor", None, 0))
    assert kor < 1600 < len(tr.training_subset(config, corpus, "ron", None, 0))
    sizes = tr.feasible_sizes(config, corpus)
    assert sizes == {"ron": ("0", "1600", "all"), "kor": ("0", "all")}
    assert f"kor has {kor} training pairs" in capsys.readouterr().err
    with pytest.raises(tr.ConfigError, match="cannot fine-tune on 99999"):
        tr.feasible_sizes(tr.dataclasses.replace(config, sizes=("0", "99999")), corpus)
    # Subsets are nested across sizes for one seed, and differ between seeds.
    small, large = (tr.training_subset(config, corpus, "ron", n, 0) for n in (100, 400))
    assert large[:100] == small and tr.training_subset(config, corpus, "ron", 100, 1) != small
