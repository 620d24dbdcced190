"""Meta-SGD (Li, Zhou, Chen & Li, 2017): meta-learn the initialisation and per-parameter rates.

The meta-parameters are ``{"params": θ, "lr": α}`` where ``α`` is a pytree
shaped like ``θ`` (one inner learning rate per parameter entry).  A task is
adapted with ``φ = θ − α ⊙ ∇L_support(θ)`` (repeated ``inner_steps`` times),
and both ``θ`` and ``α`` follow the gradient of the query loss at ``φ``.
"""

from __future__ import annotations

import functools

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
    meta_params,
)
from jaxmeta.algorithms.maml import maml_objective
from jaxmeta.inner import LossFn
from jaxmeta.types import Params, PyTree, Task


def meta_sgd_init(params: Params, init_lr: float | PyTree) -> dict[str, PyTree]:
    """The meta-parameters ``{"params": params, "lr": α}`` with ``α`` filled with ``init_lr``.

    Args:
      params: the model parameters θ (any pytree of arrays).
      init_lr: a scalar (every rate starts there) or a pytree like ``params``.

    Returns:
      ``{"params": params, "lr": α}``, ``α`` shaped and typed like ``params``.
    """
    if isinstance(init_lr, (int, float)) or (hasattr(init_lr, "ndim") and jnp.ndim(init_lr) == 0):
        lr = jax.tree.map(lambda p: jnp.full(jnp.shape(p), init_lr, jnp.result_type(p)), params)
    else:
        lr = jax.tree.map(lambda p, r: jnp.broadcast_to(jnp.asarray(r, jnp.result_type(p)), jnp.shape(p)),
                          params, init_lr)
    return {"params": params, "lr": lr}


def meta_sgd_params(state: MetaState | dict[str, PyTree]) -> tuple[Params, PyTree]:
    """The meta-learned ``(params, lr)`` of a Meta-SGD state, for evaluation.

    Args:
      state: a Meta-SGD :class:`MetaState` or its ``params`` dict.

    Returns:
      ``(θ, α)``, with which the learner's ``adapt`` (and :func:`jaxmeta.evaluate`) adapts.
    """
    meta = meta_params(state)
    return meta["params"], meta["lr"]


def meta_sgd_objective(
    loss_fn: LossFn,
    meta_params: dict[str, PyTree],
    tasks: Task,
    *,
    steps: int,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Meta-SGD meta-objective with metrics: ``(mean query loss, mean metrics)``.

    It is MAML's objective with the learned per-parameter rates as the inner
    learning rate; ``jax.grad`` with respect to ``meta_params`` differentiates
    both the initialisation and the rates.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      meta_params: ``{"params": θ, "lr": α}`` (see :func:`meta_sgd_init`).
      tasks: a :class:`~jaxmeta.Task` batch with a leading task axis.
      steps: inner steps.
      first_order: drop the second-derivative term (``α`` still gets a gradient).
      remat: rematerialise inner steps to save memory.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      ``(loss, metrics)`` with ``query_*_pre`` and ``query_*_post`` metrics.
    """
    params, lr = meta_sgd_params(meta_params)
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
    )


def meta_sgd(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    init_lr: float | PyTree,
    outer: optax.GradientTransformation,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> MetaLearner:
    """Meta-SGD: meta-learn the initialisation θ and a learning rate for every parameter.

    ``init(params)`` takes the plain model parameters; the state's ``params``
    are ``{"params": θ, "lr": α}`` (get them with :func:`meta_sgd_params`),
    and the outer optimiser updates both jointly.  Li et al. use a single
    inner step (``inner_steps=1``); more steps reuse the same ``α``.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      inner_steps: inner SGD steps with the learned rates.
      init_lr: initial value of every rate (scalar), or a pytree like the parameters.
      outer: the outer optimiser, applied to ``{"params": θ, "lr": α}``.
      first_order: first-order meta-gradient (``α`` is still learned: the
        adapted parameters depend on it linearly).
      remat: rematerialise each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`MetaLearner` whose ``adapt`` steps with the learned rates ``α``
      (any number of steps); ``step`` metrics: ``loss``, ``query_loss_pre``,
      ``query_loss_post`` (and aux values likewise), ``grad_norm`` (over θ and
      α) and ``lr_mean`` (the mean learned rate).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxmeta import Task
      >>> loss = lambda w, b: jnp.mean((b[0] * w - b[1]) ** 2)
      >>> learner = meta_sgd(loss, inner_steps=1, init_lr=0.1, outer=optax.sgd(0.01))
      >>> x = jnp.ones((4, 3))
      >>> state, metrics = learner.step(learner.init(jnp.zeros(())), Task((x, 2 * x), (x, 2 * x)))
      >>> params, lr = meta_sgd_params(state)
    """
    objective = functools.partial(
        meta_sgd_objective,
        loss_fn,
        steps=inner_steps,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
        chunk_size=chunk_size,
    )

    def init(params: Params) -> MetaState:
        return init_state(outer, meta_sgd_init(params, init_lr))

    def step(state: MetaState, tasks: Task):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, tasks)
        rates = jax.tree.leaves(state.params["lr"])
        lr_mean = sum(jnp.sum(r) for r in rates) / max(sum(jnp.size(r) for r in rates), 1)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads), "lr_mean": lr_mean}
        return apply_outer(outer, state, grads), metrics

    adapt = gradient_adapt(loss_fn, lambda p: Adaptation(*meta_sgd_params(p)), has_aux=has_aux)
    return MetaLearner(init, step, adapt)
