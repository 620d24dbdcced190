"""Reptile (Nichol, Achiam & Schulman, 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmeta.algorithms.base import (
    Adaptation,
    MetaLearner,
    MetaState,
    apply_outer,
    gradient_adapt,
    init_state,
    mean_metrics,
    query_before_after,
)
from jaxmeta.inner import LossFn, adapt_with_state, task_schedule
from jaxmeta.tasks import map_tasks
from jaxmeta.types import Params, PyTree, Task

INNER_STATE = "inner_state"
"""The key of the carried inner-optimiser state in a persistent-state Reptile's parameters."""


def reptile_params(meta_params: PyTree) -> tuple[Params, PyTree | None]:
    """``(initialisation, carried inner-optimiser state or None)`` of a Reptile learner's parameters."""
    if isinstance(meta_params, dict) and set(meta_params) == {"params", INNER_STATE}:
        return meta_params["params"], meta_params[INNER_STATE]
    return meta_params, None


def reptile(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: float | PyTree = 0.01,
    inner_optimizer: optax.GradientTransformation | None = None,
    epsilon: float = 1.0,
    anneal_steps: int | None = None,
    outer: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    chunk_size: int | None = None,
    inner_batch_size: int | None = None,
    persistent_inner_state: bool = False,
    seed: int = 0,
    test_inner_batch_size: int | None = None,
) -> MetaLearner:
    """Reptile: move the initialisation toward each task's adapted weights.

    Each task is adapted for ``inner_steps`` steps on its support set (SGD at
    ``inner_lr``, or ``inner_optimizer``), giving φ̃; then
    ``θ ← θ + ε · mean_tasks(φ̃ − θ)``.  This is implemented as the outer
    optimiser applied to the pseudo-gradient ``θ − mean(φ̃)``: the default
    ``outer`` is SGD with step size ``epsilon``, annealed linearly to 0 over
    ``anneal_steps`` meta-steps when given (as in Nichol et al.).

    The reference implementation (openai/supervised-reptile) differs from
    this default in two ways, both available here:

    * ``inner_batch_size``: each inner step uses a mini-batch of the support
      set, drawn without replacement (:func:`~jaxmeta.inner.minibatch_schedule`;
      the draws come from ``seed`` and the meta-step, so a resumed run draws
      the same ones);
    * ``persistent_inner_state``: its inner Adam is one TensorFlow optimiser
      whose moments are never reset, so each task's inner loop starts from the
      state the previous task left.  Here the tasks of a meta-batch then run in
      sequence (a ``lax.scan``, not a ``vmap``), the state is carried across
      meta-steps in the learner's parameters (``{"params", "inner_state"}``,
      see :func:`reptile_params`), and test-time adaptation starts from it.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      inner_steps: adaptation steps per task (k).
      inner_lr: inner SGD learning rate (ignored with ``inner_optimizer``).
      inner_optimizer: optional optax optimiser for the inner loop (e.g. Adam).
      epsilon: outer step size ε.
      anneal_steps: anneal ε linearly to 0 over this many meta-steps.
      outer: replaces the default outer SGD (e.g. Adam on the pseudo-gradient).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).
      inner_batch_size: support examples per inner step (``None``: all).
      persistent_inner_state: carry the inner optimiser's state from task to
        task (needs ``inner_optimizer``).
      seed: seeds the inner mini-batch draws.
      test_inner_batch_size: support examples per test-time inner step
        (``adapt``; the reference protocol tests on smaller mini-batches than
        it trains on); ``None``: the whole support set.

    Returns:
      A :class:`MetaLearner` whose ``adapt`` takes inner steps as in training
      (``inner_optimizer``, from the carried state when there is one). Metrics: ``loss`` (mean query loss after
      adaptation), ``query_*_pre``/``query_*_post`` and ``grad_norm`` (norm of
      the pseudo-gradient).
    """
    if persistent_inner_state and inner_optimizer is None:
        raise ValueError("persistent_inner_state carries an inner optimiser's state: give inner_optimizer")
    if outer is None:
        rate = epsilon if anneal_steps is None else optax.linear_schedule(epsilon, 0.0, anneal_steps)
        outer = optax.sgd(rate)
    base_key = jax.random.PRNGKey(seed)

    def per_task(params, task, key, inner_state):
        adapted, inner_state, _ = adapt_with_state(
            loss_fn,
            params,
            task.support,
            steps=inner_steps,
            lr=inner_lr,
            optimizer=inner_optimizer,
            has_aux=has_aux,
            batches=task_schedule(key, task.support, inner_steps, inner_batch_size),
            opt_state=inner_state,
        )
        post_loss, metrics = query_before_after(
            loss_fn, params, adapted, task.query, has_aux=has_aux
        )
        return adapted, post_loss, metrics, inner_state

    def init(params: Params) -> MetaState:
        state = init_state(outer, params)
        if persistent_inner_state:
            state = state._replace(params={"params": params, INNER_STATE: inner_optimizer.init(params)})
        return state

    def step(state: MetaState, tasks: Task):
        params, inner_state = reptile_params(state.params)
        num_tasks = jax.tree.leaves(tasks)[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(base_key, state.step), num_tasks)
        if persistent_inner_state:
            def one(carried, xs):
                task, key = xs
                adapted, loss, metrics, carried = per_task(params, task, key, carried)
                return carried, (adapted, loss, metrics)

            inner_state, (adapted, losses, metrics) = jax.lax.scan(one, inner_state, (tasks, keys))
        else:
            adapted, losses, metrics, _ = map_tasks(lambda xs: per_task(params, xs[0], xs[1], None),
                                                    (tasks, keys), chunk_size)
        pseudo_grad = jax.tree.map(lambda p, a: p - jnp.mean(a, axis=0), params, adapted)
        metrics = {"loss": losses.mean(), **mean_metrics(metrics)}
        metrics["grad_norm"] = optax.tree.norm(pseudo_grad)
        new = apply_outer(outer, state._replace(params=params), pseudo_grad)
        if persistent_inner_state:
            new = new._replace(params={"params": new.params, INNER_STATE: inner_state})
        return new, metrics

    def rule(meta_params):
        params, carried = reptile_params(meta_params)
        return Adaptation(params, inner_lr, optimizer=inner_optimizer, opt_state=carried)

    adapt = gradient_adapt(loss_fn, rule, has_aux=has_aux, batch_size=test_inner_batch_size)
    return MetaLearner(init, step, adapt)
