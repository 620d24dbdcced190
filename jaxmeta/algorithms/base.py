"""The meta-learner interface, in the optax style: a NamedTuple of pure functions."""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxmeta.inner import LossFn, adapt_with_state, loss_value, task_schedule
from jaxmeta.tasks import map_tasks
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


class Adapt(Protocol):
    """``adapt(state, support, *, steps, key=None, observe=None)``: a learner's test-time adaptation.

    ``state`` is the learner's :class:`MetaState` (or its ``params``), ``support``
    one task's support set, ``steps`` the inner steps (any number, also more
    than in training), ``key`` seeds any randomness of the rule (Reptile's
    mini-batches). Returns the adapted model parameters, ready for the model;
    with ``observe``, ``(adapted, observed)`` where ``observed`` stacks
    ``observe(params)`` after 0, 1, ..., ``steps`` steps (what
    :func:`jaxmeta.evaluate` scores).
    """

    def __call__(self, state: MetaState | PyTree, support: Batch, *, steps: int, key: jax.Array | None = None,
                 observe: Callable[[Params], PyTree] | None = None) -> Params | tuple[Params, PyTree]: ...


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as three pure, jit-compatible functions.

    Attributes:
      init: ``init(params) -> MetaState``.
      step: ``step(state, tasks) -> (state, metrics)``, one meta-update on a
        batch of tasks (every array with a leading task axis). ``metrics`` is a
        dict of scalars that always holds ``"loss"``, the meta-objective.
      adapt: ``adapt(state, support, *, steps, key=None, observe=None) ->
        adapted params``, the learner's own test-time rule (:class:`Adapt`):
        MAML's SGD, Meta-SGD's learned rates, ANIL's head-only steps, ...
    """

    init: Callable[[Params], MetaState]
    step: Callable[[MetaState, Task], tuple[MetaState, dict[str, jax.Array]]]
    adapt: Adapt


class Adaptation(NamedTuple):
    """A gradient-descent test-time rule, read off a learner's meta-parameters (:func:`gradient_adapt`)."""

    params: Params
    """The initial parameters."""
    lr: PyTree
    """The inner learning rate: a scalar or a pytree like ``params``."""
    proximal: float | None = None
    """λ of iMAML's proximal term ``(λ/2)·||φ − params||²`` on the support loss, else ``None``."""
    optimizer: optax.GradientTransformation | None = None
    """The inner optimiser (``None``: SGD at ``lr``)."""
    opt_state: PyTree | None = None
    """Its starting state (Reptile's carried state), else a fresh one."""


def meta_params(state: MetaState | PyTree) -> PyTree:
    """The meta-parameters of a :class:`MetaState`, or ``state`` itself when it holds them already."""
    return state.params if isinstance(state, MetaState) else state


def gradient_adapt(loss_fn: LossFn, rule: Callable[[PyTree], Adaptation], *, has_aux: bool = False,
                   batch_size: int | None = None) -> Adapt:
    """The :class:`Adapt` of a learner that adapts by gradient steps on the support loss.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      rule: ``rule(meta_params) -> Adaptation``: the initialisation, rates,
        proximal term and inner optimiser the learner's meta-parameters give.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      batch_size: support examples per step, drawn without replacement from
        ``key`` (:func:`jaxmeta.inner.minibatch_schedule`); ``None``: all.
    """

    def adapt(state, support, *, steps, key=None, observe=None):
        r = rule(meta_params(state))
        batches = task_schedule(jax.random.PRNGKey(0) if key is None else key, support, steps, batch_size)
        adapted, _, seen = adapt_with_state(loss_fn, r.params, support, steps=steps, lr=r.lr, has_aux=has_aux,
                                            proximal=r.proximal, optimizer=r.optimizer, opt_state=r.opt_state,
                                            batches=batches, observe=observe)
        return adapted if observe is None else (adapted, seen)

    return adapt


def amortized(rule: Callable[[Params, Batch], Params], loss_fn: LossFn, *, outer: optax.GradientTransformation,
              has_aux: bool = False, chunk_size: int | None = None) -> MetaLearner:
    """A learner whose adaptation is one differentiable function of the support set, with no inner steps.

    Prototypical Networks (the prototypes become the head) and the in-context
    learner (the support set becomes the model's context) are such learners:
    ``rule(params, support)`` returns adapted parameters, ``step`` minimises
    the query loss of ``rule``'s output over the task batch, and ``adapt``
    is ``rule`` (every step count observes the same adapted parameters).

    Args:
      rule: ``rule(meta_params, support) -> adapted params``, differentiable in ``meta_params``.
      loss_fn: ``loss_fn(adapted, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      outer: the optax optimiser of the meta-parameters.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`MetaLearner`; ``step`` metrics ``loss``, ``query_loss_post``
      (and aux values) and ``grad_norm``.
    """

    def task_loss(params: Params, task: Task):
        loss, aux = loss_value(loss_fn, rule(params, task.support), task.query, has_aux=has_aux)
        return loss, {f"query_{k}_post": v for k, v in {"loss": loss, **aux}.items()}

    def objective(params: Params, tasks: Task):
        losses, metrics = map_tasks(lambda task: task_loss(params, task), tasks, chunk_size)
        return losses.mean(), mean_metrics(metrics)

    def init(params: Params) -> MetaState:
        return init_state(outer, params)

    step = descend(outer, objective)

    def adapt(state, support, *, steps, key=None, observe=None):
        del key
        adapted = rule(meta_params(state), support)
        if observe is None:
            return adapted
        seen = observe(adapted)
        return adapted, jax.tree.map(lambda v: jnp.broadcast_to(v, (steps + 1, *jnp.shape(v))), seen)

    return MetaLearner(init, step, adapt)


def descend(outer: optax.GradientTransformation,
            objective: Callable[[Params, Task], tuple[jax.Array, dict[str, jax.Array]]]) -> Callable:
    """``step(state, tasks)``: one ``outer`` update down the gradient of ``objective(params, tasks) -> (loss, metrics)``.

    The step's metrics are ``loss``, the objective's metrics and ``grad_norm``.
    """

    def step(state: MetaState, tasks: Task):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, tasks)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        return apply_outer(outer, state, grads), metrics

    return step


def init_state(outer: optax.GradientTransformation, params: Params) -> MetaState:
    """A fresh :class:`MetaState` for ``params`` and the outer optimiser ``outer``."""
    return MetaState(params=params, opt_state=outer.init(params), step=jnp.zeros((), jnp.int32))


def apply_outer(
    outer: optax.GradientTransformation, state: MetaState, grads: PyTree
) -> MetaState:
    """Applies one outer-optimiser update of ``grads`` to ``state``."""
    updates, opt_state = outer.update(grads, state.opt_state, state.params)
    return MetaState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)


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
