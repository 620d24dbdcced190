"""Reptile's reference protocol: inner mini-batches, one inner Adam state carried from task to task,
test-time adaptation from that state, and the paper presets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmeta import Task, evaluate
from jaxmeta.algorithms.registry import make_learner
from jaxmeta.algorithms.reptile import INNER_STATE, reptile, reptile_params
from jaxmeta.errors import ConfigError
from jaxmeta.inner import minibatch_schedule


def linear_loss(w, batch):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def linear_tasks(key, n_tasks=3, n=8, dim=4):
    kx, kw, kq = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n_tasks, 2 * n, dim))
    w = jax.random.normal(kw, (n_tasks, dim))
    y = jnp.einsum("tnd,td->tn", x, w) + 0.1 * jax.random.normal(kq, (n_tasks, 2 * n))
    return Task((x[:, :n], y[:, :n]), (x[:, n:], y[:, n:]))


def test_minibatch_schedule_uses_every_example_once_per_pass():
    order = np.asarray(minibatch_schedule(jax.random.PRNGKey(0), 5, 4, 3))  # 12 draws: 2 passes and 2 more
    assert order.shape == (4, 3)
    flat = order.ravel()
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert len(set(flat[10:])) == 2  # the third pass, cut short, still without repeats
    # A batch continues across the end of a pass (the reference's _mini_batches), and passes differ.
    assert not np.array_equal(flat[:5], flat[5:10])
    assert np.array_equal(minibatch_schedule(jax.random.PRNGKey(0), 5, 4, 3), order)
    with pytest.raises(ValueError):
        minibatch_schedule(jax.random.PRNGKey(0), 0, 4, 3)


def test_a_persistent_inner_state_is_carried_from_task_to_task_as_in_the_reference_loop():
    """Two meta-steps of the learner against openai/supervised-reptile's train_step written as a loop:
    tasks in sequence, each from θ, one Adam state (β1 = 0) never reset; θ moves ε of the way to the mean."""
    adam = optax.adam(0.05, b1=0.0)
    theta = jnp.zeros(4)
    learner = reptile(linear_loss, inner_steps=3, inner_optimizer=adam, epsilon=0.5, persistent_inner_state=True)
    state = learner.init(theta)
    assert set(state.params) == {"params", INNER_STATE}
    batches = [linear_tasks(jax.random.PRNGKey(s)) for s in (1, 2)]

    w, carried = theta, adam.init(theta)
    for tasks in batches:
        state, _ = jax.jit(learner.step)(state, tasks)
        adapted = []
        for t in range(3):
            phi = w
            for _ in range(3):
                g = jax.grad(linear_loss)(phi, (tasks.support[0][t], tasks.support[1][t]))
                updates, carried = adam.update(g, carried, phi)
                phi = optax.apply_updates(phi, updates)
            adapted.append(phi)
        w = w + 0.5 * (jnp.mean(jnp.stack(adapted), axis=0) - w)

    params, inner_state = reptile_params(state.params)
    np.testing.assert_allclose(params, w, rtol=1e-5, atol=1e-6)
    assert int(inner_state[0].count) == int(carried[0].count) == 2 * 3 * 3
    np.testing.assert_allclose(inner_state[0].nu, carried[0].nu, rtol=1e-5, atol=1e-9)
    # Without the carried state every task starts Adam afresh: a different result.
    fresh = reptile(linear_loss, inner_steps=3, inner_optimizer=adam, epsilon=0.5)
    s = fresh.init(theta)
    for tasks in batches:
        s, _ = fresh.step(s, tasks)
    assert np.abs(np.asarray(s.params) - np.asarray(w)).max() > 1e-3


def test_inner_mini_batches_are_the_scheduled_examples_and_evaluation_starts_from_the_carried_state():
    adam = optax.adam(0.05, b1=0.0)
    tasks = linear_tasks(jax.random.PRNGKey(3), n_tasks=2)
    theta = jnp.ones(4)
    carried = adam.init(theta)
    carried = (carried[0]._replace(count=jnp.asarray(7, jnp.int32), nu=jnp.full(4, 0.3)), *carried[1:])
    key = jax.random.PRNGKey(4)
    state = {"params": theta, INNER_STATE: carried}

    def learner(test_inner_batch_size):
        return reptile(linear_loss, inner_steps=3, inner_optimizer=adam, persistent_inner_state=True,
                       test_inner_batch_size=test_inner_batch_size)

    result = evaluate(learner(3), state, tasks, steps=2, loss_fn=linear_loss, key=key)
    for i in range(2):
        order = minibatch_schedule(jax.random.fold_in(key, i), 8, 2, 3)
        phi, s = theta, carried
        for step in range(2):
            batch = (tasks.support[0][i][order[step]], tasks.support[1][i][order[step]])
            updates, s = adam.update(jax.grad(linear_loss)(phi, batch), s, phi)
            phi = optax.apply_updates(phi, updates)
        query = (tasks.query[0][i], tasks.query[1][i])
        np.testing.assert_allclose(result.per_task["loss"][i, -1], linear_loss(phi, query), rtol=1e-5)
    # A mini-batch as large as the support set is the whole set, in some order: the mean loss is the same.
    whole = evaluate(learner(None), state, tasks, steps=2, loss_fn=linear_loss)
    every = evaluate(learner(8), state, tasks, steps=2, loss_fn=linear_loss, key=key)
    np.testing.assert_allclose(every.per_task["loss"], whole.per_task["loss"], rtol=1e-5)


def test_an_evaluation_in_slices_gives_every_task_the_key_it_has_in_one_call():
    """evaluate(first_task=i): the slices of a resumable evaluation draw the mini-batches of one call."""
    adam = optax.adam(0.05, b1=0.0)
    tasks = linear_tasks(jax.random.PRNGKey(5), n_tasks=5)
    learner = reptile(linear_loss, inner_steps=3, inner_optimizer=adam, test_inner_batch_size=3)
    key, theta = jax.random.PRNGKey(6), jnp.ones(4)
    whole = evaluate(learner, theta, tasks, steps=4, loss_fn=linear_loss, key=key).per_task["loss"]

    def part(a, b, **kwargs):
        return evaluate(learner, theta, jax.tree.map(lambda x: x[a:b], tasks), steps=4, loss_fn=linear_loss, key=key,
                        **kwargs).per_task["loss"]

    np.testing.assert_allclose(np.concatenate([part(0, 2), part(2, 5, first_task=2)]), whole, rtol=1e-6)
    # Without it the second slice's tasks would draw the first tasks' mini-batches: other losses.
    assert np.abs(part(2, 5) - whole[2:])[:, -1].min() > 1e-4
    # Scored after the last step alone, each task draws the same mini-batches: the last step's losses.
    np.testing.assert_allclose(part(0, 5, every_step=False), whole[:, -1:], rtol=1e-6)


def test_the_protocol_is_reptile_s_alone():
    for kwargs in ({"inner_batch_size": 5}, {"persistent_inner_state": True, "inner_optimizer": optax.adam(1e-3)}):
        with pytest.raises(ConfigError, match="Reptile's protocol"):
            make_learner("maml", linear_loss, inner_steps=1, inner_lr=0.1, outer_lr=1e-3, **kwargs)
    with pytest.raises(ConfigError, match="needs an inner optimizer"):
        make_learner("reptile", linear_loss, inner_steps=1, inner_lr=0.1, outer_lr=1e-3, persistent_inner_state=True)


def test_paper_presets_are_each_algorithm_s_paper():
    from experiments import miniimagenet, omniglot

    five = omniglot.preset("paper", 5, 1, "reptile")
    assert {k: five[k] for k in ("meta_batch", "inner_steps", "inner_lr", "inner_batch", "train_shots",
                                 "meta_steps", "test_inner_steps", "test_inner_batch", "inner_beta1")} == dict(
        meta_batch=5, inner_steps=5, inner_lr=0.001, inner_batch=10, train_shots=10, meta_steps=100_000,
        test_inner_steps=50, test_inner_batch=5, inner_beta1=0.0)
    assert five["inner_optimizer"] == "adam" and five["persistent_inner_state"] and five["reptile_epsilon"] == 1.0
    twenty = omniglot.preset("paper", 20, 1, "reptile")
    assert (twenty["inner_batch"], twenty["inner_steps"], twenty["inner_lr"], twenty["meta_steps"],
            twenty["test_inner_batch"]) == (20, 10, 0.0005, 200_000, 10)
    # MAML's protocol is unchanged for MAML (and is what the other seed algorithms use).
    assert omniglot.preset("paper", 5, 1, "maml") == omniglot.preset("paper", 5, 1)
    assert omniglot.preset("paper", 5, 1)["meta_batch"] == 32 and "inner_batch" not in omniglot.preset("paper", 5, 1)
    mini = miniimagenet.preset("paper", 5, 5, "reptile")
    assert (mini["inner_steps"], mini["train_shots"], mini["test_inner_batch"]) == (8, 15, 15)


def test_a_short_run_at_reptile_s_protocol_learns_and_keeps_both_evaluations(tmp_path, omniglot_dir,
                                                                            jaxmeta_cache_dir, omniglot_characters,
                                                                            capsys, monkeypatch):
    """``train --preset paper --algo reptile`` at a test's budget: the protocol lands in config.json,
    the run learns far above chance scored non-transductively, and ``evaluate`` adds the other mode."""
    import json

    from conftest import run_in_process

    from experiments import omniglot

    env = {"JAXMETA_OMNIGLOT_DIR": str(omniglot_dir), "JAXMETA_CACHE_DIR": str(jaxmeta_cache_dir)}
    out = tmp_path / "reptile"
    code, stderr, _ = run_in_process(omniglot.main, [
        "train", "--ways", "5", "--shots", "1", "--algo", "reptile", "--preset", "paper", "--meta-steps", "300",
        "--log-every", "100", "--val-every", "300", "--checkpoint-every", "300", "--val-tasks", "20",
        "--test-tasks", "100", "--test-inner-steps", "10", "--no-progress", "--out", str(out)],
        capsys, env=env, monkeypatch=monkeypatch)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["inner_optimizer"], config["inner_beta1"], config["inner_batch"], config["train_shots"],
            config["persistent_inner_state"], config["meta_batch"], config["eval_mode"]) == (
        "adam", 0.0, 10, 10, True, 5, "non-transductive")
    alone = json.loads((out / "eval-non-transductive.json").read_text())
    assert alone["eval_mode"] == "non-transductive" and alone["accuracy"] > 0.5, alone  # chance is 0.2
    assert not (out / "eval.json").exists()
    code, stderr, _ = run_in_process(omniglot.main, ["evaluate", "--run", str(out), "--tasks", "100",
                                                     "--eval-mode", "transductive"], capsys, env=env,
                                     monkeypatch=monkeypatch)
    assert code == 0, stderr
    together = json.loads((out / "eval.json").read_text())
    assert together["eval_mode"] == "transductive" and together["accuracy"] > 0.5, together
    # Reptile's 1-shot and 5-shot commands train alike (10-shot training tasks): the same run tests at 5 shots,
    # into its own file and its own record, and does better with more support examples.
    results = tmp_path / "results"
    code, stderr, _ = run_in_process(omniglot.main, ["evaluate", "--run", str(out), "--tasks", "100", "--shots", "5",
                                                     "--results", str(results)], capsys, env=env,
                                     monkeypatch=monkeypatch)
    assert code == 0, stderr
    five = json.loads((out / "eval-non-transductive-5shot.json").read_text())
    assert five["shots"] == 5 and five["tasks"] == 100 and five["accuracy"] > alone["accuracy"] + 0.05, (five, alone)
    assert json.loads((out / "eval-non-transductive.json").read_text()) == alone
    record = json.loads((results / "omniglot-5w5s-reptile-paper-non-transductive.json").read_text())
    assert (record["shots"], record["accuracy"], record["meta_steps"]) == (5, five["accuracy"], 300)
