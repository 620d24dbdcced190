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

StepView = Callable[[Params, jax.Array], Params]
"""``at_step(params, t) -> params``: the parameters the loss sees after ``t`` inner steps."""


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
    first_order: bool | jax.Array = False,
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
    first_order: bool | jax.Array = False,
    remat: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    observe: Callable[[Params], PyTree] | None = None,
    proximal: float | None = None,
    batches: jax.Array | None = None,
    opt_state: optax.OptState | None = None,
    step_lrs: PyTree | None = None,
    at_step: StepView | None = None,
) -> tuple[Params, PyTree]:
    """:func:`inner_adapt`, also returning ``observe(params)`` before every step and after the last.

    The observations are stacked along a leading axis of length ``steps + 1``
    (``None`` when ``observe`` is ``None``).  Evaluation uses this to score the
    query set after 0, 1, ..., ``steps`` inner steps in one scan.

    ``batches`` (``int[steps, B]``, e.g. from :func:`minibatch_schedule`)
    makes step ``i`` use the support examples ``batches[i]`` instead of the
    whole support set; ``opt_state`` starts the inner optimiser from a given
    state instead of a fresh one; ``step_lrs`` and ``at_step`` are
    :func:`adapt_with_state`'s (MAML++'s per-step rates and batch-norm rows).
    """
    params, _, seen = adapt_with_state(loss_fn, params, batch, steps=steps, lr=lr, first_order=first_order,
                                       remat=remat, optimizer=optimizer, has_aux=has_aux, observe=observe,
                                       proximal=proximal, batches=batches, opt_state=opt_state,
                                       step_lrs=step_lrs, at_step=at_step)
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
    first_order: bool | jax.Array = False,
    remat: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    observe: Callable[[Params], PyTree] | None = None,
    proximal: float | None = None,
    batches: jax.Array | None = None,
    opt_state: optax.OptState | None = None,
    step_lrs: PyTree | None = None,
    at_step: StepView | None = None,
) -> tuple[Params, optax.OptState, PyTree]:
    """The inner loop itself: :func:`adapt_and_observe`, also returning the inner optimiser's final state.

    Every learner's adaptation runs here: MAML's and ANIL's SGD, Meta-SGD's
    learned rates, iMAML's proximal problem, Reptile's mini-batched optimiser
    and MAML++'s per-step rates and batch-norm rows.

    Reptile's reference implementation keeps one inner Adam state across
    tasks: pass it in as ``opt_state`` and carry the returned one on.

    ``step_lrs`` gives step ``i`` its own rate (MAML++'s learned per-layer
    per-step rates): a pytree like ``params`` whose leaves have a leading
    ``[steps]`` axis (``[steps]`` for one rate per leaf and step), or one
    ``[steps]`` array shared by all leaves; it replaces ``lr``.
    ``at_step(params, t)`` is what ``loss_fn`` and ``observe`` see after ``t``
    steps (MAML++'s per-step batch-norm rows,
    :func:`~jaxmeta.algorithms.mamlpp.per_step_view`); the parameters
    themselves by default.  ``first_order`` may be a traced boolean scalar
    (MAML++'s derivative-order annealing switches it at run time).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if step_lrs is not None and optimizer is not None:
        raise ValueError("step_lrs are SGD rates; they cannot be combined with an optimizer")
    if step_lrs is not None and jax.tree.structure(step_lrs) != jax.tree.structure(params):
        if not (hasattr(step_lrs, "ndim") and step_lrs.ndim == 1):
            raise ValueError("step_lrs must be a pytree like params with [steps] leaves, or a [steps] array")
        step_lrs = jax.tree.map(lambda _: step_lrs, params)
    if step_lrs is not None and any(r.shape[0] != steps for r in jax.tree.leaves(step_lrs)):
        raise ValueError(f"step_lrs must hold one rate per step ({steps})")
    view = _same if at_step is None else at_step
    if isinstance(proximal, (int, float)) and not proximal > 0:
        raise ValueError(f"proximal must be > 0, got {proximal}")
    if batches is not None and batches.shape[0] != steps:
        raise ValueError(f"batches must hold one row of example indices per step ({steps}), got {batches.shape}")
    anchor = params

    def support_loss(p, examples, t):
        data = batch if examples is None else jax.tree.map(lambda a: a[examples], batch)
        loss = loss_value(loss_fn, view(p, t), data, has_aux=has_aux)[0]
        if proximal is None:
            return loss
        sq = sum(jnp.sum(jnp.square(pi - ai)) for pi, ai in zip(jax.tree.leaves(p), jax.tree.leaves(anchor)))
        return loss + 0.5 * proximal * sq

    grad_fn = jax.grad(support_loss)

    def update(p, opt_state, xs):
        examples, rate, t = xs
        grads = _stop_if(first_order, grad_fn(p, examples, t))
        if optimizer is None:
            return jax.tree.map(jnp.subtract, p, _scale(lr if rate is None else rate, grads)), opt_state
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    def step(carry, xs):
        p, opt_state = carry
        seen = None if observe is None else observe(view(p, xs[2]))
        return update(p, opt_state, xs), seen

    body = jax.checkpoint(step) if remat else step
    if opt_state is None and optimizer is not None:
        opt_state = optimizer.init(params)
    carry, observed = (params, opt_state), []
    xs = (batches, step_lrs, jnp.arange(steps))
    if steps == 1:
        # One step needs no scan, and outside a scan the step sees the shared (unbatched)
        # initialisation: vmapped over tasks, its products at θ take every task's examples in one
        # matmul (a scan's carry is per task from the start).  More steps keep one scan, so the
        # compiled program does not grow with them.
        carry, first = body(carry, jax.tree.map(lambda a: a[0], xs))
        observed.append(None if observe is None else jax.tree.map(lambda x: x[None], first))
    elif steps:
        carry, seen = jax.lax.scan(body, carry, xs)
        observed.append(seen)
    (params, opt_state), seen = carry, None
    if observe is not None:
        observed.append(jax.tree.map(lambda x: x[None], observe(view(params, steps))))
        seen = jax.tree.map(lambda *xs: jnp.concatenate(xs), *observed)
    return params, opt_state, seen


def _same(params: Params, t: jax.Array) -> Params:
    """The default ``at_step``: the parameters as they are after every step."""
    del t
    return params


def _stop_if(first_order: bool | jax.Array, grads: PyTree) -> PyTree:
    """``stop_gradient(grads)`` when ``first_order``; a traced flag selects with ``lax.cond``."""
    if isinstance(first_order, bool):
        return jax.lax.stop_gradient(grads) if first_order else grads
    return jax.lax.cond(first_order, jax.lax.stop_gradient, lambda g: g, grads)
