"""The inner loop: a few gradient steps on a task's support set.

Everything in jaxmeta is composed from :func:`inner_adapt`.  It runs the inner
steps in a :func:`jax.lax.scan`, so ``jax.grad`` through it gives the *exact*
second-order MAML meta-gradient, and the compiled program does not grow with
the number of steps.  A single step (the MAML paper's 5-way protocols) runs
without a scan: it starts from the shared initialisation, so vmapped over
tasks its products at θ take every task's examples in one matmul.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxmeta.types import Batch, Params, PyTree

LossFn = Callable[..., Any]
"""``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``)."""


def loss_value(loss_fn: LossFn, params: Params, batch: Batch, *, has_aux: bool = False):
    """Evaluates ``loss_fn`` and always returns ``(loss, aux_dict)``."""
    out = loss_fn(params, batch)
    if has_aux:
        return out
    return out, {}


def _scale(lr: float | jax.Array | PyTree, grads: PyTree) -> PyTree:
    """``lr * grads`` for a scalar ``lr`` or a pytree of rates shaped like ``grads``."""
    if isinstance(lr, (int, float)) or (hasattr(lr, "ndim") and jnp.ndim(lr) == 0):
        return jax.tree.map(lambda g: lr * g, grads)
    return jax.tree.map(lambda r, g: r * g, lr, grads)


def inner_adapt(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    steps: int,
    lr: float | jax.Array | PyTree = 0.01,
    first_order: bool = False,
    remat: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    proximal: float | None = None,
) -> Params:
    """Adapts ``params`` to one task with ``steps`` gradient steps on ``batch``.

    Args:
      loss_fn: pure ``loss_fn(params, batch)`` returning a scalar (or
        ``(scalar, aux)`` when ``has_aux``).
      params: the initial parameters (the meta-learned initialisation).
      batch: the task's support set ``(x, y)``.
      steps: number of inner steps (static).
      lr: inner learning rate, a scalar or a pytree shaped like ``params``
        (per-parameter rates, as in Meta-SGD). Differentiable. Ignored when
        ``optimizer`` is given.
      first_order: stop the gradient through the inner gradients, which drops
        the second-derivative term of the meta-gradient (first-order MAML).
      remat: rematerialise each inner step (``jax.checkpoint``) in the backward
        pass: memory no longer grows with the activations of every step.
      optimizer: an optional optax inner optimiser instead of plain SGD (for
        Reptile; to differentiate through Adam use ``eps_root > 0``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      proximal: λ > 0 adds ``(λ/2)·||φ − params||²`` to the support loss, the
        initial ``params`` held fixed (iMAML's proximally regularised inner
        problem); ``None`` for the plain support loss.

    Returns:
      The adapted parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss = lambda w, b: jnp.mean((b[0] * w - b[1]) ** 2)
      >>> w = inner_adapt(loss, 0.0, (jnp.ones(3), 2 * jnp.ones(3)), steps=50, lr=0.2)
      >>> round(float(w), 3)
      2.0
    """
    params, _ = adapt_and_observe(
        loss_fn,
        params,
        batch,
        steps=steps,
        lr=lr,
        first_order=first_order,
        remat=remat,
        optimizer=optimizer,
        has_aux=has_aux,
        proximal=proximal,
    )
    return params


def adapt_and_observe(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    steps: int,
    lr: float | jax.Array | PyTree = 0.01,
    first_order: bool = False,
    remat: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    observe: Callable[[Params], PyTree] | None = None,
    proximal: float | None = None,
    batches: jax.Array | None = None,
    opt_state: optax.OptState | None = None,
) -> tuple[Params, PyTree]:
    """:func:`inner_adapt`, also returning ``observe(params)`` before every step and after the last.

    The observations are stacked along a leading axis of length ``steps + 1``
    (``None`` when ``observe`` is ``None``).  Evaluation uses this to score the
    query set after 0, 1, ..., ``steps`` inner steps in one scan.

    ``batches`` (``int[steps, B]``, e.g. from :func:`minibatch_schedule`)
    makes step ``i`` use the support examples ``batches[i]`` instead of the
    whole support set; ``opt_state`` starts the inner optimiser from a given
    state instead of a fresh one.
    """
    params, _, seen = adapt_with_state(loss_fn, params, batch, steps=steps, lr=lr, first_order=first_order,
                                       remat=remat, optimizer=optimizer, has_aux=has_aux, observe=observe,
                                       proximal=proximal, batches=batches, opt_state=opt_state)
    return params, seen


def minibatch_schedule(key: jax.Array, examples: int, steps: int, batch_size: int) -> jax.Array:
    """Which support examples each inner step uses: ``int32[steps, batch_size]``.

    Mini-batches are drawn without replacement: the examples are shuffled,
    cut into consecutive batches, and shuffled again whenever they run out,
    a batch continuing across the boundary (openai/supervised-reptile's
    ``_mini_batches``).  Every example is used once per pass.

    Examples:
      >>> import jax
      >>> order = minibatch_schedule(jax.random.PRNGKey(0), 50, 5, 10)
      >>> order.shape, sorted(order.ravel().tolist()) == list(range(50))
      ((5, 10), True)
    """
    if examples < 1 or batch_size < 1 or steps < 0:
        raise ValueError(f"need examples, batch_size >= 1 and steps >= 0, got {examples}, {batch_size}, {steps}")
    passes = max(-(-steps * batch_size // examples), 1)
    order = jax.vmap(lambda k: jax.random.permutation(k, examples))(jax.random.split(key, passes))
    return order.reshape(-1)[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def task_schedule(key: jax.Array, batch: Batch, steps: int, batch_size: int | None) -> jax.Array | None:
    """One task's inner mini-batches from its support ``batch`` (``None`` when ``batch_size`` is: the whole set)."""
    if batch_size is None:
        return None
    return minibatch_schedule(key, jax.tree.leaves(batch)[0].shape[0], steps, batch_size)


def adapt_with_state(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    steps: int,
    lr: float | jax.Array | PyTree = 0.01,
    first_order: bool = False,
    remat: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    observe: Callable[[Params], PyTree] | None = None,
    proximal: float | None = None,
    batches: jax.Array | None = None,
    opt_state: optax.OptState | None = None,
) -> tuple[Params, optax.OptState, PyTree]:
    """The inner loop itself: :func:`adapt_and_observe`, also returning the inner optimiser's final state.

    Reptile's reference implementation keeps one inner Adam state across
    tasks: pass it in as ``opt_state`` and carry the returned one on.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if isinstance(proximal, (int, float)) and not proximal > 0:
        raise ValueError(f"proximal must be > 0, got {proximal}")
    if batches is not None and batches.shape[0] != steps:
        raise ValueError(f"batches must hold one row of example indices per step ({steps}), got {batches.shape}")
    anchor = params

    def support_loss(p, examples):
        data = batch if examples is None else jax.tree.map(lambda a: a[examples], batch)
        loss = loss_value(loss_fn, p, data, has_aux=has_aux)[0]
        if proximal is None:
            return loss
        sq = sum(jnp.sum(jnp.square(pi - ai)) for pi, ai in zip(jax.tree.leaves(p), jax.tree.leaves(anchor)))
        return loss + 0.5 * proximal * sq

    grad_fn = jax.grad(support_loss)

    def gradient(p, examples):
        g = grad_fn(p, examples)
        return jax.lax.stop_gradient(g) if first_order else g

    def update(p, opt_state, examples):
        if optimizer is None:
            return jax.tree.map(jnp.subtract, p, _scale(lr, gradient(p, examples))), opt_state
        updates, opt_state = optimizer.update(gradient(p, examples), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    def step(carry, examples):
        p, opt_state = carry
        seen = None if observe is None else observe(p)
        return update(p, opt_state, examples), seen

    body = jax.checkpoint(step) if remat else step
    if opt_state is None and optimizer is not None:
        opt_state = optimizer.init(params)
    carry, observed = (params, opt_state), []
    if steps == 1:
        # One step needs no scan, and outside a scan the step sees the shared (unbatched)
        # initialisation: vmapped over tasks, its products at θ take every task's examples in one
        # matmul (a scan's carry is per task from the start).  More steps keep one scan, so the
        # compiled program does not grow with them.
        carry, first = body(carry, None if batches is None else batches[0])
        observed.append(None if observe is None else jax.tree.map(lambda x: x[None], first))
    elif steps:
        carry, seen = jax.lax.scan(body, carry, batches, length=steps)
        observed.append(seen)
    (params, opt_state), seen = carry, None
    if observe is not None:
        observed.append(jax.tree.map(lambda x: x[None], observe(params)))
        seen = jax.tree.map(lambda *xs: jnp.concatenate(xs), *observed)
    return params, opt_state, seen
