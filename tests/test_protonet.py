"""Prototypical Networks: the closed-form classifier, the learner's step and adapt, and real Omniglot learning."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_cli

from jaxmeta import Task, evaluate, protonet
from jaxmeta.algorithms.anil import DenseHead, anil_loss_fn
from jaxmeta.algorithms.protonet import prototype_head, prototypes
from jaxmeta.algorithms.registry import make_learner, spec
from jaxmeta.errors import ConfigError
from jaxmeta.models import Conv4, classification_loss


def test_prototype_head_logits_are_negative_squared_distances_up_to_a_per_example_constant():
    key_s, key_q = jax.random.split(jax.random.PRNGKey(0))
    support = jax.random.normal(key_s, (12, 7))
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 3])  # class 3 has one example, classes 0-2 several
    query = jax.random.normal(key_q, (9, 7))
    c = np.stack([np.asarray(support)[np.asarray(labels) == k].mean(0) for k in range(4)])
    np.testing.assert_allclose(prototypes(support, labels, 4), c, rtol=1e-6, atol=1e-6)

    head = prototype_head(support, labels, 4)
    logits = np.asarray(query @ head["kernel"] + head["bias"])
    distances = ((np.asarray(query)[:, None, :] - c[None]) ** 2).sum(-1)
    shift = logits + distances  # = ||f||², the same for every class
    np.testing.assert_allclose(shift, np.repeat((np.asarray(query) ** 2).sum(-1, keepdims=True), 4, 1), rtol=1e-5)
    np.testing.assert_allclose(jax.nn.softmax(logits), jax.nn.softmax(-distances), rtol=1e-5, atol=1e-6)


def _toy():
    """A linear embedding with a Dense head's layout: params, features_fn, loss and one batch of two tasks."""
    features = lambda body, x: jnp.tanh(x @ body["embed"])  # noqa: E731
    loss = anil_loss_fn(features, classification_loss(DenseHead("head")), head="head")  # the whole model's loss
    params = {"embed": jax.random.normal(jax.random.PRNGKey(1), (6, 4)),
              "head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
    kx, kq = jax.random.split(jax.random.PRNGKey(2))
    xs, xq = jax.random.normal(kx, (2, 6, 6)), jax.random.normal(kq, (2, 9, 6))
    ys, yq = jnp.tile(jnp.arange(3), (2, 2)), jnp.tile(jnp.arange(3), (2, 3))
    return features, loss, params, Task((xs, ys), (xq, yq))


def test_the_step_minimises_the_query_loss_of_distances_to_the_support_means():
    features, loss, params, tasks = _toy()
    learner = protonet(features, loss, outer=optax.sgd(0.5), has_aux=True)

    def by_hand(embed):
        total = 0.0
        for t in range(2):
            fs, fq = features({"embed": embed}, tasks.support[0][t]), features({"embed": embed}, tasks.query[0][t])
            c = jnp.stack([fs[tasks.support[1][t] == k].mean(0) for k in range(3)])
            logits = -((fq[:, None, :] - c[None]) ** 2).sum(-1)
            total += -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(9), tasks.query[1][t]])
        return total / 2

    state = learner.init(params)
    new_state, metrics = learner.step(state, tasks)
    expected_loss, expected_grad = jax.value_and_grad(by_hand)(params["embed"])
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(new_state.params["embed"], params["embed"] - 0.5 * expected_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_state.params["head"]["kernel"], 0.0)  # never trained: adapt replaces it
    assert {"loss", "query_loss_post", "query_accuracy_post", "grad_norm"} <= set(metrics)


def test_adapt_is_the_prototypes_for_every_step_count_and_evaluate_scores_them():
    features, loss, params, tasks = _toy()
    learner = protonet(features, loss, outer=optax.adam(1e-3), has_aux=True)
    support = jax.tree.map(lambda a: a[0], tasks.support)
    adapted = learner.adapt(params, support, steps=4)
    head = prototype_head(features(params, support[0]), support[1], 3)
    np.testing.assert_allclose(adapted["head"]["kernel"], head["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(adapted["embed"], params["embed"])
    result = evaluate(learner, params, tasks, steps=4, loss_fn=loss, has_aux=True)
    curve = np.asarray(result.mean["accuracy"])
    assert curve.shape == (5,) and np.all(curve == curve[0])
    # The same accuracy computed from distances by hand:
    fs, fq = features(params, tasks.support[0]), features(params, tasks.query[0])
    hand = []
    for t in range(2):
        c = jnp.stack([fs[t][tasks.support[1][t] == k].mean(0) for k in range(3)])
        hand.append(np.mean(np.argmin(((fq[t][:, None] - c[None]) ** 2).sum(-1), -1) == tasks.query[1][t]))
    np.testing.assert_allclose(curve[0], np.mean(hand), rtol=1e-6)


def test_the_registry_builds_it_on_conv4_as_its_spec_says():
    model = Conv4(ways=5, filters=8)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 10, 28, 28, 1))
    tasks = Task((x[:, :5], jnp.tile(jnp.arange(5), (2, 1))), (x[:, 5:], jnp.tile(jnp.arange(5), (2, 1))))

    def build(**changes):
        return make_learner("protonet", classification_loss(model), **{
            "inner_steps": 1, "inner_lr": 0.1, "outer_lr": 1e-3, "has_aux": True, "model": model,
            "make_loss": classification_loss, **changes})

    def step_program(**changes):
        learner = build(**changes)
        return str(jax.make_jaxpr(learner.step)(learner.init(params), tasks))

    learner = build()
    support = jax.tree.map(lambda a: a[0], tasks.support)
    adapted = learner.adapt(learner.init(params), support, steps=1)
    assert adapted["head"]["kernel"].shape == params["head"]["kernel"].shape
    assert spec("protonet").classification_only
    plain = step_program()
    assert (step_program(inner_steps=3) != plain) == spec("protonet").inner_loop == False  # noqa: E712
    assert (step_program(remat=True) != plain) == spec("protonet").remat == False  # noqa: E712
    with pytest.raises(ConfigError, match="an inner optimizer applies to"):
        build(inner_optimizer=optax.adam(0.1))


def test_protonet_learns_omniglot_far_above_chance_through_the_cli(tmp_path, omniglot_dir, jaxmeta_cache_dir,
                                                                   omniglot_characters):
    env = {"JAXMETA_OMNIGLOT_DIR": str(omniglot_dir), "JAXMETA_CACHE_DIR": str(jaxmeta_cache_dir)}
    out = tmp_path / "run"
    proc = run_cli("experiments.omniglot", "train", "--ways", "5", "--shots", "1", "--algo", "protonet",
                   "--preset", "quick", "--no-progress", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["tasks"] == 600
    assert evaluation["accuracy"] > 0.7, evaluation  # chance is 0.2; 0.82 measured after the 300 quick steps
    assert len(set(evaluation["accuracy_per_step"])) == 1  # no gradient steps: every step count scores the same
