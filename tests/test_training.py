"""The training loop: exact resume, non-finite guard, determinism, refusals."""

from __future__ import annotations

import json
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmeta.algorithms.registry import make_learner
from jaxmeta.algorithms.reptile import reptile_params
from jaxmeta.checkpoint import latest_step
from jaxmeta.data import sinusoid
from jaxmeta.errors import CheckpointError
from jaxmeta.models import MLP, regression_loss
from jaxmeta.training import TrainingDiverged, init_train_state, train

MODEL = MLP(features=(16, 16))
LOSS = regression_loss(MODEL)
PARAMS = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]


def sample(key, _data):
    return sinusoid.sample_tasks(key, batch_size=4, shots=5, queries=5)


def nan_sometimes(key, _data):
    """Poisons about a quarter of the task batches with a NaN target."""
    tasks = sample(key, None)
    poison = jax.random.uniform(jax.random.fold_in(key, 7)) < 0.25
    y = tasks.query[1].at[0, 0, 0].set(jnp.where(poison, jnp.nan, tasks.query[1][0, 0, 0]))
    return tasks._replace(query=(tasks.query[0], y))


def nan_always(key, _data):
    tasks = sample(key, None)
    return tasks._replace(query=(tasks.query[0], tasks.query[1] * jnp.nan))


def learner(algo="maml"):
    if algo == "reptile-protocol":  # mini-batches and an inner Adam state carried in the checkpoints
        return make_learner("reptile", LOSS, inner_steps=2, inner_lr=0.01, outer_lr=1e-2, meta_steps=20,
                            inner_optimizer=optax.adam(0.01, b1=0.0), inner_batch_size=3, persistent_inner_state=True)
    return make_learner(algo, LOSS, inner_steps=2, inner_lr=0.01, outer_lr=1e-2, meta_steps=20)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def run(out, steps, *, resume=False, sampler=sample, algo="maml", **kw):
    return train(learner(algo), PARAMS, sampler, key=jax.random.PRNGKey(1), meta_steps=steps, log_every=5,
                 out_dir=str(out), checkpoint_every=10, resume=resume, identity={"algo": algo}, progress=False,
                 **kw)


@pytest.mark.parametrize("algo", ["maml", "reptile", "reptile-protocol"])
def test_resume_continues_exactly(tmp_path, algo):
    straight = run(tmp_path / "straight", 20, algo=algo)
    run(tmp_path / "split", 10, algo=algo)
    resumed = run(tmp_path / "split", 20, resume=True, algo=algo)
    np.testing.assert_allclose(flat(resumed.state.meta.params), flat(straight.state.meta.params), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(resumed.state.key), np.asarray(straight.state.key))
    assert int(resumed.state.step) == 20 and int(resumed.state.meta.step) == 20
    a = (tmp_path / "straight" / "metrics.jsonl").read_text()
    b = (tmp_path / "split" / "metrics.jsonl").read_text()
    assert a == b and len(a.splitlines()) == 4
    # Moving past 10 steps changed something (the comparison is not vacuous).
    assert not np.allclose(flat(reptile_params(straight.state.meta.params)[0]), flat(PARAMS))


def test_same_seed_gives_identical_metrics_files(tmp_path):
    run(tmp_path / "a", 15)
    run(tmp_path / "b", 15)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15]  # the final step is always logged
    assert {"train/loss", "train/query_loss_pre", "train/query_loss_post"} <= set(rows[0])


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    result = run(tmp_path / "nan", 40, sampler=nan_sometimes)
    skipped = int(result.state.skipped)
    assert 0 < skipped < 40
    assert int(result.state.meta.step) == 40 - skipped  # only finite updates were applied
    assert np.all(np.isfinite(flat(result.state.meta.params)))
    assert sum(r["train/skipped"] for r in result.history) == skipped
    assert all(np.isfinite(r["train/loss"]) for r in result.history)


def test_consecutive_non_finite_steps_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "diverge"
    run(out, 10)  # a good checkpoint at step 10
    with pytest.raises(TrainingDiverged, match=r"meta-steps 11\.\.15 all .*limit: 3 .*checkpoint \(step 10\)"):
        run(out, 40, resume=True, sampler=nan_always, max_bad_steps=3)
    assert latest_step(str(out)) == 10


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    run(tmp_path / "r", 10)
    with pytest.raises(CheckpointError, match="different configuration"):
        train(learner(), PARAMS, sample, key=jax.random.PRNGKey(1), meta_steps=20, log_every=5,
              out_dir=str(tmp_path / "r"), resume=True, identity={"algo": "fomaml"}, progress=False)


def test_an_existing_run_is_not_overwritten(tmp_path):
    run(tmp_path / "r", 10)
    before = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    with pytest.raises(CheckpointError, match="already holds a run"):
        run(tmp_path / "r", 20)
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == before


def test_init_train_state_is_pure():
    a = init_train_state(learner(), PARAMS, jax.random.PRNGKey(3))
    b = init_train_state(learner(), PARAMS, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(flat(a.meta.params), flat(b.meta.params))
    assert int(a.step) == 0 and int(a.skipped) == 0


def test_a_checkpoint_written_on_another_device_resumes_here(tmp_path):
    # A run trained on a GPU stores its arrays' shardings as {"device_str": "cuda:0"}; restored on
    # a machine without that device (this CPU) it must land on a local device, not fail.
    straight = run(tmp_path / "straight", 20)
    out = tmp_path / "gpu"
    run(out, 10)
    shardings = out / "checkpoints" / "10" / "state" / "_sharding"
    stored = json.loads(shardings.read_text())
    assert stored and all("device_str" in json.loads(v) for v in stored.values())
    shardings.write_text(json.dumps({
        k: json.dumps({**json.loads(v), "device_str": "cuda:0"}) for k, v in stored.items()}))
    resumed = run(out, 20, resume=True)
    np.testing.assert_allclose(flat(resumed.state.meta.params), flat(straight.state.meta.params), rtol=0, atol=1e-6)
