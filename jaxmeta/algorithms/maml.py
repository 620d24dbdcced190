"""MAML (Finn et al., 2017): exact second-order and first-order meta-gradients."""

from __future__ import annotations

import functools

import jax
import optax

from jaxmeta.algorithms.base import (
    Adaptation,
    MetaLearner,
    MetaState,
    descend,
    gradient_adapt,
    init_state,
    mean_metrics,
    query_before_after,
)
from jaxmeta.inner import LossFn, inner_adapt
from jaxmeta.tasks import map_tasks
from jaxmeta.types import Params, PyTree, Task


def task_objective(
    loss_fn: LossFn,
    params: Params,
    task: Task,
    *,
    steps: int,
    lr: float | jax.Array | PyTree,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One task's MAML objective: the query loss after adapting on the support set.

    Returns ``(query loss after adaptation, metrics)`` where the metrics hold
    the query loss (and aux values) before (``query_*_pre``, no gradient) and
    after (``query_*_post``) adaptation.
    """
    adapted = inner_adapt(
        loss_fn,
        params,
        task.support,
        steps=steps,
        lr=lr,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
        optimizer=inner_optimizer,
    )
    return query_before_after(loss_fn, params, adapted, task.query, has_aux=has_aux)


def maml_objective(
    loss_fn: LossFn,
    params: Params,
    tasks: Task,
    *,
    steps: int,
    lr: float | jax.Array | PyTree,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`maml_loss` with metrics: ``(mean query loss, mean metrics)``."""
    objective = functools.partial(
        task_objective,
        loss_fn,
        steps=steps,
        lr=lr,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
        inner_optimizer=inner_optimizer,
    )
    losses, metrics = map_tasks(lambda task: objective(params, task), tasks, chunk_size)
    return losses.mean(), mean_metrics(metrics)


def maml_loss(
    loss_fn: LossFn,
    params: Params,
    tasks: Task,
    *,
    steps: int,
    lr: float | jax.Array | PyTree,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> jax.Array:
    """The MAML meta-objective on a batch of tasks.

    The mean over tasks of each task's query loss after ``steps`` SGD steps
    on its support set.  ``jax.grad`` of this is the exact second-order
    meta-gradient (with ``first_order=True``, the first-order approximation).

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` returning a scalar, or
        ``(scalar, aux)`` with ``has_aux=True``.
      params: the initialisation being meta-learned.
      tasks: a :class:`~jaxmeta.Task` batch, every array with a leading task axis.
      steps: inner SGD steps.
      lr: inner learning rate, a scalar or a pytree like ``params``.
      first_order: drop the second-derivative term (first-order MAML).
      remat: rematerialise inner steps to save memory.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      The scalar meta-loss.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmeta import Task, maml_loss
      >>> loss = lambda w, b: jnp.mean((b[0] * w - b[1]) ** 2)
      >>> x = jnp.ones((4, 3)); tasks = Task((x, 2 * x), (x, 2 * x))
      >>> g = jax.grad(maml_loss, argnums=1)(loss, 0.0, tasks, steps=1, lr=0.1)
    """
    return maml_objective(
        loss_fn,
        params,
        tasks,
        steps=steps,
        lr=lr,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
        chunk_size=chunk_size,
    )[0]


def maml(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: float | PyTree,
    outer: optax.GradientTransformation,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> MetaLearner:
    """MAML: meta-learn an initialisation that adapts well in ``inner_steps`` steps.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      inner_steps: SGD steps on each task's support set.
      inner_lr: inner learning rate (scalar or pytree like the parameters).
      outer: the outer (meta) optimiser, e.g. ``optax.adam(1e-3)``.
      first_order: use the first-order approximation of the meta-gradient.
      remat: rematerialise each inner step (memory independent of steps).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).
      inner_optimizer: an optax optimiser for the inner loop instead of SGD at
        ``inner_lr`` (its state starts fresh for every task).  For the exact
        second-order gradient through Adam, use ``optax.adam(..., eps_root=1e-8)``.

    Returns:
      A :class:`MetaLearner` whose ``adapt`` takes the training's inner steps
      (SGD at ``inner_lr`` or ``inner_optimizer``) from the learned
      initialisation; ``step`` metrics: ``loss`` (the meta-loss),
      ``query_loss_pre``/``query_loss_post`` (and aux values likewise) and
      ``grad_norm``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxmeta import Task, maml
      >>> loss = lambda w, b: jnp.mean((b[0] * w - b[1]) ** 2)
      >>> learner = maml(loss, inner_steps=1, inner_lr=0.1, outer=optax.sgd(0.1))
      >>> x = jnp.ones((4, 3))
      >>> state, metrics = learner.step(learner.init(0.0), Task((x, 2 * x), (x, 2 * x)))
    """
    objective = functools.partial(
        maml_objective,
        loss_fn,
        steps=inner_steps,
        lr=inner_lr,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
        chunk_size=chunk_size,
        inner_optimizer=inner_optimizer,
    )

    def init(params: Params) -> MetaState:
        return init_state(outer, params)

    step = descend(outer, objective)

    rule = lambda params: Adaptation(params, inner_lr, optimizer=inner_optimizer)  # noqa: E731
    return MetaLearner(init, step, gradient_adapt(loss_fn, rule, has_aux=has_aux))


fomaml = functools.partial(maml, first_order=True)
fomaml.__doc__ = "First-order MAML: :func:`maml` with ``first_order=True``."
