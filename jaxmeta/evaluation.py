"""Adapt-then-score evaluation over many test tasks, with 95% confidence intervals."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmeta.algorithms.base import map_tasks
from jaxmeta.inner import LossFn, adapt_and_observe, loss_value
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


def ci95(values: jax.Array, axis: int = 0) -> jax.Array:
    """Half-width of the normal-approximation 95% confidence interval of the mean."""
    n = values.shape[axis]
    std = jnp.std(values, axis=axis, ddof=1) if n > 1 else jnp.zeros_like(jnp.mean(values, axis))
    return 1.96 * std / np.sqrt(n)


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "steps", "has_aux", "optimizer", "chunk_size", "proximal")
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

    Returns:
      An :class:`EvalResult` with the query loss (and aux metrics) after 0..S steps.
    """

    def observe_query(task):
        def observe(p):
            loss, aux = loss_value(loss_fn, p, task.query, has_aux=has_aux)
            return {"loss": loss, **aux}

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
        )
        return seen

    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    chunk = None if chunk_size is None or chunk_size >= num_tasks else chunk_size
    per_task = map_tasks(observe_query, tasks, chunk)
    mean = {k: jnp.mean(v, axis=0) for k, v in per_task.items()}
    return EvalResult(mean, {k: ci95(v) for k, v in per_task.items()}, per_task)
