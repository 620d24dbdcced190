"""The functional core proved with numbers: finite differences and closed forms."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmeta
from jaxmeta import Task, evaluate, fomaml, inner_adapt, maml, maml_loss, pretrain, reptile


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Finite differences need float64; restored afterwards for the other modules."""
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


# A plain-pytree MLP (the core must not care where loss_fn comes from); tanh keeps
# the second derivatives smooth for finite differences.
def init_mlp(key, sizes=(1, 6, 6, 1)):
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(k)
        params.append({"w": jax.random.normal(kw, (n_in, n_out)) / np.sqrt(n_in),
                       "b": 0.1 * jax.random.normal(kb, (n_out,))})
    return params


def mlp_loss(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    pred = x @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((pred - y) ** 2)


def sine_tasks(key, n_tasks=3, shots=5):
    ka, kp, kx = jax.random.split(key, 3)
    amp = jax.random.uniform(ka, (n_tasks, 1, 1), minval=0.5, maxval=2.0)
    phase = jax.random.uniform(kp, (n_tasks, 1, 1), maxval=np.pi)
    x = jax.random.uniform(kx, (n_tasks, 2 * shots, 1), minval=-3, maxval=3)
    y = amp * jnp.sin(x + phase)
    return Task((x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:]))


def finite_difference_grad(f, params, eps=1e-6):
    f = jax.jit(f)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    grad = np.zeros_like(np.asarray(flat))
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        grad[i] = (f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * eps)
    return grad


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    params = init_mlp(jax.random.PRNGKey(0))
    tasks = sine_tasks(jax.random.PRNGKey(1))
    f = functools.partial(maml_loss, mlp_loss, tasks=tasks, steps=steps, lr=0.1)
    exact = flat(jax.grad(lambda p: f(p))(params))
    numeric = finite_difference_grad(lambda p: f(p), params)
    np.testing.assert_allclose(exact, numeric, rtol=1e-5, atol=1e-7)
    # The first-order gradient is a different quantity: make sure the test can tell.
    approx = flat(jax.grad(lambda p: maml_loss(mlp_loss, p, tasks, steps=steps, lr=0.1, first_order=True))(params))
    assert np.abs(approx - numeric).max() > 1e-3


def test_per_parameter_learning_rates_gradients_match_finite_differences():
    params = init_mlp(jax.random.PRNGKey(2))
    tasks = sine_tasks(jax.random.PRNGKey(3))
    lrs = jax.tree.map(lambda p: 0.05 + 0.1 * jax.random.uniform(jax.random.PRNGKey(4), p.shape), params)

    def f(both):
        p, lr = both
        return maml_loss(mlp_loss, p, tasks, steps=2, lr=lr)

    exact = flat(jax.grad(f)((params, lrs)))
    numeric = finite_difference_grad(f, (params, lrs))
    np.testing.assert_allclose(exact, numeric, rtol=1e-5, atol=1e-7)
    # A pytree of rates equal to a scalar gives the scalar's result.
    same = jax.tree.map(lambda p: jnp.full(p.shape, 0.1), params)
    np.testing.assert_allclose(maml_loss(mlp_loss, params, tasks, steps=2, lr=same),
                               maml_loss(mlp_loss, params, tasks, steps=2, lr=0.1), rtol=1e-12)


def test_one_inner_loop_takes_per_step_rates_views_and_a_traced_order():
    """MAML++'s per-step rates and batch-norm views run in the same loop as every other rule."""
    from jaxmeta.inner import adapt_and_observe

    params = init_mlp(jax.random.PRNGKey(6))
    task = jax.tree.map(lambda a: a[0], sine_tasks(jax.random.PRNGKey(7)))
    rates = jnp.array([0.3, 0.02, 0.1])
    by_hand = params
    for r in rates:
        by_hand = jax.tree.map(lambda p, g, r=r: p - r * g, by_hand, jax.grad(mlp_loss)(by_hand, task.support))
    for step_lrs in (rates, jax.tree.map(lambda _: rates, params)):  # one [steps] array, or one per leaf
        adapted, _ = adapt_and_observe(mlp_loss, params, task.support, steps=3, step_lrs=step_lrs)
        np.testing.assert_allclose(flat(adapted), flat(by_hand), rtol=1e-12)
    # A single rate differs (the test can tell), and the rates must match the steps.
    assert np.abs(flat(inner_adapt(mlp_loss, params, task.support, steps=3, lr=0.1)) - flat(by_hand)).max() > 1e-3
    with pytest.raises(ValueError, match="one rate per step"):
        adapt_and_observe(mlp_loss, params, task.support, steps=2, step_lrs=rates)

    # at_step: the loss and the observations see the view of step t (here: the output bias shifted by t).
    def at_step(p, t):
        return p[:-1] + [{"w": p[-1]["w"], "b": p[-1]["b"] + t}]

    seen_by_hand, p = [], params
    for t, r in enumerate(rates):
        seen_by_hand.append(mlp_loss(at_step(p, t), task.query))
        p = jax.tree.map(lambda x, g, r=r: x - r * g, p, jax.grad(lambda q: mlp_loss(at_step(q, t), task.support))(p))
    seen_by_hand.append(mlp_loss(at_step(p, 3), task.query))
    adapted, seen = adapt_and_observe(mlp_loss, params, task.support, steps=3, step_lrs=rates, at_step=at_step,
                                      observe=lambda q: mlp_loss(q, task.query))
    np.testing.assert_allclose(flat(adapted), flat(p), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(seen), np.asarray(seen_by_hand), rtol=1e-12)

    # A traced first_order flag selects the exact or the first-order meta-gradient at run time.
    def meta_loss(q, first_order):
        adapted = inner_adapt(mlp_loss, q, task.support, steps=2, lr=0.1, first_order=first_order)
        return mlp_loss(adapted, task.query)

    switched = jax.jit(jax.grad(meta_loss))
    for order in (True, False):
        np.testing.assert_allclose(flat(switched(params, jnp.asarray(order))), flat(jax.grad(meta_loss)(params, order)),
                                   rtol=1e-10)
    assert np.abs(flat(switched(params, jnp.asarray(True))) - flat(switched(params, jnp.asarray(False)))).max() > 1e-4


def test_first_order_gradient_is_query_gradient_at_adapted_parameters():
    params = init_mlp(jax.random.PRNGKey(5))
    tasks = sine_tasks(jax.random.PRNGKey(6))
    got = jax.grad(lambda p: maml_loss(mlp_loss, p, tasks, steps=3, lr=0.1, first_order=True))(params)
    per_task = []
    for i in range(3):
        task = jax.tree.map(lambda a: a[i], tasks)
        phi = params
        for _ in range(3):  # plain Python SGD, no scan
            g = jax.grad(mlp_loss)(phi, task.support)
            phi = jax.tree.map(lambda p, gi: p - 0.1 * gi, phi, g)
        per_task.append(flat(jax.grad(mlp_loss)(phi, task.query)))
    np.testing.assert_allclose(flat(got), np.mean(per_task, axis=0), rtol=1e-10, atol=1e-12)


# A quadratic where every algorithm has a closed form: loss(θ, x) = ½ mean_i Σ_j a_j (θ_j − x_ij)².
A = np.array([1.0, 2.0, 0.5])  # numpy float64: module constants predate the x64 fixture


def quad_loss(theta, batch):
    x, _ = batch
    return 0.5 * jnp.mean(jnp.sum(A * (theta - x) ** 2, axis=-1))


def quad_tasks(key, n_tasks=4, points=3):
    ks, kq = jax.random.split(key)
    xs = jax.random.normal(ks, (n_tasks, points, 3))
    xq = jax.random.normal(kq, (n_tasks, points, 3)) + 1.0
    zeros = jnp.zeros((n_tasks, points))
    return Task((xs, zeros), (xq, zeros))


@pytest.mark.parametrize("steps", [1, 4])
def test_maml_orders_match_closed_forms_on_a_quadratic(steps):
    alpha, theta = 0.3, jnp.array([0.5, -1.0, 2.0])
    tasks = quad_tasks(jax.random.PRNGKey(7))
    c_s = tasks.support[0].mean(axis=1)  # [tasks, 3]
    c_q = tasks.query[0].mean(axis=1)
    contraction = (1 - alpha * A) ** steps
    phi = c_s + contraction * (theta - c_s)
    exact = jnp.mean(contraction * A * (phi - c_q), axis=0)
    first = jnp.mean(A * (phi - c_q), axis=0)
    got_exact = jax.grad(maml_loss, argnums=1)(quad_loss, theta, tasks, steps=steps, lr=alpha)
    got_first = jax.grad(maml_loss, argnums=1)(quad_loss, theta, tasks, steps=steps, lr=alpha, first_order=True)
    np.testing.assert_allclose(got_exact, exact, rtol=1e-12)
    np.testing.assert_allclose(got_first, first, rtol=1e-12)
    # The meta-learner applies exactly that gradient with its outer optimiser.
    for learner, grad in ((maml(quad_loss, inner_steps=steps, inner_lr=alpha, outer=optax.sgd(0.5)), exact),
                          (fomaml(quad_loss, inner_steps=steps, inner_lr=alpha, outer=optax.sgd(0.5)), first)):
        state, metrics = learner.step(learner.init(theta), tasks)
        np.testing.assert_allclose(state.params, theta - 0.5 * grad, rtol=1e-12)
        assert int(state.step) == 1
        assert metrics["query_loss_post"] < metrics["query_loss_pre"]


def test_reptile_matches_closed_form_on_a_quadratic():
    alpha, eps, k = 0.25, 0.75, 3  # exactly representable: optax keeps rates in float32
    theta = jnp.array([1.0, 0.0, -1.0])
    tasks = quad_tasks(jax.random.PRNGKey(8))
    c_s = tasks.support[0].mean(axis=1)
    phi = c_s + (1 - alpha * A) ** k * (theta - c_s)
    learner = reptile(quad_loss, inner_steps=k, inner_lr=alpha, epsilon=eps)
    state, _ = learner.step(learner.init(theta), tasks)
    np.testing.assert_allclose(state.params, theta + eps * jnp.mean(phi - theta, axis=0), rtol=1e-12)
    # Linear annealing: after half the schedule the step is ε/2.
    annealed = reptile(quad_loss, inner_steps=k, inner_lr=alpha, epsilon=eps, anneal_steps=2)
    state, _ = annealed.step(annealed.init(theta), tasks)
    state2, _ = annealed.step(state, tasks)
    phi2 = c_s + (1 - alpha * A) ** k * (state.params - c_s)
    np.testing.assert_allclose(state2.params, state.params + eps / 2 * jnp.mean(phi2 - state.params, axis=0),
                               rtol=1e-12)


def test_pretraining_matches_closed_form_on_a_quadratic():
    eta, theta = 0.1, jnp.array([1.0, 2.0, 3.0])
    tasks = quad_tasks(jax.random.PRNGKey(9))
    everything = jnp.concatenate([tasks.support[0], tasks.query[0]], axis=1).mean(axis=1)
    grad = jnp.mean(A * (theta - everything), axis=0)
    learner = pretrain(quad_loss, optimizer=optax.sgd(eta))
    state, metrics = learner.step(learner.init(theta), tasks)
    np.testing.assert_allclose(state.params, theta - eta * grad, rtol=1e-12)
    assert "query_loss_post" not in metrics  # no adaptation in its objective


def test_vmap_over_tasks_equals_a_python_loop_and_chunks():
    params = init_mlp(jax.random.PRNGKey(10))
    tasks = sine_tasks(jax.random.PRNGKey(11), n_tasks=4)
    grad = jax.grad(maml_loss, argnums=1)
    batched = flat(grad(mlp_loss, params, tasks, steps=2, lr=0.1))
    looped = np.mean([flat(grad(mlp_loss, params, jax.tree.map(lambda a: a[i : i + 1], tasks), steps=2, lr=0.1))
                      for i in range(4)], axis=0)
    np.testing.assert_allclose(batched, looped, rtol=1e-10, atol=1e-13)
    chunked = flat(grad(mlp_loss, params, tasks, steps=2, lr=0.1, chunk_size=3))
    np.testing.assert_allclose(chunked, batched, rtol=1e-10, atol=1e-13)


def test_remat_changes_memory_not_values():
    params = init_mlp(jax.random.PRNGKey(12))
    tasks = sine_tasks(jax.random.PRNGKey(13))
    grad = jax.grad(maml_loss, argnums=1)
    np.testing.assert_allclose(flat(grad(mlp_loss, params, tasks, steps=5, lr=0.1, remat=True)),
                               flat(grad(mlp_loss, params, tasks, steps=5, lr=0.1)), rtol=1e-12)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "pretrain"])
def test_jitted_meta_step_equals_unjitted(algo):
    params = init_mlp(jax.random.PRNGKey(14))
    tasks = sine_tasks(jax.random.PRNGKey(15))
    learner = {
        "maml": lambda: maml(mlp_loss, inner_steps=2, inner_lr=0.1, outer=optax.adam(1e-2)),
        "fomaml": lambda: fomaml(mlp_loss, inner_steps=2, inner_lr=0.1, outer=optax.adam(1e-2)),
        "reptile": lambda: reptile(mlp_loss, inner_steps=3, inner_lr=0.1, epsilon=0.5),
        "pretrain": lambda: pretrain(mlp_loss, optimizer=optax.adam(1e-2)),
    }[algo]()
    state = learner.init(params)
    s1, m1 = learner.step(state, tasks)
    s2, m2 = jax.jit(learner.step)(state, tasks)
    np.testing.assert_allclose(flat(s1.params), flat(s2.params), rtol=1e-10, atol=1e-13)
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-10)
    assert not np.allclose(flat(s1.params), flat(params))


def test_inner_adapt_with_an_optax_optimiser_and_finite_meta_gradients():
    # Differentiating through Adam needs eps_root > 0 (sqrt'(0) is infinite).
    params = init_mlp(jax.random.PRNGKey(16))
    task = jax.tree.map(lambda a: a[0], sine_tasks(jax.random.PRNGKey(17)))

    def meta(p, opt):
        adapted = inner_adapt(mlp_loss, p, task.support, steps=3, optimizer=opt)
        return mlp_loss(adapted, task.query)

    grads = jax.grad(meta)(params, optax.adam(0.05, eps_root=1e-8))
    assert np.all(np.isfinite(flat(grads)))
    adapted = inner_adapt(mlp_loss, params, task.support, steps=20, optimizer=optax.adam(0.05))
    assert mlp_loss(adapted, task.support) < 0.5 * mlp_loss(params, task.support)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_with_an_inner_optimiser(first_order):
    # optax.sgd(lr) inside is plain SGD at lr: the same meta-step, exactly.
    params = init_mlp(jax.random.PRNGKey(20))
    tasks = sine_tasks(jax.random.PRNGKey(21))
    plain = maml(mlp_loss, inner_steps=2, inner_lr=0.1, outer=optax.sgd(0.1), first_order=first_order)
    via = maml(mlp_loss, inner_steps=2, inner_lr=123.0, outer=optax.sgd(0.1), first_order=first_order,
               inner_optimizer=optax.sgd(0.1))
    s1, m1 = plain.step(plain.init(params), tasks)
    s2, m2 = via.step(via.init(params), tasks)
    np.testing.assert_allclose(flat(s1.params), flat(s2.params), rtol=1e-12)
    # Adam inside: the exact second-order meta-gradient matches central finite differences.
    adam = optax.adam(0.05, eps_root=1e-8)
    direction = jax.tree.map(lambda p: jnp.sign(jnp.sin(jnp.arange(p.size).reshape(p.shape) + 1.0)), params)

    def meta(p):
        return jaxmeta.maml_objective(mlp_loss, p, tasks, steps=2, lr=0.0, inner_optimizer=adam,
                                      first_order=first_order)[0]

    if not first_order:
        eps = 1e-6
        plus = meta(jax.tree.map(lambda p, d: p + eps * d, params, direction))
        minus = meta(jax.tree.map(lambda p, d: p - eps * d, params, direction))
        fd = (plus - minus) / (2 * eps)
        analytic = jnp.vdot(flat(jax.grad(meta)(params)), flat(direction))
        np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_evaluate_reports_every_step_with_confidence_intervals():
    params = init_mlp(jax.random.PRNGKey(18))
    tasks = sine_tasks(jax.random.PRNGKey(19), n_tasks=7)
    learner = maml(mlp_loss, inner_steps=1, inner_lr=0.1, outer=optax.sgd(0.0))
    result = evaluate(learner, params, tasks, steps=4, loss_fn=mlp_loss, chunk_size=3)
    assert result.mean["loss"].shape == (5,) and result.per_task["loss"].shape == (7, 5)
    for s in range(5):
        per_task = [mlp_loss(inner_adapt(mlp_loss, params, jax.tree.map(lambda a: a[i], tasks.support), steps=s,
                                         lr=0.1), jax.tree.map(lambda a: a[i], tasks.query)) for i in range(7)]
        np.testing.assert_allclose(result.per_task["loss"][:, s], per_task, rtol=1e-10)
        np.testing.assert_allclose(result.mean["loss"][s], np.mean(per_task), rtol=1e-10)
        np.testing.assert_allclose(result.ci95["loss"][s], 1.96 * np.std(per_task, ddof=1) / np.sqrt(7), rtol=1e-8)
    assert result.mean["loss"][4] < result.mean["loss"][0]
    # Scoring only after the last step gives that step's numbers.
    last = evaluate(learner, params, tasks, steps=4, loss_fn=mlp_loss, chunk_size=3, every_step=False)
    assert last.per_task["loss"].shape == (7, 1)
    np.testing.assert_allclose(last.per_task["loss"], result.per_task["loss"][:, -1:], rtol=1e-6)
    np.testing.assert_allclose(last.ci95["loss"], result.ci95["loss"][-1:], rtol=1e-6)


def test_public_api_imports():
    for name in jaxmeta.__all__:
        assert getattr(jaxmeta, name) is not None
    assert jaxmeta.__version__
