"""MAML++ (Antoniou, Edwards & Storkey, 2019): the generic stabilisers of MAML.

Each stabiliser is a switch of :func:`mamlpp`:

* **Multi-step loss (MSL)**: the meta-objective is a weighted sum of the query
  losses after *every* inner step; the weights start uniform and are annealed
  toward the final step (:func:`msl_weights`, the schedule of the MAML++
  reference code), after which only the final step counts.
* **Learned per-layer per-step inner rates (LSLR)**: one learning rate per
  parameter leaf (a layer's kernel or bias) and inner step, meta-learned
  with the initialisation: ``lr`` is a pytree like the params whose leaves
  have shape ``[inner_steps]``.
* **Derivative-order annealing (DA)**: first-order meta-gradients for the
  first ``derivative_order_anneal_steps`` meta-steps, exact second-order ones
  afterwards, switched by a traced ``lax.cond`` so one compiled step serves both.
* **Cosine annealing of the outer learning rate (CA)**: the outer updates are
  scaled by ``optax.cosine_decay_schedule(1, total_steps, alpha)``, which for
  Adam or SGD is cosine annealing of the meta learning rate.

Not implemented here, because they are properties of the *model* rather than
of the algorithm: per-step batch-norm running statistics (BNRS) and per-step
batch-norm weights and biases (BNWB).  jaxmeta's
:class:`~jaxmeta.models.Conv4` uses stateless transductive batch norm (no
running statistics at all, the MAML reference setting), and per-step BN
affine parameters need a model whose ``apply`` takes the inner-step index.
A model that wants BNWB can take the step's BN parameters as part of its
params and select them itself; the learned per-step rates here already
cover every leaf, BN scales and biases included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxmeta.algorithms.base import (
    MetaLearner,
    MetaState,
    apply_outer,
    init_state,
    map_tasks,
    mean_metrics,
    scored,
)
from jaxmeta.inner import LossFn, loss_value
from jaxmeta.types import Batch, Params, PyTree, Task


def msl_weights(
    step: int | jax.Array, *, steps: int, anneal_steps: int, min_weight: float = 0.03
) -> jax.Array:
    """Multi-step-loss weights of the query losses after inner steps 1..``steps``.

    The MAML++ reference schedule with meta-steps in place of epochs: at meta-step
    ``t`` every non-final weight is ``max(1/N − t/(N·T), min_weight/N)`` and the
    final one ``min(1/N + t(N−1)/(N·T), 1 − (N−1)·min_weight/N)`` (they sum to
    1); from ``t = T = anneal_steps`` on, all weight is on the final step.

    Args:
      step: the meta-step ``t`` (may be traced).
      steps: the number of inner steps ``N``.
      anneal_steps: ``T``, meta-steps over which the weights are annealed.
      min_weight: the non-final weights' floor is ``min_weight / N``.

    Returns:
      ``[steps]`` weights.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if anneal_steps < 1:
        raise ValueError(f"anneal_steps must be >= 1, got {anneal_steps}")
    n = steps
    t = jnp.asarray(step, jnp.float32)
    decay = 1.0 / n / anneal_steps
    floor = min_weight / n
    early = jnp.maximum(1.0 / n - t * decay, floor)
    last = jnp.minimum(1.0 / n + t * (n - 1) * decay, 1.0 - (n - 1) * floor)
    annealed = jnp.concatenate([jnp.full((n - 1,), early), last[None]])
    return jnp.where(t < anneal_steps, annealed, final_step_weights(n))


def final_step_weights(steps: int) -> jax.Array:
    """``[0, ..., 0, 1]``: the multi-step loss reduced to MAML's final-step loss."""
    return jnp.zeros((steps,), jnp.float32).at[-1].set(1.0)


def per_step_lr(params: Params, inner_lr: float, steps: int) -> PyTree:
    """Per-layer per-step rates: a pytree like ``params`` with ``[steps]`` leaves set to ``inner_lr``."""
    return jax.tree.map(lambda p: jnp.full((steps,), inner_lr, jnp.result_type(p)), params)


def _stop_if(first_order: bool | jax.Array, grads: PyTree) -> PyTree:
    """``stop_gradient(grads)`` when ``first_order``; a traced flag selects with ``lax.cond``."""
    if isinstance(first_order, bool):
        return jax.lax.stop_gradient(grads) if first_order else grads
    return jax.lax.cond(first_order, jax.lax.stop_gradient, lambda g: g, grads)


def adapt_per_step(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    lrs: PyTree,
    first_order: bool | jax.Array = False,
    remat: bool = False,
    has_aux: bool = False,
    observe: Callable[[Params], PyTree] | None = None,
) -> tuple[Params, PyTree]:
    """SGD on ``batch`` with a different learning rate at every step (one ``lax.scan``).

    Args:
      loss_fn: ``loss_fn(params, batch)`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      params: the initial parameters.
      batch: the support set.
      lrs: the rates, step-major: a pytree like ``params`` whose leaves have a
        leading ``[steps]`` axis (``[steps]`` for one rate per leaf and step,
        ``[steps, *leaf.shape]`` for one per entry), or a ``[steps]`` array
        shared by all leaves.  Differentiable.
      first_order: stop the gradient through the inner gradients; a traced
        boolean scalar switches at run time.
      remat: rematerialise each step in the backward pass.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      observe: ``observe(params)`` recorded *after* every step.

    Returns:
      ``(adapted params, observations)``, the observations stacked along a
      leading ``[steps]`` axis (``None`` without ``observe``).
    """
    if jax.tree.structure(lrs) != jax.tree.structure(params):
        if not (hasattr(lrs, "ndim") and lrs.ndim == 1):
            raise ValueError("lrs must be a pytree like params with [steps] leaves, or a [steps] array")
        lrs = jax.tree.map(lambda _: lrs, params)
    grad_fn = jax.grad(lambda p: loss_value(loss_fn, p, batch, has_aux=has_aux)[0])

    def step(p, lr):
        grads = _stop_if(first_order, grad_fn(p))
        p = jax.tree.map(lambda x, g, r: x - r * g, p, grads, lr)
        return p, (None if observe is None else observe(p))

    body = jax.checkpoint(step) if remat else step
    return jax.lax.scan(body, params, lrs)


def mamlpp_task_objective(
    loss_fn: LossFn,
    params: Params,
    lrs: PyTree,
    task: Task,
    *,
    weights: jax.Array,
    first_order: bool | jax.Array = False,
    remat: bool = False,
    has_aux: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One task's multi-step loss ``Σ_i weights[i] · L_query(φ_i)`` and its metrics.

    ``φ_i`` are the parameters after ``i = 1..N`` inner steps.  The metrics hold
    the query loss (and aux values) before adaptation (``query_*_pre``, no
    gradient) and after the final step (``query_*_post``).
    """

    def observe(p):
        return scored(loss_fn, p, task.query, "query", has_aux=has_aux)

    _, (losses, seen) = adapt_per_step(
        loss_fn, params, task.support, lrs=lrs, first_order=first_order, remat=remat, has_aux=has_aux,
        observe=observe,
    )
    objective = jnp.sum(weights * losses)
    _, pre = scored(loss_fn, jax.lax.stop_gradient(params), task.query, "query", has_aux=has_aux)
    metrics = {f"{k}_pre": v for k, v in pre.items()}
    metrics.update({f"{k}_post": v[-1] for k, v in seen.items()})
    return objective, metrics


def mamlpp_objective(
    loss_fn: LossFn,
    params: Params,
    lrs: PyTree,
    tasks: Task,
    *,
    weights: jax.Array,
    first_order: bool | jax.Array = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MAML++ meta-objective on a batch of tasks: ``(mean multi-step loss, mean metrics)``.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      params: the initialisation θ.
      lrs: per-step rates (see :func:`adapt_per_step`); their number sets the inner steps.
      tasks: a :class:`~jaxmeta.Task` batch with a leading task axis.
      weights: ``[steps]`` weights of the query losses after each step
        (:func:`msl_weights`; :func:`final_step_weights` gives MAML's objective).
      first_order: first-order meta-gradient (a traced boolean is allowed).
      remat: rematerialise inner steps.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      ``(loss, metrics)``; differentiable with respect to ``params`` and ``lrs``.
    """
    objective = functools.partial(
        mamlpp_task_objective,
        loss_fn,
        weights=weights,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
    )
    losses, metrics = map_tasks(lambda task: objective(params, lrs, task), tasks, chunk_size)
    return losses.mean(), mean_metrics(metrics)


def mamlpp_params(state: MetaState | dict[str, PyTree]) -> tuple[Params, PyTree]:
    """The meta-learned ``(params, lrs)`` of a MAML++ state (``lrs`` leaves are ``[steps]``).

    Evaluate with :func:`mamlpp_evaluate` (one rate per step), or with
    ``jaxmeta.evaluate(..., lr=...)`` and a single rate.
    """
    meta = state.params if isinstance(state, MetaState) else state
    return meta["params"], meta["lr"]


@functools.partial(jax.jit, static_argnames=("loss_fn", "has_aux", "chunk_size"))
def mamlpp_evaluate(
    loss_fn: LossFn,
    params: Params,
    lrs: PyTree,
    tasks: Task,
    *,
    has_aux: bool = False,
    chunk_size: int | None = 50,
):
    """:func:`jaxmeta.evaluate` with per-step rates: query metrics after 0..N steps.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      params: the meta-learned initialisation.
      lrs: per-step rates (:func:`mamlpp_params`); N is their number of steps.
      tasks: test tasks with a leading task axis.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks adapted at once; ``None`` for all.

    Returns:
      A :class:`jaxmeta.EvalResult` with ``[N + 1]`` means and CIs.
    """
    from jaxmeta.evaluation import EvalResult, ci95  # lazy: evaluation imports the algorithms package

    def per_task(task):
        def observe(p):
            loss, aux = loss_value(loss_fn, p, task.query, has_aux=has_aux)
            return {"loss": loss, **aux}

        _, seen = adapt_per_step(loss_fn, params, task.support, lrs=lrs, has_aux=has_aux, observe=observe)
        return jax.tree.map(lambda a, s: jnp.concatenate([a[None], s]), observe(params), seen)

    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    chunk = None if chunk_size is None or chunk_size >= num_tasks else chunk_size
    per_task_values = map_tasks(per_task, tasks, chunk)
    mean = {k: jnp.mean(v, axis=0) for k, v in per_task_values.items()}
    return EvalResult(mean, {k: ci95(v) for k, v in per_task_values.items()}, per_task_values)


def mamlpp(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: float,
    outer: optax.GradientTransformation,
    multi_step_loss: bool = True,
    msl_anneal_steps: int = 5000,
    msl_min_weight: float = 0.03,
    learn_inner_lr: bool = True,
    derivative_order_anneal_steps: int | None = None,
    cosine_outer: bool = False,
    total_steps: int | None = None,
    cosine_alpha: float = 0.0,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> MetaLearner:
    """MAML++: MAML with the multi-step loss, learned per-step rates and annealing.

    The state's ``params`` are ``{"params": θ, "lr": lrs}`` (``lrs`` a pytree
    like θ with ``[inner_steps]`` leaves, initialised to ``inner_lr``); get
    them with :func:`mamlpp_params`.  With ``learn_inner_lr=False`` the rates
    stay fixed (the outer optimiser is masked on them).  With every switch
    off (``multi_step_loss=False, learn_inner_lr=False``, no annealing) a
    step is exactly a MAML step.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      inner_steps: inner SGD steps N (>= 1).
      inner_lr: initial (or fixed) inner learning rate.
      outer: the outer optimiser, e.g. ``optax.adam(1e-3)``.
      multi_step_loss: use the annealed multi-step loss (:func:`msl_weights`);
        otherwise only the final step's query loss.
      msl_anneal_steps: meta-steps over which the MSL weights move to the
        final step (the reference code anneals over its first epochs; default
        5000 ≈ 10 epochs of 500 meta-steps); afterwards only the final step counts.
      msl_min_weight: floor of the non-final weights during annealing, times 1/N.
      learn_inner_lr: meta-learn one rate per parameter leaf and inner step.
      derivative_order_anneal_steps: use first-order meta-gradients for this
        many meta-steps, then exact ones (``None``: always exact).
      cosine_outer: anneal the outer learning rate with a cosine over ``total_steps``.
      total_steps: meta-steps of the cosine schedule (required with ``cosine_outer``).
      cosine_alpha: final outer learning rate as a fraction of the initial one.
      remat: rematerialise each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`MetaLearner`; ``step`` metrics: ``loss`` (the weighted
      multi-step loss), ``query_loss_pre``/``query_loss_post`` (after the
      final step; aux values likewise) and ``grad_norm``.

    Raises:
      ValueError: ``inner_steps < 1``, or ``cosine_outer`` without ``total_steps``.
    """
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    if cosine_outer:
        if total_steps is None:
            raise ValueError("cosine_outer needs total_steps")
        schedule = optax.cosine_decay_schedule(1.0, total_steps, alpha=cosine_alpha)
        outer = optax.chain(outer, optax.scale_by_schedule(schedule))
    if not learn_inner_lr:
        outer = optax.multi_transform(
            {"params": outer, "lr": optax.set_to_zero()},
            lambda meta: {k: jax.tree.map(lambda _: k, v) for k, v in meta.items()},
        )
    if multi_step_loss:
        msl_weights(0, steps=inner_steps, anneal_steps=msl_anneal_steps)  # validate now, not at trace time

    def init(params: Params) -> MetaState:
        return init_state(outer, {"params": params, "lr": per_step_lr(params, inner_lr, inner_steps)})

    def step(state: MetaState, tasks: Task):
        if multi_step_loss:
            weights = msl_weights(
                state.step, steps=inner_steps, anneal_steps=msl_anneal_steps, min_weight=msl_min_weight
            )
        else:
            weights = final_step_weights(inner_steps)
        first_order = (
            False if derivative_order_anneal_steps is None else state.step < derivative_order_anneal_steps
        )

        def objective(meta):
            lrs = meta["lr"] if learn_inner_lr else jax.lax.stop_gradient(meta["lr"])
            return mamlpp_objective(
                loss_fn,
                meta["params"],
                lrs,
                tasks,
                weights=weights,
                first_order=first_order,
                remat=remat,
                has_aux=has_aux,
                chunk_size=chunk_size,
            )

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        return apply_outer(outer, state, grads), metrics

    return MetaLearner(init, step)
