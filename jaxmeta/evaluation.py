"""Adapt-then-score evaluation over many test tasks, with 95% confidence intervals."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmeta.algorithms.base import map_tasks
from jaxmeta.inner import LossFn, adapt_and_observe, loss_value, task_schedule
from jaxmeta.types import Params, PyTree, Task


class EvalResult(NamedTuple):
    """Query metrics after 0, 1, ..., S inner steps.

    Attributes:
      mean: metric name (``"loss"`` and any aux names) → ``[S + 1]`` means over tasks.
      ci95: the same names → ``[S + 1]`` half-widths of 95% confidence intervals
        (1.96 standard errors, as in the MAML and Prototypical Networks papers).
      per_task: the same names → ``[tasks, S + 1]`` values.
    """

    mean: dict[str, jax.Array]
    ci95: dict[str, jax.Array]
    per_task: dict[str, jax.Array]


def query_observer(loss_fn: LossFn, task: Task, *, has_aux: bool, query_score: Callable | None = None):
    """``observe(params) -> {"loss", aux...}`` on ``task``'s query set (see :func:`evaluate`'s ``query_score``)."""

    def observe(p):
        if query_score is None:
            loss, aux = loss_value(loss_fn, p, task.query, has_aux=has_aux)
        else:
            loss, aux = query_score(p, task.support, task.query)
        return {"loss": loss, **aux}

    return observe


def ci95(values: jax.Array, axis: int = 0) -> jax.Array:
    """Half-width of the normal-approximation 95% confidence interval of the mean."""
    n = values.shape[axis]
    std = jnp.std(values, axis=axis, ddof=1) if n > 1 else jnp.zeros_like(jnp.mean(values, axis))
    return 1.96 * std / np.sqrt(n)


@functools.partial(
    jax.jit,
    static_argnames=("loss_fn", "steps", "has_aux", "optimizer", "chunk_size", "proximal", "query_score",
                     "inner_batch_size"),
)
def evaluate(
    loss_fn: LossFn,
    params: Params,
    tasks: Task,
    *,
    steps: int,
    lr: float | jax.Array | PyTree,
    has_aux: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    chunk_size: int | None = 50,
    proximal: float | None = None,
    query_score: Callable | None = None,
    opt_state: optax.OptState | None = None,
    inner_batch_size: int | None = None,
    key: jax.Array | None = None,
) -> EvalResult:
    """Adapts to every test task and scores its query set after each inner step.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      params: the (meta-learned) initialisation.
      tasks: test tasks, every array with a leading task axis.
      steps: inner steps S; may exceed those used in meta-training.
      lr: inner learning rate (scalar or pytree like ``params``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux values such as
        accuracy are reported alongside the loss.
      optimizer: optional optax inner optimiser instead of SGD.
      chunk_size: tasks adapted at once (bounds memory); ``None`` for all.
      proximal: λ of a proximal term ``(λ/2)·||φ − params||²`` added to the
        support loss (iMAML's inner problem, see :func:`jaxmeta.inner_adapt`).
      query_score: ``score(params, support, query) -> (loss, aux)``, how the
        adapted parameters are scored (e.g.
        :func:`jaxmeta.models.non_transductive_classification_score`);
        ``None`` scores the query set in one batch with ``loss_fn``.
      opt_state: the inner optimiser's starting state for every task (e.g.
        Reptile's carried Adam state); ``None``: a fresh one.
      inner_batch_size: support examples per inner step, drawn without
        replacement (:func:`jaxmeta.inner.minibatch_schedule`); ``None``: all.
      key: seeds those draws (task ``i`` uses ``fold_in(key, i)``; default
        ``PRNGKey(0)``).

    Returns:
      An :class:`EvalResult` with the query loss (and aux metrics) after 0..S steps.
    """

    base_key = jax.random.PRNGKey(0) if key is None else key

    def observe_query(xs):
        task, index = xs
        observe = query_observer(loss_fn, task, has_aux=has_aux, query_score=query_score)
        batches = task_schedule(jax.random.fold_in(base_key, index), task.support, steps, inner_batch_size)
        _, seen = adapt_and_observe(
            loss_fn,
            params,
            task.support,
            steps=steps,
            lr=lr,
            optimizer=optimizer,
            has_aux=has_aux,
            observe=observe,
            proximal=proximal,
            batches=batches,
            opt_state=opt_state,
        )
        return seen

    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    chunk = None if chunk_size is None or chunk_size >= num_tasks else chunk_size
    per_task = map_tasks(observe_query, (tasks, jnp.arange(num_tasks)), chunk)
    mean = {k: jnp.mean(v, axis=0) for k, v in per_task.items()}
    return EvalResult(mean, {k: ci95(v) for k, v in per_task.items()}, per_task)
