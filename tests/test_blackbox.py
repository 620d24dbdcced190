"""The in-context (black-box) learner: what its attention may see, the learner's step and adapt, real learning."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_cli

from jaxmeta import Task, evaluate
from jaxmeta.algorithms.blackbox import InContextModel, InContextTransformer, condition, in_context_model
from jaxmeta.algorithms.registry import learner_model, make_learner, spec
from jaxmeta.models import Conv4, classification_loss


class Flat(nn.Module):
    """An embedding without batch norm, so one query cannot reach another through batch statistics."""

    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.dim)(x.reshape(x.shape[0], -1))


def _episode(key, ways=5, shots=2, queries=6, size=16):
    kx, kq = jax.random.split(key)
    xs = jax.random.normal(kx, (ways * shots, size, size, 1))
    ys = jnp.tile(jnp.arange(ways), shots)
    xq = jax.random.normal(kq, (queries, size, size, 1))
    return xs, ys, xq


def test_predictions_do_not_depend_on_the_order_of_the_support_examples():
    model = in_context_model(Conv4(ways=5, filters=8), dim=16, heads=2)
    xs, ys, xq = _episode(jax.random.PRNGKey(0))
    params = model.init(jax.random.PRNGKey(1), xs)["params"]
    logits = model.apply({"params": condition(params, (xs, ys))}, xq)
    perm = np.random.default_rng(0).permutation(len(ys))
    shuffled = model.apply({"params": condition(params, (xs[perm], ys[perm]))}, xq)
    np.testing.assert_allclose(shuffled, logits, rtol=1e-4, atol=1e-5)
    relabelled = model.apply({"params": condition(params, (xs, (ys + 1) % 5))}, xq)
    assert np.abs(np.asarray(relabelled - logits)).max() > 1e-3  # the labels are read: not trivially invariant


def test_a_query_attends_to_the_support_set_and_itself_only():
    model = InContextModel(InContextTransformer(embed=Flat(16), ways=5, dim=16, heads=2))
    xs, ys, xq = _episode(jax.random.PRNGKey(2))
    params = model.init(jax.random.PRNGKey(3), xs)["params"]
    logits = model.apply({"params": condition(params, (xs, ys))}, xq)
    others = xq.at[1:].set(jax.random.normal(jax.random.PRNGKey(4), xq[1:].shape))
    np.testing.assert_allclose(model.apply({"params": condition(params, (xs, ys))}, others)[0], logits[0],
                               rtol=1e-5, atol=1e-6)
    alone = model.apply({"params": condition(params, (xs, ys))}, xq[:1])
    np.testing.assert_allclose(alone[0], logits[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="support set"):
        model.apply({"params": params}, xq)


def test_the_step_minimises_the_query_loss_given_the_support_set_and_adapt_conditions():
    model = learner_model("blackbox", Conv4(ways=5, filters=8))
    loss = classification_loss(model)
    learner = make_learner("blackbox", loss, inner_steps=1, inner_lr=0.1, outer_lr=1e-3, has_aux=True)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    episodes = [_episode(k) for k in keys]
    tasks = Task((jnp.stack([e[0] for e in episodes]), jnp.stack([e[1] for e in episodes])),
                 (jnp.stack([e[2] for e in episodes]), jnp.stack([e[1][:6] for e in episodes])))
    params = model.init(jax.random.PRNGKey(6), tasks.support[0][0])["params"]

    def by_hand(p):
        return jnp.mean(jnp.stack([loss(condition(p, (tasks.support[0][t], tasks.support[1][t])),
                                        (tasks.query[0][t], tasks.query[1][t]))[0] for t in range(3)]))

    value, grads = jax.value_and_grad(by_hand)(params)
    _, metrics = learner.step(learner.init(params), tasks)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
    result = evaluate(learner, params, tasks, steps=2, loss_fn=loss, has_aux=True)
    assert np.all(np.asarray(result.per_task["loss"]) == np.asarray(result.per_task["loss"])[:, :1])
    np.testing.assert_allclose(result.mean["loss"][0], value, rtol=1e-5)
    assert not spec("blackbox").inner_loop and spec("blackbox").classification_only


def test_blackbox_learns_omniglot_and_follows_a_relabelling_of_the_support_set(tmp_path, omniglot_dir,
                                                                                jaxmeta_cache_dir, omniglot_characters):
    """Labels carry no class identity (the sampler labels freshly drawn classes), so after training the
    predictions follow a permutation of the support labels although the network is not built to."""
    from experiments.fewshot import pipeline as fewshot

    env = {"JAXMETA_OMNIGLOT_DIR": str(omniglot_dir), "JAXMETA_CACHE_DIR": str(jaxmeta_cache_dir)}
    out = tmp_path / "run"
    proc = run_cli("experiments.omniglot", "train", "--ways", "5", "--shots", "1", "--algo", "blackbox",
                   "--preset", "quick", "--meta-steps", "600", "--no-progress", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["accuracy"] > 0.5, evaluation  # chance is 0.2

    config = dataclasses.replace(fewshot.read_config(str(out)), test_tasks=50)
    model, _, _ = fewshot.build(config)
    _, _, test_images = fewshot.load_data(config)
    _, params = fewshot.load_params(str(out), config, model, test_images.shape[2:])
    tasks = fewshot.fixed_tasks(config, test_images, num_tasks=50, seed=fewshot.TEST_SEED)
    perm = jnp.array([3, 0, 4, 1, 2])  # label k becomes perm[k]

    def predict(support, query_x):
        return jnp.argmax(model.apply({"params": condition(params, support)}, query_x), -1)

    before = jax.vmap(predict)(tasks.support, tasks.query[0])
    after = jax.vmap(predict)((tasks.support[0], perm[tasks.support[1]]), tasks.query[0])
    agreement = float(jnp.mean(after == perm[before]))
    assert agreement > 0.8, agreement
