"""Meta-SGD, ANIL, MAML++ and iMAML proved with numbers: finite differences and closed forms."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmeta import Task, evaluate, inner_adapt, maml, maml_loss
from jaxmeta.algorithms.anil import (
    anil,
    anil_loss_fn,
    anil_objective,
    flax_anil_fns,
    head_only_lr,
    head_split,
)
from jaxmeta.algorithms.imaml import conjugate_gradient, imaml, imaml_gradient, proximal_adapt
from jaxmeta.algorithms.mamlpp import (
    final_step_weights,
    is_batch_norm,
    mamlpp,
    mamlpp_objective,
    mamlpp_params,
    msl_weights,
    per_step_init,
    per_step_lr,
    per_step_view,
    rates_for_steps,
)
from jaxmeta.algorithms.meta_sgd import meta_sgd, meta_sgd_objective, meta_sgd_params
from jaxmeta.algorithms.registry import make_learner
from jaxmeta.errors import ConfigError
from jaxmeta.models import BatchNorm, Conv4, classification_loss


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Finite differences need float64; restored afterwards for the other modules."""
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


# A plain-pytree tanh MLP as a dict, so its last layer can be named ("head").  Data and
# parameters come from NumPy's generator: eager jax.random would compile a kernel per shape.
def init_mlp(seed, sizes=(1, 5, 5, 1)):
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(len(sizes) - 2)] + ["head"]
    return {name: {"kernel": jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)),
                   "bias": jnp.asarray(0.1 * rng.normal(size=n_out))}
            for name, n_in, n_out in zip(names, sizes[:-1], sizes[1:])}


def mlp_features(body, x):
    for name in sorted(body):
        x = jnp.tanh(x @ body[name]["kernel"] + body[name]["bias"])
    return x


def mlp_head_loss(head, batch):
    f, y = batch
    return jnp.mean((f @ head["head"]["kernel"] + head["head"]["bias"] - y) ** 2)


mlp_loss = anil_loss_fn(mlp_features, mlp_head_loss, head="head")


def sine_tasks(seed, n_tasks=3, shots=5):
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.5, 2.0, (n_tasks, 1, 1))
    phase = rng.uniform(0, np.pi, (n_tasks, 1, 1))
    x = rng.uniform(-3, 3, (n_tasks, 2 * shots, 1))
    y = amp * np.sin(x + phase)
    return jax.tree.map(jnp.asarray, Task((x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:])))


def finite_difference_grad(f, params, eps=1e-6):
    """Central differences, all 2n evaluations in one jitted vmap."""
    flat_params, unravel = jax.flatten_util.ravel_pytree(params)
    e = eps * np.eye(flat_params.size)
    values = jax.jit(jax.vmap(lambda v: f(unravel(v))))(jnp.concatenate([flat_params + e, flat_params - e]))
    values = np.asarray(values)
    return (values[: flat_params.size] - values[flat_params.size :]) / (2 * eps)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


# ----------------------------------------------------------------------------- Meta-SGD


def test_meta_sgd_gradient_in_params_and_rates_matches_finite_differences():
    params = init_mlp(0)
    tasks = sine_tasks(1)
    learner = meta_sgd(mlp_loss, inner_steps=2, init_lr=0.1, outer=optax.sgd(0.5))
    state = learner.init(params)  # takes the plain params
    theta, lr = meta_sgd_params(state)
    assert jax.tree.structure(lr) == jax.tree.structure(params)
    assert all(np.all(np.asarray(r) == 0.1) for r in jax.tree.leaves(lr))

    def f(m):
        return meta_sgd_objective(mlp_loss, m, tasks, steps=2)[0]

    grad = jax.jit(jax.grad(f))
    # Distinct rates per entry, so the test sees each one's own gradient.
    meta = {"params": theta,
            "lr": jax.tree.map(lambda r: r * (1 + np.random.default_rng(2).uniform(size=r.shape)), lr)}
    exact = grad(meta)
    np.testing.assert_allclose(flat(exact), finite_difference_grad(f, meta), rtol=1e-5, atol=1e-8)
    assert np.abs(flat(exact["lr"])).max() > 1e-3  # the rates really get a gradient

    # One meta-step with SGD moves θ and α by exactly that gradient.
    new, metrics = jax.jit(learner.step)(state._replace(params=meta), tasks)
    new_params, new_lr = meta_sgd_params(new)
    np.testing.assert_allclose(flat(new_lr), flat(meta["lr"]) - 0.5 * flat(exact["lr"]), rtol=1e-12)
    np.testing.assert_allclose(flat(new_params), flat(params) - 0.5 * flat(exact["params"]), rtol=1e-12)
    assert np.abs(flat(new_lr) - flat(meta["lr"])).max() > 1e-4
    assert set(metrics) >= {"loss", "query_loss_pre", "query_loss_post", "grad_norm", "lr_mean"}
    # The learner adapts with its learned rates, and evaluation scores what the objective scored.
    result = evaluate(learner, meta, tasks, steps=2, loss_fn=mlp_loss, chunk_size=None)
    np.testing.assert_allclose(np.asarray(result.mean["loss"])[[0, 2]], [metrics["query_loss_pre"], metrics["loss"]],
                               rtol=1e-12)


# ----------------------------------------------------------------------------- ANIL


def test_anil_meta_gradient_matches_finite_differences_and_maml_with_a_frozen_body():
    params = init_mlp(5)
    tasks = sine_tasks(6)

    def f(p):
        return anil_objective(mlp_features, mlp_head_loss, p, tasks, head="head", steps=3, lr=0.05)[0]

    value, exact = jax.jit(jax.value_and_grad(f))(params)
    np.testing.assert_allclose(flat(exact), finite_difference_grad(f, params), rtol=1e-5, atol=1e-8)
    assert np.abs(flat(exact["l0"])).max() > 1e-3  # the body is meta-learned through the features

    # ANIL = MAML on the whole network with a zero inner learning rate on the body.
    lr = head_only_lr(params, 0.05, head="head")
    assert np.all(flat(lr["l0"]) == 0) and np.all(flat(lr["head"]) == 0.05)
    maml_grad = jax.jit(jax.value_and_grad(lambda p, r: maml_loss(mlp_loss, p, tasks, steps=3, lr=r)))
    maml_value, frozen = maml_grad(params, lr)
    np.testing.assert_allclose(value, maml_value, rtol=1e-12)
    np.testing.assert_allclose(flat(exact), flat(frozen), rtol=1e-10, atol=1e-13)
    # ... and not MAML with the body adapted too.
    full = maml_grad(params, jax.tree.map(lambda r: jnp.full_like(r, 0.05), lr))[1]
    assert np.abs(flat(full) - flat(exact)).max() > 1e-3

    # A key-path predicate names the same head (the parts keep the params' structure, None elsewhere).
    is_head = lambda path, leaf: path[0].key == "head"
    split, merge = head_split(is_head)
    body, head = split(params)
    assert body["head"]["kernel"] is None and head["l0"]["kernel"] is None
    assert jax.tree.structure(merge(body, head)) == jax.tree.structure(params)
    body_features = lambda b, x: mlp_features({k: v for k, v in b.items() if k != "head"}, x)
    by_predicate = jax.jit(lambda p: anil_objective(body_features, mlp_head_loss, p, tasks, head=is_head, steps=3,
                                                    lr=0.05)[0])(params)
    np.testing.assert_allclose(by_predicate, value, rtol=1e-12)

    # The learner applies exactly that gradient.
    learner = anil(mlp_features, mlp_head_loss, head="head", inner_steps=3, inner_lr=0.05, outer=optax.sgd(0.5))
    state, metrics = jax.jit(learner.step)(learner.init(params), tasks)
    np.testing.assert_allclose(flat(state.params), flat(params) - 0.5 * flat(exact), rtol=1e-12)
    assert set(metrics) >= {"loss", "query_loss_pre", "query_loss_post", "grad_norm"}
    assert metrics["query_loss_post"] < metrics["query_loss_pre"]
    with pytest.raises(KeyError, match="Dense_9"):
        anil(mlp_features, mlp_head_loss, head="Dense_9", inner_steps=1, inner_lr=0.1,
             outer=optax.sgd(0.1)).init(params)


def test_anil_on_a_flax_conv4():
    model = Conv4(ways=3, filters=4, stride=2)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 12, 8, 8, 1)))
    y = jnp.tile(jnp.arange(3), (2, 4))
    tasks = Task((x[:, :6], y[:, :6]), (x[:, 6:], y[:, 6:]))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(8), x[0])["params"]  # no compile needed
    rng = np.random.default_rng(8)
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape) + 0.5), shapes)
    loss_fn = classification_loss(model)
    features_fn, head_loss_fn = flax_anil_fns(model, classification_loss, head="head")

    @jax.jit
    def check(p):
        whole = loss_fn(p, (x[0], y[0]))
        split = anil_loss_fn(features_fn, head_loss_fn, head="head")(p, (x[0], y[0]))
        features = features_fn({k: v for k, v in p.items() if k != "head"}, x[0])
        grads = jax.grad(lambda q: anil_objective(features_fn, head_loss_fn, q, tasks, steps=1, lr=0.3,
                                                  has_aux=True)[0])(p)
        return whole, split, features, grads

    whole, split, features, grads = check(params)
    assert features.shape == (12, 4)  # the body stops before the head: pooled conv features
    # The split model computes the same loss and accuracy as the whole one.
    np.testing.assert_allclose(split[0], whole[0], rtol=1e-6)
    np.testing.assert_allclose(split[1]["accuracy"], whole[1]["accuracy"])
    # The meta-gradient reaches every parameter, the body's through the features.
    assert all(np.abs(flat(grads[k])).max() > 0 for k in params)


# ----------------------------------------------------------------------------- MAML++


def test_msl_weights_follow_the_reference_schedule():
    np.testing.assert_allclose(msl_weights(0, steps=4, anneal_steps=10), [0.25] * 4, rtol=1e-6)
    w = msl_weights(4, steps=4, anneal_steps=10)  # non-final 1/4 − 4/40, final 1/4 + 4·3/40
    np.testing.assert_allclose(w, [0.15, 0.15, 0.15, 0.55], rtol=1e-6)
    w = msl_weights(9.9, steps=4, anneal_steps=10)  # floored at 0.03/4
    np.testing.assert_allclose(w, [0.0075] * 3 + [1 - 3 * 0.0075], rtol=1e-5)
    np.testing.assert_allclose(msl_weights(10, steps=4, anneal_steps=10), [0, 0, 0, 1])
    np.testing.assert_allclose(msl_weights(3, steps=1, anneal_steps=10), [1])


def test_mamlpp_final_step_loss_is_maml_and_learned_rates_match_finite_differences():
    params = init_mlp(9)
    tasks = sine_tasks(10)

    def f(both, weights):
        return mamlpp_objective(mlp_loss, both[0], both[1], tasks, weights=weights)[0]

    value_and_grad = jax.jit(jax.value_and_grad(f))
    lrs = per_step_lr(params, 0.1, 3)
    value, grad = value_and_grad((params, lrs), final_step_weights(3))
    want_value, want_grad = jax.jit(jax.value_and_grad(lambda p: maml_loss(mlp_loss, p, tasks, steps=3, lr=0.1)))(
        params)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(flat(grad[0]), flat(want_grad), rtol=1e-10, atol=1e-14)

    # Per-layer per-step rates and an intermediate multi-step loss, against finite differences.
    lrs = jax.tree.map(lambda r: r * jnp.array([1.0, 0.5, 1.5]), lrs)
    weights = msl_weights(3, steps=3, anneal_steps=10)
    exact = value_and_grad((params, lrs), weights)[1]
    numeric = finite_difference_grad(lambda both: f(both, weights), (params, lrs))
    np.testing.assert_allclose(flat(exact), numeric, rtol=1e-5, atol=1e-8)
    assert np.abs(flat(exact[1])).max() > 1e-3


def test_mamlpp_learner_switches_msl_and_derivative_order_in_one_compiled_step():
    params = init_mlp(11)
    tasks = sine_tasks(12)
    eta = 0.5
    learner = mamlpp(mlp_loss, inner_steps=2, inner_lr=0.1, outer=optax.sgd(eta), msl_anneal_steps=2,
                     learn_inner_lr=False, derivative_order_anneal_steps=1)
    step = jax.jit(learner.step)
    state = learner.init(params)

    def applied(new):  # the gradient the outer SGD applied
        return (flat(params) - flat(mamlpp_params(new)[0])) / eta

    # The references: MAML losses after 1 and 2 steps, first-order and exact gradients.
    @jax.jit
    def reference(p):
        out = {}
        for s in (1, 2):
            for first_order in (True, False):
                loss = functools.partial(maml_loss, mlp_loss, tasks=tasks, steps=s, lr=0.1, first_order=first_order)
                out[s, first_order] = jax.value_and_grad(loss)(p)
        return out

    ref = {k: (v, flat(g)) for k, (v, g) in reference(params).items()}
    assert np.abs(ref[2, True][1] - ref[2, False][1]).max() > 1e-3  # the test can tell them apart

    # Meta-step 0: first order, multi-step loss with uniform weights (not MAML's objective).
    new, metrics = step(state, tasks)
    np.testing.assert_allclose(metrics["loss"], 0.5 * (ref[1, True][0] + ref[2, True][0]), rtol=1e-12)
    np.testing.assert_allclose(applied(new), 0.5 * (ref[1, True][1] + ref[2, True][1]), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(flat(mamlpp_params(new)[1]), flat(mamlpp_params(state)[1]))  # frozen rates

    # Meta-step 1 (< msl_anneal_steps): exact second order now, annealed weights.
    new, _ = step(state._replace(step=jnp.asarray(1, jnp.int32)), tasks)
    w = np.asarray(msl_weights(1, steps=2, anneal_steps=2))
    np.testing.assert_allclose(applied(new), w[0] * ref[1, False][1] + w[1] * ref[2, False][1], rtol=1e-10,
                               atol=1e-14)

    # Meta-step 2: all weight on the final step, exact: a MAML step.
    new, metrics = step(state._replace(step=jnp.asarray(2, jnp.int32)), tasks)
    np.testing.assert_allclose(applied(new), ref[2, False][1], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(metrics["loss"], ref[2, False][0], rtol=1e-12)
    np.testing.assert_allclose(metrics["query_loss_post"], ref[2, False][0], rtol=1e-12)
    assert set(metrics) >= {"loss", "query_loss_pre", "query_loss_post", "grad_norm"}
    assert step._cache_size() == 1  # one compiled program served all three


def test_mamlpp_learned_rates_cosine_outer_and_per_step_evaluation():
    params = init_mlp(13)
    tasks = sine_tasks(14)
    kwargs = {"inner_steps": 2, "inner_lr": 0.1, "outer": optax.sgd(0.5)}
    learner = mamlpp(mlp_loss, cosine_outer=True, total_steps=2, **kwargs)
    step = jax.jit(learner.step)
    s0 = learner.init(params)
    s1, m1 = step(s0, tasks)
    s2, m2 = step(s1, tasks)
    assert np.abs(flat(mamlpp_params(s1)[1]) - flat(mamlpp_params(s0)[1])).min() > 0  # every rate moved
    # SGD scaled by the cosine factor ½(1 + cos(πt/2)): 1 at the first update, ½ at the second.
    np.testing.assert_allclose(np.linalg.norm(flat(s1.params) - flat(s0.params)), 0.5 * m1["grad_norm"], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(flat(s2.params) - flat(s1.params)), 0.25 * m2["grad_norm"], rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        mamlpp(mlp_loss, cosine_outer=True, **kwargs)

    # Adapting with per-step rates equals MAML's SGD when the rates are equal ...
    got = evaluate(learner, s0, tasks, steps=2, loss_fn=mlp_loss, chunk_size=2)
    want = evaluate(maml(mlp_loss, inner_steps=2, inner_lr=0.1, outer=optax.sgd(0.0)), params, tasks, steps=2,
                    loss_fn=mlp_loss, chunk_size=2)
    np.testing.assert_allclose(got.per_task["loss"], want.per_task["loss"], rtol=1e-12)
    np.testing.assert_allclose(got.ci95["loss"], want.ci95["loss"], rtol=1e-10)
    # ... and uses each step's own rate when they differ.
    lrs = {"params": params, "lr": jax.tree.map(lambda r: r * jnp.array([1.0, 0.0]), mamlpp_params(s0)[1])}
    got = evaluate(learner, lrs, tasks, steps=2, loss_fn=mlp_loss, chunk_size=2)
    np.testing.assert_allclose(got.per_task["loss"][:, 2], want.per_task["loss"][:, 1], rtol=1e-12)


def bn_mlp_loss(params, batch):
    """A 1-5-1 tanh MLP with jaxmeta's (transductive) batch norm after the hidden layer."""
    x, y = batch
    h = BatchNorm().apply({"params": params["bn_0"]}, x @ params["l0"]["kernel"] + params["l0"]["bias"])
    return jnp.mean((jnp.tanh(h) @ params["head"]["kernel"] + params["head"]["bias"] - y) ** 2)


def init_bn_mlp(seed):
    params = init_mlp(seed, sizes=(1, 5, 1))
    rng = np.random.default_rng(seed + 100)
    return {**params, "bn_0": {"scale": jnp.asarray(1 + 0.2 * rng.normal(size=5)),
                               "bias": jnp.asarray(0.1 * rng.normal(size=5))}}


def test_mamlpp_per_step_batch_norm_gradient_matches_finite_differences():
    params = init_bn_mlp(19)
    tasks = sine_tasks(20)
    steps = 2
    per_step = per_step_init(params, steps)
    assert per_step["bn_0"]["scale"].shape == (steps + 1, 5) and per_step["l0"]["kernel"].shape == (1, 5)
    shared, _ = per_step_view(per_step)
    assert shared["bn_0"]["scale"] is None and shared["head"]["bias"] is not None
    lrs = per_step_lr(shared, 0.1, steps)  # no rates for the per-step rows: the inner loop leaves them alone
    assert lrs["bn_0"]["scale"] is None

    def f(meta, weights, **kwargs):
        return mamlpp_objective(bn_mlp_loss, meta["params"], meta["lr"], tasks, weights=weights,
                                per_step=is_batch_norm, **kwargs)[0]

    # Tied rows are the shared model with batch norm frozen in the inner loop; the rows' gradients
    # sum to the shared batch-norm gradient (chain rule through the tie).
    weights = msl_weights(3, steps=steps, anneal_steps=10)
    frozen = per_step_lr(params, 0.1, steps)
    frozen["bn_0"] = jax.tree.map(jnp.zeros_like, frozen["bn_0"])
    tied_value, tied = jax.jit(jax.value_and_grad(functools.partial(f, weights=weights)))(
        {"params": per_step, "lr": lrs})
    want_value, want = jax.jit(jax.value_and_grad(
        lambda p: mamlpp_objective(bn_mlp_loss, p, frozen, tasks, weights=weights)[0]))(params)
    np.testing.assert_allclose(tied_value, want_value, rtol=1e-12)
    np.testing.assert_allclose(flat(jax.tree.map(lambda g: g.sum(0), tied["params"]["bn_0"])), flat(want["bn_0"]),
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(flat(tied["params"]["l0"]), flat(want["l0"]), rtol=1e-10, atol=1e-14)

    # Distinct rows and rates, an intermediate multi-step loss: every derivative against finite differences.
    rng = np.random.default_rng(21)
    meta = {"params": jax.tree.map(lambda a: a * (1 + 0.3 * rng.uniform(size=a.shape)), per_step),
            "lr": jax.tree.map(lambda r: r * jnp.array([1.0, 0.5]), lrs)}
    exact = jax.jit(jax.grad(functools.partial(f, weights=weights)))(meta)
    numeric = finite_difference_grad(functools.partial(f, weights=weights), meta)
    np.testing.assert_allclose(flat(exact), numeric, rtol=1e-5, atol=1e-8)
    assert np.abs(flat(exact["params"]["bn_0"])).min() > 1e-6  # every row of every BN leaf is used

    with pytest.raises(ValueError, match="per-step"):
        per_step_init(init_mlp(22), steps)  # no batch norm to give per-step rows


def test_mamlpp_per_step_batch_norm_rows_get_gradient_only_where_used_on_conv4():
    model = Conv4(ways=3, filters=4, stride=2)
    loss_fn = classification_loss(model)
    rng = np.random.default_rng(23)
    x = jnp.asarray(rng.normal(size=(2, 12, 8, 8, 1)))
    y = jnp.tile(jnp.arange(3), (2, 4))
    tasks = Task((x[:, :6], y[:, :6]), (x[:, 6:], y[:, 6:]))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[0])["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape) + 0.5), shapes)
    learner = mamlpp(loss_fn, inner_steps=2, inner_lr=0.3, outer=optax.sgd(1.0), multi_step_loss=False,
                     learn_inner_lr=False, derivative_order_anneal_steps=1, per_step_bn=True, has_aux=True)
    state = learner.init(params)
    meta, lrs = mamlpp_params(state)
    assert meta["bn_2"]["scale"].shape == (3, 4) and meta["conv_2"]["kernel"].shape == (3, 3, 4, 4)
    assert lrs["bn_2"]["scale"] is None and lrs["conv_2"]["kernel"].shape == (2,)

    @jax.jit
    def bn_grads(meta):
        def grad(weights, first_order):
            g = jax.grad(lambda p: mamlpp_objective(loss_fn, p, lrs, tasks, weights=weights, first_order=first_order,
                                                    has_aux=True, per_step=is_batch_norm)[0])(meta)
            # |gradient| of each row, summed over all batch-norm leaves: [steps + 1].
            return sum(jnp.abs(v).sum(axis=1) for k, v in jax.tree_util.tree_leaves_with_path(g)
                       if is_batch_norm(k, v))
        return grad(final_step_weights(2), True), grad(jnp.array([0.5, 0.5]), True), grad(final_step_weights(2), False)

    final_fo, msl_fo, final_exact = (np.asarray(g) for g in bn_grads(meta))
    # First order, final-step loss: only row 2 (the adapted network's) is on the differentiated path.
    assert final_fo[2] > 1e-6 and final_fo[0] == 0 and final_fo[1] == 0
    # First order, multi-step loss: the query losses after steps 1 and 2 use rows 1 and 2; row 0 (the
    # unadapted network) only enters through the support gradient, which first order stops.
    assert msl_fo[1] > 1e-6 and msl_fo[2] > 1e-6 and msl_fo[0] == 0
    # Exact second order: rows 0 and 1 shape the support gradients of steps 1 and 2, so all rows learn.
    assert np.all(final_exact > 1e-6)

    # The learner's first (first-order, final-step) SGD update moves row 2 only.
    new, metrics = jax.jit(learner.step)(state, tasks)
    new_meta = mamlpp_params(new)[0]
    for name in ("bn_0", "bn_3"):
        moved = np.abs(np.asarray(new_meta[name]["scale"] - meta[name]["scale"])).sum(axis=1)
        assert moved[0] == 0 and moved[1] == 0 and moved[2] > 0
    # Per-step evaluation sees the same rows: the losses before and after 2 steps are the step's metrics.
    result = evaluate(learner, state, tasks, steps=2, loss_fn=loss_fn, has_aux=True, chunk_size=None)
    np.testing.assert_allclose(np.asarray(result.mean["loss"])[[0, 2]], [metrics["query_loss_pre"], metrics["query_loss_post"]],
                               rtol=1e-10)
    # It goes on past the trained steps with the last rate and row.
    longer = evaluate(learner, state, tasks, steps=4, loss_fn=loss_fn, has_aux=True, chunk_size=None)
    np.testing.assert_allclose(np.asarray(longer.per_task["loss"])[:, :3], result.per_task["loss"], rtol=1e-10)
    task0 = jax.tree.map(lambda t: t[0], tasks)
    for steps in (1, 2, 4):
        adapted = learner.adapt(state, task0.support, steps=steps)
        assert adapted["bn_0"]["scale"].shape == (4,)  # ordinary parameters: the row of that step
        np.testing.assert_allclose(loss_fn(adapted, task0.query)[0], longer.per_task["loss"][0, steps], rtol=1e-10)
    # Beyond the trained steps: one more step at step 2's rate, seen through row 2 (the last).
    params2 = learner.adapt(state, task0.support, steps=2)
    grad = jax.grad(lambda p: loss_fn(p, task0.support)[0])(params2)
    step3 = jax.tree.map(lambda p, g: p - 0.3 * g, params2, grad)
    step3 = {**step3, **{k: params2[k] for k in params2 if k.startswith("bn")}}  # rows are not adapted
    np.testing.assert_allclose(loss_fn(step3, task0.query)[0], longer.per_task["loss"][0, 3], rtol=1e-8)


def test_mamlpp_rates_for_steps_truncate_and_repeat_the_last():
    lrs = {"a": jnp.array([0.1, 0.2]), "b": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "bn": None}
    longer = rates_for_steps(lrs, 4)
    np.testing.assert_allclose(longer["a"], [0.1, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(longer["b"], [[1, 2], [3, 4], [3, 4], [3, 4]])
    assert longer["bn"] is None
    np.testing.assert_allclose(rates_for_steps(lrs, 1)["a"], [0.1])
    assert rates_for_steps(lrs, 0)["b"].shape == (0, 2)


# ----------------------------------------------------------------------------- iMAML


def quadratic(phi, batch):
    """½ (φ − c)ᵀ M (φ − c) with the centre c and the matrix M carried by the batch."""
    c, m = batch
    d = phi - c
    return 0.5 * d @ m @ d


def spd(rng, n, low, high):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q @ np.diag(np.linspace(low, high, n)) @ q.T


def test_imaml_implicit_gradient_matches_the_closed_form():
    n, lam, tasks_n = 4, 2.0, 2
    rng = np.random.default_rng(15)
    a = np.stack([spd(rng, n, 1.0, 3.0) for _ in range(tasks_n)])
    b = np.stack([spd(rng, n, 0.5, 2.0) for _ in range(tasks_n)])
    c_s = rng.normal(size=(tasks_n, n))
    c_q = c_s + 0.3 * rng.normal(size=(tasks_n, n))  # related tasks: adapting helps
    theta = np.array([0.5, -1.0, 2.0, 0.0])
    tasks = jax.tree.map(jnp.asarray, Task((c_s, a), (c_q, b)))
    lr = 0.25  # the regularised Hessian has eigenvalues in [3, 5]: contraction ≤ 1/4 per step

    eye = np.eye(n)
    phi_star = np.stack([np.linalg.solve(a[i] + lam * eye, a[i] @ c_s[i] + lam * theta) for i in range(tasks_n)])
    want = np.mean([np.linalg.solve(eye + a[i] / lam, b[i] @ (phi_star[i] - c_q[i])) for i in range(tasks_n)], axis=0)

    phi = jax.jit(jax.vmap(lambda s: proximal_adapt(quadratic, theta, s, steps=40, lr=lr, lam=lam)))(tasks.support)
    np.testing.assert_allclose(phi, phi_star, rtol=1e-10, atol=1e-12)

    @functools.partial(jax.jit, static_argnames="cg_steps")
    def implicit(cg_steps):
        return imaml_gradient(quadratic, theta, tasks, steps=40, lr=lr, lam=lam, cg_steps=cg_steps)

    grad, loss, metrics = implicit(n)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loss, np.mean([0.5 * (phi_star[i] - c_q[i]) @ b[i] @ (phi_star[i] - c_q[i])
                                               for i in range(tasks_n)]), rtol=1e-10)
    # Extra CG iterations after convergence are harmless; too few are measurably off.
    np.testing.assert_allclose(implicit(3 * n)[0], want, rtol=1e-6, atol=1e-9)
    assert np.abs(implicit(1)[0] - want).max() > 1e-4

    # Damping δ solves (I + A/(λ + δ)) g = ∇L_query(φ*) at the same φ*; a large δ tends to the first-order gradient.
    for delta in (3.0, 1e6):
        damped = np.mean([np.linalg.solve(eye + a[i] / (lam + delta), b[i] @ (phi_star[i] - c_q[i]))
                          for i in range(tasks_n)], axis=0)
        got = jax.jit(lambda d: imaml_gradient(quadratic, theta, tasks, steps=40, lr=lr, lam=lam, cg_steps=n,
                                               cg_damping=d))(delta)[0]
        np.testing.assert_allclose(got, damped, rtol=1e-6, atol=1e-9)
    assert np.abs(damped - want).max() > 1e-2
    np.testing.assert_allclose(damped, np.mean([b[i] @ (phi_star[i] - c_q[i]) for i in range(tasks_n)], axis=0),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="cg_damping"):
        imaml(quadratic, inner_steps=1, inner_lr=lr, lam=lam, cg_steps=1, cg_damping=-1.0, outer=optax.sgd(0.5))

    # The inner problem may be solved by any optax solver: one that reaches φ* (heavy-ball momentum) gives
    # the same implicit gradient; one that stops short (SGD at 0.01 for 40 steps) gives another.
    def solved_by(opt, steps):
        return jax.jit(lambda: imaml_gradient(quadratic, theta, tasks, steps=steps, lr=lr, lam=lam, cg_steps=n,
                                              inner_optimizer=opt))()[0]

    np.testing.assert_allclose(solved_by(optax.sgd(lr, momentum=0.5), 200), want, rtol=1e-6, atol=1e-9)
    short = solved_by(optax.sgd(0.01), 40)
    assert np.abs(short - want).max() > 1e-2
    registered = make_learner("imaml", quadratic, inner_steps=40, inner_lr=lr, outer_lr=0.1, imaml_lam=lam,
                              imaml_cg_steps=n, inner_optimizer=optax.sgd(0.01))
    _, reported = jax.jit(registered.step)(registered.init(theta), tasks)
    np.testing.assert_allclose(reported["grad_norm"], np.linalg.norm(short), rtol=1e-6)
    for algo in ("meta_sgd", "anil", "mamlpp", "pretrain"):  # their inner loops are not plain SGD to replace
        with pytest.raises(ConfigError, match="inner optimizer applies to maml, fomaml, reptile, imaml"):
            make_learner(algo, quadratic, inner_steps=1, inner_lr=lr, outer_lr=0.1, inner_optimizer=optax.sgd(0.01))

    learner = imaml(quadratic, inner_steps=40, inner_lr=lr, lam=lam, cg_steps=n, outer=optax.sgd(0.5))
    state, metrics = jax.jit(learner.step)(learner.init(theta), tasks)
    np.testing.assert_allclose(state.params, theta - 0.5 * want, rtol=1e-6, atol=1e-9)
    assert set(metrics) >= {"loss", "query_loss_pre", "query_loss_post", "grad_norm"}
    assert metrics["query_loss_post"] < metrics["query_loss_pre"]


def test_imaml_adapts_at_test_time_by_solving_its_proximal_problem():
    n, lam = 3, 2.0
    rng = np.random.default_rng(19)
    a, b = spd(rng, n, 1.0, 3.0), spd(rng, n, 0.5, 2.0)
    c_s = rng.normal(size=n)
    c_q = c_s + 0.3 * rng.normal(size=n)
    theta = np.array([0.5, -1.0, 2.0])
    tasks = jax.tree.map(lambda t: jnp.asarray(t)[None], Task((c_s, a), (c_q, b)))
    phi_star = np.linalg.solve(a + lam * np.eye(n), a @ c_s + lam * theta)
    query_loss = lambda phi: 0.5 * (phi - c_q) @ b @ (phi - c_q)

    learner = imaml(quadratic, inner_steps=5, inner_lr=0.25, lam=lam, cg_steps=5, outer=optax.sgd(0.0))
    result = evaluate(learner, theta, tasks, steps=40, loss_fn=quadratic, chunk_size=None)
    np.testing.assert_allclose(result.mean["loss"][-1], query_loss(phi_star), rtol=1e-9)
    # Without the proximal term SGD goes to the support minimiser c_s instead: a different score.
    plain = evaluate(maml(quadratic, inner_steps=5, inner_lr=0.25, outer=optax.sgd(0.0)), theta, tasks, steps=120,
                     loss_fn=quadratic, chunk_size=None)
    np.testing.assert_allclose(plain.mean["loss"][-1], query_loss(c_s), rtol=1e-6)
    assert abs(query_loss(c_s) - query_loss(phi_star)) > 1e-2
    with pytest.raises(ValueError, match="proximal"):
        inner_adapt(quadratic, theta, (c_s, a), steps=1, lr=0.1, proximal=0.0)


def test_conjugate_gradient_solves_a_pytree_system():
    m = jnp.asarray(spd(np.random.default_rng(16), 5, 0.5, 4.0))
    rhs = {"a": jnp.arange(2.0), "b": jnp.array([1.0, -1.0, 3.0])}
    ravel = lambda v: jax.flatten_util.ravel_pytree(v)[0]
    unravel = jax.flatten_util.ravel_pytree(rhs)[1]
    got = jax.jit(lambda r: conjugate_gradient(lambda v: unravel(m @ ravel(v)), r, steps=5))(rhs)
    np.testing.assert_allclose(flat(got), np.linalg.solve(m, flat(rhs)), rtol=1e-9)


def test_imaml_on_a_network_matches_a_dense_hessian_solve():
    params = init_mlp(17, sizes=(1, 3, 1))
    tasks = sine_tasks(18, n_tasks=2)
    lam, steps, lr = 4.0, 100, 0.1
    grad, _, _ = jax.jit(lambda p: imaml_gradient(mlp_loss, p, tasks, steps=steps, lr=lr, lam=lam, cg_steps=30))(
        params)
    unravel = jax.flatten_util.ravel_pytree(params)[1]

    @jax.jit
    def dense(task):
        phi = jax.flatten_util.ravel_pytree(
            proximal_adapt(mlp_loss, params, task.support, steps=steps, lr=lr, lam=lam))[0]
        h = jax.hessian(lambda v: mlp_loss(unravel(v), task.support))(phi)
        v = jax.grad(lambda v: mlp_loss(unravel(v), task.query))(phi)
        return jnp.linalg.solve(jnp.eye(phi.size) + h / lam, v)

    want = np.mean([dense(jax.tree.map(functools.partial(lambda i, t: t[i], i), tasks)) for i in range(2)], axis=0)
    np.testing.assert_allclose(flat(grad), want, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- Adam inner loop


def test_differentiating_through_adam_needs_eps_root():
    # Feature 1 is absent from the support set, so its weight's support gradient is exactly 0:
    # Adam's sqrt(ν) sits at 0, whose derivative is infinite, unless eps_root > 0.
    x = jnp.array([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    xq = jnp.array([[1.0, 1.0], [0.5, -2.0]])
    support, query = (x, x @ jnp.array([2.0, 1.0])), (xq, xq @ jnp.array([2.0, 1.0]))
    loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)

    def meta(w, eps_root):
        adapted = inner_adapt(loss, w, support, steps=3, optimizer=optax.adam(0.1, eps_root=eps_root))
        return loss(adapted, query)

    w0 = jnp.array([0.5, 0.3])
    good = jax.jit(jax.grad(lambda w: meta(w, 1e-8)))(w0)
    assert np.all(np.isfinite(good))
    np.testing.assert_allclose(good, finite_difference_grad(lambda w: meta(w, 1e-8), w0, eps=1e-7),
                               rtol=1e-4, atol=1e-6)
    bad = jax.jit(jax.grad(lambda w: meta(w, 0.0)))(w0)
    assert not np.all(np.isfinite(bad))
