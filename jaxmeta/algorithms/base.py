"""The meta-learner interface, in the optax style: a NamedTuple of pure functions."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmeta.inner import LossFn, loss_value
from jaxmeta.types import Batch, Params, PyTree, Task


class MetaState(NamedTuple):
    """State of a meta-learner.

    Attributes:
      params: the meta-learned parameters (the initialisation).
      opt_state: the outer optimiser's state.
      step: number of meta-updates applied so far (int32 scalar).
    """

    params: Params
    opt_state: optax.OptState
    step: jax.Array


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as two pure, jit-compatible functions.

    Attributes:
      init: ``init(params) -> MetaState``.
      step: ``step(state, tasks) -> (state, metrics)``, one meta-update on a
        batch of tasks (every array with a leading task axis). ``metrics`` is a
        dict of scalars that always holds ``"loss"``, the meta-objective.
    """

    init: Callable[[Params], MetaState]
    step: Callable[[MetaState, Task], tuple[MetaState, dict[str, jax.Array]]]


def init_state(outer: optax.GradientTransformation, params: Params) -> MetaState:
    """A fresh :class:`MetaState` for ``params`` and the outer optimiser ``outer``."""
    return MetaState(params=params, opt_state=outer.init(params), step=jnp.zeros((), jnp.int32))


def apply_outer(
    outer: optax.GradientTransformation, state: MetaState, grads: PyTree
) -> MetaState:
    """Applies one outer-optimiser update of ``grads`` to ``state``."""
    updates, opt_state = outer.update(grads, state.opt_state, state.params)
    return MetaState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)


def map_tasks(fn: Callable, tasks: PyTree, chunk_size: int | None = None):
    """Maps ``fn`` over the leading task axis: ``vmap``, or ``lax.map`` in chunks.

    ``chunk_size=None`` vectorises over all tasks at once; an integer runs
    ``chunk_size`` tasks at a time (vectorised within a chunk), which bounds
    memory and can be faster on CPUs.
    """
    if chunk_size is None:
        return jax.vmap(fn)(tasks)
    return jax.lax.map(fn, tasks, batch_size=chunk_size)


def scored(
    loss_fn: LossFn, params: Params, batch: Batch, prefix: str, *, has_aux: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``loss_fn`` on ``batch`` as ``(loss, {prefix_loss, prefix_<aux>...})``."""
    loss, aux = loss_value(loss_fn, params, batch, has_aux=has_aux)
    names = {"loss": loss, **aux}
    return loss, {f"{prefix}_{k}": v for k, v in names.items()}


def mean_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Averages per-task metrics over the task axis."""
    return {k: jnp.mean(v) for k, v in metrics.items()}


def query_before_after(
    loss_fn: LossFn, params: Params, adapted: Params, query: Batch, *, has_aux: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Query loss after adaptation, with metrics before (``*_pre``) and after (``*_post``).

    The "before" values carry no gradient.
    """
    post_loss, post = scored(loss_fn, adapted, query, "query", has_aux=has_aux)
    _, pre = scored(loss_fn, jax.lax.stop_gradient(params), query, "query", has_aux=has_aux)
    metrics = {f"{k}_pre": v for k, v in pre.items()}
    metrics.update({f"{k}_post": v for k, v in post.items()})
    return post_loss, metrics
