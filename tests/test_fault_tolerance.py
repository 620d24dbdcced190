"""Faults during training: SIGTERM/SIGINT preemption, damaged checkpoints, a full disk.

Each ends in one clear line (or a warning and a fallback), keeps the last good
checkpoint, and a resumed run continues exactly as if nothing had happened.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, assert_one_line_error, assert_one_line_error_text, run_in_process

from jaxmeta import checkpoint as ckpt
from jaxmeta.algorithms.registry import make_learner
from jaxmeta.data import sinusoid
from jaxmeta.errors import CheckpointError, JaxmetaWarning
from jaxmeta.models import MLP, regression_loss
from jaxmeta.training import Interrupted, init_train_state, train

MODEL = MLP(features=(16, 16))
PARAMS = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]
IDENTITY = {"algo": "maml"}


def sample(key, _data):
    return sinusoid.sample_tasks(key, batch_size=4, shots=5, queries=5)


def learner():
    return make_learner("maml", regression_loss(MODEL), inner_steps=2, inner_lr=0.01, outer_lr=1e-2, meta_steps=20)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def norm(params):
    """A deterministic validation metric (so validation rows are part of what must match)."""
    return {"norm": float(np.linalg.norm(flat(params)))}


def run(out, steps, *, resume=False, validate=norm, checkpoint_every=10, **kw):
    return train(learner(), PARAMS, sample, key=jax.random.PRNGKey(1), meta_steps=steps, log_every=5,
                 out_dir=None if out is None else str(out), checkpoint_every=checkpoint_every, resume=resume,
                 identity=IDENTITY, progress=False, validate=validate, validate_every=5, **kw)


def abstract_state():
    return jax.eval_shape(lambda: init_train_state(learner(), PARAMS, jax.random.PRNGKey(1)))


def send_sigint(times=1):
    """A ``validate`` that interrupts its own process (``times`` SIGINTs) on its first call."""
    calls = []

    def validate(params):
        if not calls:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # let the handler run between the two
        calls.append(1)
        return norm(params)

    return validate


# --------------------------------------------------------------------------------------
# SIGTERM / SIGINT: stop after the current dispatch, checkpointed, resumable exactly.
# --------------------------------------------------------------------------------------


def test_sigint_stops_at_a_checkpoint_and_resume_is_exact(tmp_path):
    straight = run(tmp_path / "straight", 20, checkpoint_every=20)
    out = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        run(out, 20, checkpoint_every=20, validate=send_sigint())
    e = stopped.value
    # Stopped after the dispatch that was running (steps 1..5), at a step that is no regular checkpoint.
    assert (e.signal_name, e.step, e.signum) == ("SIGINT", 5, signal.SIGINT)
    assert e.checkpoint == os.path.join(str(out), "checkpoints", "5") and os.path.isdir(e.checkpoint)
    assert str(e).startswith("interrupted by SIGINT at meta-step 5; checkpoint ")
    assert ckpt.latest_step(str(out)) == 5 and ckpt.latest_good_step(str(out)) == 5
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored

    resumed = run(out, 20, resume=True, checkpoint_every=20)
    np.testing.assert_allclose(flat(resumed.state.meta.params), flat(straight.state.meta.params), rtol=0, atol=1e-6)
    assert (out / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()

    # A second Ctrl-C quits at once; without an output directory nothing is saved; off the main thread
    # (where no handler can be installed) training just runs.
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "forced", 20, validate=send_sigint(times=2))
    assert signal.getsignal(signal.SIGINT) == before[0]
    with pytest.raises(Interrupted) as stopped:
        run(None, 20, validate=send_sigint())
    assert stopped.value.checkpoint is None and stopped.value.step == 5
    results = []
    worker = threading.Thread(target=lambda: results.append(run(None, 5)))
    worker.start()
    worker.join()
    assert int(results[0].state.step) == 5


def test_a_signal_in_the_final_dispatch_is_raised_with_the_finished_training(tmp_path):
    """Training complete and checkpointed, then the signal obeyed, the result attached for the caller."""
    straight = run(tmp_path / "straight", 5)
    out = tmp_path / "last"
    with pytest.raises(Interrupted) as stopped:
        run(out, 5, validate=send_sigint())  # one dispatch (log_every 5): the signal comes in the last one
    e = stopped.value
    assert e.complete and (e.signal_name, e.step) == ("SIGINT", 5) and e.then is None
    assert str(e).startswith("interrupted by SIGINT after the last meta-step (5), training complete; checkpoint ")
    assert e.checkpoint == os.path.join(str(out), "checkpoints", "5") and ckpt.latest_step(str(out)) == 5
    assert int(e.result.state.step) == 5 and e.result.seconds == e.seconds > 0
    assert e.result.history == straight.history  # validated and logged as if no signal came
    np.testing.assert_allclose(flat(e.result.state.meta.params), flat(straight.state.meta.params), rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(e))
    assert again.complete and str(again) == str(e)
    # Not in the last dispatch: an ordinary interruption, nothing attached.
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path / "early", 10, validate=send_sigint())
    assert not stopped.value.complete and stopped.value.result is None and stopped.value.step == 5


def test_interrupted_is_one_line_with_the_resume_command_and_exit_code(capsys):
    from jaxmeta.cli import run as cli_run

    def stopped(signal_name):
        def main(argv):
            raise Interrupted(signal_name, 20, "/runs/r/checkpoints/20")

        return main

    for signal_name, code, argv in [("SIGTERM", 143, ["train", "--out", "/runs/r"]),
                                    ("SIGINT", 130, ["train", "--resume", "--out", "/runs/r"])]:
        with pytest.raises(SystemExit) as exited:
            cli_run(stopped(signal_name), argv)
        assert exited.value.code == code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        head, command = lines[0].split("; resume with: ")
        assert head == f"interrupted by {signal_name} at meta-step 20; checkpoint /runs/r/checkpoints/20"
        words = shlex.split(command)  # this program as started, the same arguments, --resume once
        assert words[0] == sys.executable
        assert words[-4:] == (argv if "--resume" in argv else [*argv, "--resume"])


@pytest.fixture(scope="module")
def env(omniglot_dir, jaxmeta_cache_dir, omniglot_characters):
    """The CLI's environment: the archives and the session's prepared cache."""
    return {"JAXMETA_OMNIGLOT_DIR": str(omniglot_dir), "JAXMETA_CACHE_DIR": str(jaxmeta_cache_dir)}


def assert_same_run(a, b):
    """Two run directories hold the same metrics, evaluation and final parameters (step 30)."""
    from experiments.fewshot import pipeline as fewshot

    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    ea, eb = json.loads((a / "eval.json").read_text()), json.loads((b / "eval.json").read_text())
    assert ea["accuracy_per_step"] == pytest.approx(eb["accuracy_per_step"], abs=1e-6)
    assert ckpt.latest_step(str(a)) == ckpt.latest_step(str(b)) == 30
    config = fewshot.read_config(str(a))
    model, _, _ = fewshot.build(config)
    _, pa = fewshot.load_params(str(a), config, model, (28, 28, 1))
    _, pb = fewshot.load_params(str(b), config, model, (28, 28, 1))
    np.testing.assert_allclose(flat(pa), flat(pb), rtol=0, atol=1e-6)


def test_sigterm_and_kill_minus_nine_then_resume_are_exact(tmp_path, env):
    """Against one straight CLI run: SIGTERM (checkpoint, one line, the printed resume command) and
    kill -9 (nothing written on the way out; resume from the last regular checkpoint)."""
    args = ["train", "--ways", "5", "--shots", "1", "--preset", "quick", "--no-progress", "--meta-steps", "30",
            "--log-every", "10", "--val-every", "10", "--val-tasks", "20", "--test-tasks", "50"]
    full_env = {**os.environ, **env}
    straight, stopped, killed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "experiments.omniglot", *args, "--checkpoint-every", "30",
                           "--out", str(straight)], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def start_then(signum, out, ready, checkpoint_every, stderr):
        child = subprocess.Popen([sys.executable, "-m", "experiments.omniglot", *args, "--checkpoint-every",
                                  checkpoint_every, "--out", str(out)],
                                 cwd=REPO_ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 600
        while not ready.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        child.send_signal(signum)
        return child.wait(timeout=600)

    # SIGTERM.  --checkpoint-every 30: the SIGTERM checkpoint (step 10 or 20) is not one of the regular ones.
    with open(tmp_path / "stderr.txt", "w+") as err:
        code = start_then(signal.SIGTERM, stopped, stopped / "metrics.jsonl", "30", err)
        err.seek(0)
        stderr = err.read()
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    found = re.fullmatch(r"interrupted by SIGTERM at meta-step (\d+); checkpoint (.+); resume with: (.+)", last)
    assert found, last
    step, where, command = int(found[1]), found[2], found[3]
    assert step in (10, 20) and where == str(stopped / "checkpoints" / str(step)) and os.path.isdir(where)
    assert ckpt.latest_step(str(stopped)) == step
    assert json.loads((stopped / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
    assert not (stopped / "eval.json").exists()
    interrupted = json.loads((stopped / "train.json").read_text())  # the stopped call's time is kept
    assert interrupted["meta_steps"] == step and interrupted["calls"] == 1 and interrupted["train_seconds_total"] > 0
    proc = subprocess.run(shlex.split(command), cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, stopped)
    resumed = json.loads((stopped / "train.json").read_text())
    assert resumed["meta_steps"] == 30 and resumed["calls"] == 2
    assert resumed["train_seconds_total"] == pytest.approx(interrupted["train_seconds_total"]
                                                           + resumed["train_seconds_this_call"])

    # kill -9 once the first regular checkpoint exists; resume reads the configuration from the run.
    code = start_then(signal.SIGKILL, killed, killed / "checkpoints" / "10", "10", subprocess.DEVNULL)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "eval.json").exists()
    proc = subprocess.run([sys.executable, "-m", "experiments.omniglot", "train", "--resume", "--meta-steps", "30",
                           "--no-progress", "--out", str(killed)], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, killed)


def test_sigterm_in_the_last_dispatch_keeps_the_training_record_and_names_evaluate(tmp_path, env, capsys,
                                                                                    monkeypatch):
    """The run's last dispatch gets SIGTERM: train.json is written (wall time for the result record), the
    line names the evaluate command, which then scores the run and records its training time."""
    from experiments import omniglot
    from experiments.fewshot import pipeline as fewshot

    real_train = fewshot.train

    def train_then_sigterm(*args, validate, **kw):
        def validate_and_stop(params):
            os.kill(os.getpid(), signal.SIGTERM)
            return validate(params)

        return real_train(*args, validate=validate_and_stop, **kw)

    monkeypatch.setattr(fewshot, "train", train_then_sigterm)
    run_dir = tmp_path / "run"
    code, stderr, _ = run_in_process(omniglot.main, [
        "train", "--ways", "5", "--shots", "1", "--preset", "quick", "--no-progress", "--meta-steps", "10",
        "--log-every", "10", "--val-every", "10", "--val-tasks", "20", "--test-tasks", "20", "--out", str(run_dir)],
        capsys, env=env, monkeypatch=monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 143 and len(lines) == 1, stderr[-3000:]
    head, command = lines[0].split("; then run: ")
    assert head == (f"interrupted by SIGTERM after the last meta-step (10), training complete; "
                    f"checkpoint {run_dir / 'checkpoints' / '10'}")
    assert shlex.split(command)[-3:] == ["evaluate", "--run", str(run_dir)]
    training = json.loads((run_dir / "train.json").read_text())
    assert training["meta_steps"] == 10 and training["train_seconds_total"] > 0 and training["machine"]
    assert (run_dir / "curve.png").exists() and not (run_dir / "eval.json").exists()
    monkeypatch.setattr(fewshot, "train", real_train)

    code, stderr, _ = run_in_process(omniglot.main, ["train", "--resume", "--out", str(run_dir)], capsys,
                                     env=env, monkeypatch=monkeypatch)
    assert_one_line_error_text(code, stderr, "already ran 10 meta-steps", f"evaluate --run {run_dir}")
    code, stderr, out = run_in_process(omniglot.main, ["evaluate", "--run", str(run_dir), "--no-progress"], capsys,
                                       env=env, monkeypatch=monkeypatch)
    assert code == 0, stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in run_dir.glob("omniglot-*.json")]
    assert record["meta_steps"] == 10 and record["tasks"] == 20
    assert record["wall_s"] == pytest.approx(training["train_seconds_total"]) and record["machine"]


# --------------------------------------------------------------------------------------
# Damaged checkpoints: checksums, fallback to the newest intact step, set aside on resume.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """A 30-step run with checkpoints at 10, 20 and 30, and its state at step 20."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run(out, 30)
    _, at_20 = ckpt.restore(str(out), abstract_state(), IDENTITY, step=20)
    return out, result, at_20


def damage(step_dir, how):
    """Truncates, or flips bytes in, the largest array file of a checkpoint; returns its path."""
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state", "d")) for f in names]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


@pytest.mark.parametrize("how, recorded", [("truncate", True), ("flip", True), ("truncate", False)],
                         ids=["truncated", "flipped", "truncated-old-run-without-checksums"])
def test_a_damaged_newest_checkpoint_falls_back_and_resume_is_exact(tmp_path, straight_run, how, recorded):
    source, straight, at_20 = straight_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    record = json.loads((run_dir / ckpt.CHECKSUM_FILE).read_text())
    assert sorted(record, key=int) == ["10", "20", "30"]
    assert all(len(digest) == 64 for files in record.values() for digest in files.values())
    if not recorded:
        (run_dir / ckpt.CHECKSUM_FILE).unlink()
    bad = damage(run_dir / "checkpoints" / "30", how)
    damaged_bytes = open(bad, "rb").read()

    # Without restoring, the checksums tell (an old run's checkpoints can only be told by restoring).
    assert ckpt.latest_good_step(str(run_dir)) == (20 if recorded else 30)
    reason = "does not match its recorded checksum" if recorded else ""
    with pytest.warns(JaxmetaWarning, match=rf"checkpoint step 30 in .* is damaged \(.*{reason}.*\); falling back "
                                            r"to step 20"):
        step, state = ckpt.restore(str(run_dir), abstract_state(), IDENTITY)
    assert step == 20
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(at_20)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ckpt.read_identity(str(run_dir)) == IDENTITY
    with pytest.raises(CheckpointError, match="cannot restore checkpoint 30 .*corrupt or incomplete"):
        ckpt.restore(str(run_dir), abstract_state(), IDENTITY, step=30)  # an explicit step: no fallback

    # Resuming sets the damaged checkpoint aside (never deleted) and ends exactly where a straight run does.
    with pytest.warns(JaxmetaWarning, match="moved damaged checkpoint to .*damaged-checkpoints.30; resuming from "
                                            "step 20"):
        resumed = run(run_dir, 30, resume=True)
    np.testing.assert_allclose(flat(resumed.state.meta.params), flat(straight.state.meta.params), rtol=0, atol=1e-6)
    assert (run_dir / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
    set_aside = run_dir / "damaged-checkpoints" / "30" / os.path.relpath(bad, run_dir / "checkpoints" / "30")
    assert set_aside.read_bytes() == damaged_bytes
    assert ckpt.latest_good_step(str(run_dir)) == 30
    assert sorted(json.loads((run_dir / ckpt.CHECKSUM_FILE).read_text()), key=int) == (
        ["10", "20", "30"] if recorded else ["30"])
    step, _ = ckpt.restore(str(run_dir), abstract_state(), IDENTITY)
    assert step == 30


def test_every_checkpoint_damaged_is_one_error_and_the_files_are_left_alone(tmp_path, straight_run):
    source, _, _ = straight_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    for step in (10, 20, 30):
        damage(run_dir / "checkpoints" / str(step), "flip")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert ckpt.latest_good_step(str(run_dir)) is None
    for attempt in (lambda: ckpt.restore(str(run_dir), abstract_state(), IDENTITY),
                    lambda: ckpt.read_identity(str(run_dir))):
        with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(step 30: .*; step 20: .*; "
                                                  r"step 10: .*\)") as failed:
            attempt()
        assert "\n" not in str(failed.value)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------
# A full disk: one line, the earlier checkpoint intact, nothing half-written.
# --------------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent('''
    import os, resource, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_fault_tolerance as t
    from jaxmeta.cli import run

    out, limit = sys.argv[1], int(sys.argv[2])

    def validate(params):
        if os.path.isdir(os.path.join(out, "checkpoints", "5")):  # from here on, files cannot grow past `limit`
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        else:
            np.save(os.path.join(out, "params5.npy"), t.flat(params))
        return t.norm(params)

    run(lambda argv: t.run(out, 20, validate=validate, checkpoint_every=5), [])
''')


@pytest.mark.parametrize("what, limit", [("the checkpoint", 1000), ("metrics.jsonl", 100)])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_intact(tmp_path, what, limit):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", FULL_DISK.format(tests=str(REPO_ROOT / "tests")), str(out),
                           str(limit)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert_one_line_error(proc, f"cannot write {what} at meta-step 10 in {out}: File too large; "
                                "the checkpoint at step 5 is intact")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ([5, 10] if what == "the checkpoint" else [5])
    assert sorted(os.listdir(out / "checkpoints")) == ["5"]  # the failed save's temporary directory is gone
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert ckpt.latest_good_step(str(out)) == 5
    step, state = ckpt.restore(str(out), abstract_state(), IDENTITY)
    assert step == 5 and int(state.step) == 5
    np.testing.assert_array_equal(flat(state.meta.params), np.load(out / "params5.npy"))
    resumed = run(out, 20, resume=True, checkpoint_every=5)  # disk space back: the run goes on from step 5
    assert int(resumed.state.step) == 20 and ckpt.latest_step(str(out)) == 20


# --------------------------------------------------------------------------------------
# keep_best: the best validated checkpoints survive beside the newest (a checkpoint ensemble).
# --------------------------------------------------------------------------------------


def wiggly(params):
    """A deterministic validation metric that is far from monotone in the meta-step."""
    return {"accuracy": float(np.sin(1e3 * np.linalg.norm(flat(params))))}


def test_keep_best_keeps_the_best_validated_checkpoints_and_resume_is_exact(tmp_path):
    from jaxmeta.training import best_steps

    keep = dict(checkpoint_every=5, keep_checkpoints=1, validate=wiggly)
    plain = run(tmp_path / "plain", 40, **keep)
    assert ckpt.steps(str(tmp_path / "plain")) == [40]  # without keep_best only the newest stays

    straight = run(tmp_path / "straight", 40, keep_best=3, **keep)
    scored = sorted(((row["val/accuracy"], row["step"]) for row in straight.history), reverse=True)
    best = [step for _, step in scored[:3]]
    assert best_steps(straight.history, "val/accuracy", 3) == best
    kept = sorted({40, *best}, reverse=True)
    assert ckpt.steps(str(tmp_path / "straight")) == kept
    assert sorted(map(int, ckpt.read_checksums(str(tmp_path / "straight")))) == sorted(kept)
    np.testing.assert_array_equal(flat(plain.state.meta.params), flat(straight.state.meta.params))
    for step in best:  # every kept checkpoint restores, and holds that step's state
        restored_step, state = ckpt.restore(str(tmp_path / "straight"), abstract_state(), IDENTITY, step=step)
        assert restored_step == step == int(state.step)

    # Interrupted at step 5, then resumed: the same checkpoints, metrics and parameters.
    out = tmp_path / "stopped"

    def stop_once(params, calls=[]):  # noqa: B006 - the call count is the point
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return wiggly(params)

    with pytest.raises(Interrupted):
        run(out, 40, keep_best=3, **{**keep, "validate": stop_once})
    resumed = run(out, 40, resume=True, keep_best=3, **keep)
    assert ckpt.steps(str(out)) == kept
    assert (out / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    np.testing.assert_allclose(flat(resumed.state.meta.params), flat(straight.state.meta.params), rtol=0, atol=1e-6)
