"""Every learner owns its test-time adaptation (``learner.adapt``), and one ``evaluate`` scores any learner."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmeta import evaluate
from jaxmeta.algorithms.anil import flax_anil_fns
from jaxmeta.algorithms.mamlpp import mamlpp_params
from jaxmeta.algorithms.meta_sgd import meta_sgd_params
from jaxmeta.algorithms.registry import ALGORITHMS, make_learner, spec
from jaxmeta.data import sinusoid
from jaxmeta.errors import ConfigError
from jaxmeta.models import MLP, regression_loss

MODEL = MLP(features=(16, 16))
LOSS = regression_loss(MODEL)
HEAD = "Dense_2"
LR, LAM = 0.05, 2.0
REGRESSION = [algo for algo in ALGORITHMS if not spec(algo).classification_only]
"""The learners of a regression task (Prototypical Networks need classes: tests/test_protonet.py)."""


def learner_of(algo):
    return make_learner(algo, LOSS, inner_steps=2, inner_lr=LR, outer_lr=1e-3, meta_steps=10, imaml_lam=LAM,
                        anil_fns=flax_anil_fns(MODEL, regression_loss, head=HEAD) if algo == "anil" else None,
                        anil_head=HEAD)


def trained_state(algo, learner, params, tasks):
    """A state after two meta-steps, with any learned rates made uneven (so using them is visible)."""
    state = learner.init(params)
    for _ in range(2):
        state, _ = jax.jit(learner.step)(state, tasks)
    if algo in ("meta_sgd", "mamlpp"):
        rng = np.random.default_rng(0)
        lr = jax.tree.map(lambda r: r * jnp.asarray(rng.uniform(0.5, 1.5, size=np.shape(r))), state.params["lr"])
        state = state._replace(params={**state.params, "lr": lr})
    return state


def expected_adaptation(algo, state, support, steps):
    """Each algorithm's test-time rule, written out by hand: plain SGD steps on the support loss."""
    if algo == "meta_sgd":
        params, lr = meta_sgd_params(state)
        rates = [lr] * steps
    elif algo == "mamlpp":
        params, lr = mamlpp_params(state)
        rates = [jax.tree.map(lambda r, t=t: r[min(t, r.shape[0] - 1)], lr) for t in range(steps)]  # last beyond
    else:
        params = state
        rate = jax.tree.map(lambda p: jnp.full(p.shape, LR), params)
        if algo == "anil":  # the head alone
            rate = {k: v if k == HEAD else jax.tree.map(jnp.zeros_like, v) for k, v in rate.items()}
        rates = [rate] * steps
    theta, phi = params, params
    for rate in rates:
        def objective(p):
            prox = 0.5 * LAM * sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(theta)))
            return LOSS(p, support) + (prox if algo == "imaml" else 0.0)

        phi = jax.tree.map(lambda p, g, r: p - r * g, phi, jax.grad(objective)(phi), rate)
    return phi


@pytest.mark.parametrize("algo", REGRESSION)
def test_each_learner_adapts_with_its_own_rule_and_evaluate_scores_that(algo):
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), batch_size=4, shots=5, queries=10)
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]
    learner = learner_of(algo)
    state = trained_state(algo, learner, params, tasks)
    task0 = jax.tree.map(lambda a: a[0], tasks)
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
    adapted = {}
    for steps in (0, 1, 3):  # 3: more steps than in training
        adapted[steps] = jax.jit(lambda s, b, n=steps: learner.adapt(s, b, steps=n))(state, task0.support)
        want = expected_adaptation(algo, state.params, task0.support, steps)
        np.testing.assert_allclose(flat(adapted[steps]), flat(want), rtol=2e-4, atol=1e-6)
    assert np.abs(flat(adapted[3]) - flat(adapted[0])).max() > 1e-4  # it does adapt

    result = evaluate(learner, state, tasks, steps=3, loss_fn=LOSS, chunk_size=None)
    assert result.per_task["loss"].shape == (4, 4)
    for steps, phi in adapted.items():
        np.testing.assert_allclose(result.per_task["loss"][0, steps], LOSS(phi, task0.query), rtol=1e-4)
    _, observed = learner.adapt(state, task0.support, steps=3, observe=lambda p: LOSS(p, task0.query))
    np.testing.assert_allclose(observed, result.per_task["loss"][0], rtol=1e-5)


def test_evaluate_needs_exactly_one_scorer():
    learner = learner_of("maml")
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), batch_size=2, shots=5, queries=5)
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(learner, params, tasks, steps=1)


@pytest.mark.parametrize("algo", REGRESSION)
def test_each_algorithm_s_spec_is_what_its_learner_does(algo):
    """The registry's answers, which the pipelines ask instead of testing names, are the learners' behaviour."""
    tasks = sinusoid.sample_tasks(jax.random.PRNGKey(1), batch_size=2, shots=5, queries=5)
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]

    def step_program(**changes):
        learner = make_learner(algo, LOSS, **{"inner_steps": 2, "inner_lr": LR, "outer_lr": 1e-3, "meta_steps": 10,
                                              "model": MODEL, "make_loss": regression_loss, "anil_head": HEAD,
                                              **changes})
        return str(jax.make_jaxpr(learner.step)(learner.init(params), tasks))

    plain = step_program()
    assert (step_program(inner_steps=3) != plain) == spec(algo).inner_loop  # pre-training trains without one
    assert (step_program(remat=True) != plain) == spec(algo).remat
    if spec(algo).inner_optimizer:
        assert step_program(inner_optimizer=optax.adam(LR, eps_root=1e-8)) != plain
    else:
        with pytest.raises(ConfigError, match="an inner optimizer applies to"):
            step_program(inner_optimizer=optax.adam(LR))
    with pytest.raises(ConfigError, match="unknown algorithm"):
        spec(algo.upper())
