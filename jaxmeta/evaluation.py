"""Adapt-then-score evaluation over many test tasks, with 95% confidence intervals."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmeta.algorithms.base import MetaLearner, MetaState
from jaxmeta.inner import LossFn, loss_value
from jaxmeta.tasks import map_tasks
from jaxmeta.types import PyTree, Task


class EvalResult(NamedTuple):
    """Query metrics after 0, 1, ..., S inner steps (after S alone with ``every_step=False``: ``[1]``).

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


def query_loss(loss_fn: LossFn, *, has_aux: bool = False) -> Callable:
    """The default query score: ``loss_fn`` on the whole query set in one batch, as ``(loss, aux)``."""

    def score(params, support, query):
        del support
        return loss_value(loss_fn, params, query, has_aux=has_aux)

    return score


@functools.partial(jax.jit,
                   static_argnames=("learner", "steps", "loss_fn", "has_aux", "query_score", "chunk_size",
                                    "every_step"))
def evaluate(
    learner: MetaLearner,
    state: MetaState | PyTree,
    tasks: Task,
    *,
    steps: int,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    query_score: Callable | None = None,
    chunk_size: int | None = 50,
    key: jax.Array | None = None,
    first_task: int | jax.Array = 0,
    every_step: bool = True,
) -> EvalResult:
    """Adapts ``learner`` to every test task with its own rule and scores the query set after each step.

    Any learner is evaluated the same way: its ``adapt`` (MAML's SGD, Meta-SGD's
    learned rates, MAML++'s per-step rates, ANIL's head, iMAML's proximal
    problem, Reptile's inner optimiser, pre-training's fine-tuning) observes
    the query score after 0, 1, ..., ``steps`` steps.

    Args:
      learner: a :class:`~jaxmeta.MetaLearner` (only its ``adapt`` is used).
      state: its :class:`~jaxmeta.MetaState` (or the state's ``params``).
      tasks: test tasks, every array with a leading task axis.
      steps: inner steps S; may exceed those used in meta-training.
      loss_fn: ``loss_fn(params, (x, y))`` scoring the whole query set in one
        batch (scalar, or ``(scalar, aux)`` with ``has_aux``; aux values such
        as accuracy are reported alongside the loss).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      query_score: ``score(params, support, query) -> (loss, aux)``, instead of
        ``loss_fn`` (e.g.
        :func:`jaxmeta.models.non_transductive_classification_score`).
      chunk_size: tasks adapted at once (bounds memory); ``None`` for all.
      key: seeds any randomness of the rule (task ``i`` uses ``fold_in(key, i)``;
        default ``PRNGKey(0)``), e.g. Reptile's test mini-batches.
      first_task: the index ``i`` of ``tasks``' first task, so that an evaluation
        run a slice of tasks at a time gives every task the key it has in one
        call (traced: slices share one compiled program).
      every_step: score the query set after every step 0..S (the default), or
        only after the last (``False``: every metric has one entry, after S
        steps), when scoring costs far more than a step: a non-transductive
        score puts the support set through the network once per query example,
        so scoring 51 times dominates an evaluation of 50 steps.

    Returns:
      An :class:`EvalResult` with the query loss (and aux metrics) after 0..S steps.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxmeta import Task, maml
      >>> loss = lambda w, b: jnp.mean((b[0] * w - b[1]) ** 2)
      >>> learner = maml(loss, inner_steps=1, inner_lr=0.1, outer=optax.sgd(0.1))
      >>> x = jnp.ones((2, 4, 1))
      >>> result = evaluate(learner, learner.init(0.0), Task((x, 2 * x), (x, 2 * x)), steps=3, loss_fn=loss)
      >>> [round(float(v), 2) for v in result.mean["loss"]]
      [4.0, 2.56, 1.64, 1.05]
    """
    if (loss_fn is None) == (query_score is None):
        raise ValueError("give exactly one of loss_fn (score the query batch) and query_score")
    score = query_score if query_score is not None else query_loss(loss_fn, has_aux=has_aux)
    base_key = jax.random.PRNGKey(0) if key is None else key

    def observe_query(xs):
        task, index = xs

        def observe(params):
            loss, aux = score(params, task.support, task.query)
            return {"loss": loss, **aux}

        task_key = jax.random.fold_in(base_key, index)
        if not every_step:
            return jax.tree.map(lambda x: x[None], observe(learner.adapt(state, task.support, steps=steps,
                                                                         key=task_key)))
        _, seen = learner.adapt(state, task.support, steps=steps, key=task_key, observe=observe)
        return seen

    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    chunk = None if chunk_size is None or chunk_size >= num_tasks else chunk_size
    per_task = map_tasks(observe_query, (tasks, first_task + jnp.arange(num_tasks)), chunk)
    mean = {k: jnp.mean(v, axis=0) for k, v in per_task.items()}
    return EvalResult(mean, {k: ci95(v) for k, v in per_task.items()}, per_task)
