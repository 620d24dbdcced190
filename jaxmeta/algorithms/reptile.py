"""Reptile (Nichol, Achiam & Schulman, 2018)."""

from __future__ import annotations

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
    query_before_after,
)
from jaxmeta.inner import LossFn, inner_adapt
from jaxmeta.types import Params, PyTree, Task


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
) -> MetaLearner:
    """Reptile: move the initialisation toward each task's adapted weights.

    Each task is adapted for ``inner_steps`` steps on its support set (SGD at
    ``inner_lr``, or ``inner_optimizer``), giving φ̃; then
    ``θ ← θ + ε · mean_tasks(φ̃ − θ)``.  This is implemented as the outer
    optimiser applied to the pseudo-gradient ``θ − mean(φ̃)``: the default
    ``outer`` is SGD with step size ``epsilon``, annealed linearly to 0 over
    ``anneal_steps`` meta-steps when given (as in Nichol et al.).

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

    Returns:
      A :class:`MetaLearner`. Metrics: ``loss`` (mean query loss after
      adaptation), ``query_*_pre``/``query_*_post`` and ``grad_norm`` (norm of
      the pseudo-gradient).
    """
    if outer is None:
        rate = epsilon if anneal_steps is None else optax.linear_schedule(epsilon, 0.0, anneal_steps)
        outer = optax.sgd(rate)

    def per_task(params, task):
        adapted = inner_adapt(
            loss_fn,
            params,
            task.support,
            steps=inner_steps,
            lr=inner_lr,
            optimizer=inner_optimizer,
            has_aux=has_aux,
        )
        post_loss, metrics = query_before_after(
            loss_fn, params, adapted, task.query, has_aux=has_aux
        )
        return adapted, post_loss, metrics

    def init(params: Params) -> MetaState:
        return init_state(outer, params)

    def step(state: MetaState, tasks: Task):
        adapted, losses, metrics = map_tasks(lambda t: per_task(state.params, t), tasks, chunk_size)
        pseudo_grad = jax.tree.map(lambda p, a: p - jnp.mean(a, axis=0), state.params, adapted)
        metrics = {"loss": losses.mean(), **mean_metrics(metrics)}
        metrics["grad_norm"] = optax.tree.norm(pseudo_grad)
        return apply_outer(outer, state, pseudo_grad), metrics

    return MetaLearner(init, step)
