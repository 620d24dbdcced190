"""The model pre-training baseline of the MAML paper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmeta.algorithms.base import (
    Adaptation,
    MetaLearner,
    MetaState,
    descend,
    gradient_adapt,
    init_state,
    mean_metrics,
    scored,
)
from jaxmeta.inner import LossFn
from jaxmeta.tasks import map_tasks
from jaxmeta.types import Params, PyTree, Task


def all_data(task: Task):
    """A task's support and query sets joined into one ``(x, y)`` batch."""
    return tuple(jnp.concatenate([s, q], axis=0) for s, q in zip(task.support, task.query))


def pretrain_loss(
    loss_fn: LossFn, params: Params, tasks: Task, *, has_aux: bool = False, chunk_size: int | None = None
):
    """Mean loss of the *current* parameters on all data of every task: ``(loss, metrics)``."""

    def per_task(task):
        loss, _ = scored(loss_fn, params, all_data(task), "train", has_aux=has_aux)
        _, query = scored(loss_fn, jax.lax.stop_gradient(params), task.query, "query", has_aux=has_aux)
        return loss, {f"{k}_pre": v for k, v in query.items()}

    losses, metrics = map_tasks(per_task, tasks, chunk_size)
    return losses.mean(), mean_metrics(metrics)


def pretrain(
    loss_fn: LossFn,
    *,
    optimizer: optax.GradientTransformation,
    has_aux: bool = False,
    chunk_size: int | None = None,
    finetune_lr: float | PyTree = 0.01,
    finetune_optimizer: optax.GradientTransformation | None = None,
) -> MetaLearner:
    """Pre-training on all tasks: the baseline MAML is compared with.

    It minimises the loss of the **current** parameters on every task's data
    (support and query joined), with no adaptation inside the objective;
    MAML instead minimises the loss of the parameters *after* adaptation.
    At test time the pre-trained parameters are fine-tuned like MAML's.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      optimizer: the optax optimiser, e.g. ``optax.adam(1e-3)``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).
      finetune_lr: the SGD rate with which ``adapt`` fine-tunes the
        pre-trained parameters on a support set (as MAML's inner rate).
      finetune_optimizer: fine-tune with this optax optimiser instead (e.g.
        Adam, as the translation experiment fine-tunes every method).

    Returns:
      A :class:`MetaLearner`; metrics ``loss``, ``query_loss_pre`` (and aux
      values) and ``grad_norm``.
    """

    def init(params: Params) -> MetaState:
        return init_state(optimizer, params)

    step = descend(optimizer, lambda p, tasks: pretrain_loss(loss_fn, p, tasks, has_aux=has_aux,
                                                            chunk_size=chunk_size))

    rule = lambda params: Adaptation(params, finetune_lr, optimizer=finetune_optimizer)  # noqa: E731
    return MetaLearner(init, step, gradient_adapt(loss_fn, rule, has_aux=has_aux))
