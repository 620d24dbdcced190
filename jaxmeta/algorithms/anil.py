"""ANIL (Raghu, Raghu, Bengio & Vinyals, 2020): adapt only the head, meta-learn everything.

The network is split into a *body* (feature extractor) and a *head* (the last
layer).  For each task the body's features of the support and query sets are
computed **once**; the inner loop adapts only the head on the support
features, and the query loss of the adapted head is differentiated exactly
(second order through the head's adaptation) with respect to the head's
initialisation and, through the features, the body.

The API is generic over models:

* ``head`` names the head's parameters: a top-level key of a params dict (or a
  sequence of them) such as ``"head"`` for :class:`~jaxmeta.models.Conv4` or
  ``"Dense_2"`` for the default :class:`~jaxmeta.models.MLP`; or a predicate
  ``head(path, leaf) -> bool`` on :func:`jax.tree_util` key paths for any
  other pytree.  :func:`head_split` turns it into ``split``/``merge``.
* ``features_fn(body_params, x) -> features`` computes the body.
* ``head_loss_fn(head_params, (features, y))`` is the task loss of the head
  (a scalar, or ``(scalar, aux)`` with ``has_aux``).

For a Flax model whose head is a ``nn.Dense`` submodule called last,
:func:`flax_anil_fns` builds both functions from the model and a loss factory
of :mod:`jaxmeta.models`::

    model = conv4_omniglot(5)
    features_fn, head_loss_fn = flax_anil_fns(model, classification_loss, head="head")
    learner = anil(features_fn, head_loss_fn, head="head", inner_steps=5,
                   inner_lr=0.4, outer=optax.adam(1e-3), has_aux=True)

The state's ``params`` are the full model parameters (as for MAML).  The
learner's ``adapt`` fine-tunes the head alone, as in training, so
``jaxmeta.evaluate(learner, state, tasks, steps=..., loss_fn=loss_fn)`` scores
ANIL as it is trained (the rates are :func:`head_only_lr`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
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
    query_before_after,
)
from jaxmeta.inner import LossFn, inner_adapt
from jaxmeta.tasks import map_tasks
from jaxmeta.types import Batch, Params, PyTree, Task

FeaturesFn = Callable[[Params, jax.Array], jax.Array]
"""``features_fn(body_params, x) -> features``."""

HeadSpec = str | Sequence[str] | Callable[[tuple, Any], bool]
"""Top-level key(s) of a params dict, or a predicate ``head(key_path, leaf) -> bool``."""


class HeadSplit(NamedTuple):
    """Splits parameters into body and head and merges them back.

    Attributes:
      split: ``split(params) -> (body, head)``.
      merge: ``merge(body, head) -> params`` (the inverse of ``split``).
    """

    split: Callable[[Params], tuple[Params, Params]]
    merge: Callable[[Params, Params], Params]


def head_split(head: HeadSpec = "head") -> HeadSplit:
    """``split``/``merge`` functions for the head named by ``head``.

    Args:
      head: a top-level key (``"head"`` for ``Conv4``) or keys of a params
        dict: ``split`` returns two dicts, the head one holding just those
        keys; or a predicate ``head(key_path, leaf) -> bool`` marking head
        leaves of any pytree: ``split`` then returns two pytrees shaped like
        the params with ``None`` in place of the other part's leaves.

    Returns:
      A :class:`HeadSplit`.

    Raises:
      KeyError: (from ``split``) a named key is not in the params.
    """
    if callable(head):
        predicate = head

        def split_by_predicate(params: Params) -> tuple[Params, Params]:
            mask = jax.tree_util.tree_map_with_path(lambda path, leaf: bool(predicate(path, leaf)), params)
            body = jax.tree.map(lambda m, x: None if m else x, mask, params)
            head_params = jax.tree.map(lambda m, x: x if m else None, mask, params)
            return body, head_params

        def merge_by_predicate(body: Params, head_params: Params) -> Params:
            return jax.tree.map(lambda b, h: h if b is None else b, body, head_params, is_leaf=lambda x: x is None)

        return HeadSplit(split_by_predicate, merge_by_predicate)

    keys = (head,) if isinstance(head, str) else tuple(head)

    def split_by_keys(params: Params) -> tuple[Params, Params]:
        if not isinstance(params, Mapping):
            raise TypeError(f"head={head!r} names dict keys, but the params are a {type(params).__name__}")
        missing = [k for k in keys if k not in params]
        if missing:
            raise KeyError(f"head key(s) {missing} not in the params (keys: {sorted(params)})")
        body = {k: v for k, v in params.items() if k not in keys}
        return body, {k: params[k] for k in keys}

    def merge_by_keys(body: Params, head_params: Params) -> Params:
        return {**body, **head_params}

    return HeadSplit(split_by_keys, merge_by_keys)


def head_only_lr(params: Params, lr: float | jax.Array, *, head: HeadSpec = "head") -> PyTree:
    """A per-parameter learning-rate pytree: ``lr`` on the head, exactly 0 on the body.

    With it, MAML's inner loop (or :func:`jaxmeta.evaluate`) on the full
    model adapts only the head: the same adaptation as ANIL.

    Args:
      params: the full model parameters.
      lr: the head's inner learning rate (scalar).
      head: the head, as for :func:`head_split`.

    Returns:
      A pytree like ``params``.
    """
    parts = head_split(head)
    body, head_params = parts.split(params)
    zeros = jax.tree.map(jnp.zeros_like, body)
    rates = jax.tree.map(lambda p: jnp.full(jnp.shape(p), lr, jnp.result_type(p)), head_params)
    return parts.merge(zeros, rates)


def anil_loss_fn(features_fn: FeaturesFn, head_loss_fn: LossFn, *, head: HeadSpec = "head") -> LossFn:
    """The full model's loss ``loss_fn(params, (x, y))`` from the ANIL pieces.

    Args:
      features_fn: ``features_fn(body_params, x) -> features``.
      head_loss_fn: ``head_loss_fn(head_params, (features, y))``.
      head: the head, as for :func:`head_split`.

    Returns:
      ``loss_fn(params, (x, y)) = head_loss_fn(head, (features_fn(body, x), y))``.
    """
    split = head_split(head).split

    def loss_fn(params: Params, batch: Batch):
        body, head_params = split(params)
        x, y = batch
        return head_loss_fn(head_params, (features_fn(body, x), y))

    return loss_fn


def flax_features(model: nn.Module, *, head: str = "head") -> FeaturesFn:
    """The body of a Flax model whose output is its top-level submodule ``head`` applied last.

    The head's ``__call__`` is intercepted (``flax.linen.intercept_methods``)
    and returns its input, so ``model.apply`` stops at the features; the head's
    parameters are never read and need not be in ``body_params``.  This holds
    for :class:`~jaxmeta.models.Conv4` (``head="head"``, features after the
    global mean pool) and :class:`~jaxmeta.models.MLP` (the last ``nn.Dense``,
    ``head="Dense_2"`` with two hidden layers).

    Args:
      model: the Flax module (a ``params`` collection only).
      head: the name of the top-level submodule that produces the output.

    Returns:
      ``features_fn(body_params, x) -> features``.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name == "__call__"
            and module.name == head
            and module.scope is not None
            and tuple(module.scope.path) == (head,)
        ):
            return args[0]
        return next_fun(*args, **kwargs)

    def features_fn(body_params: Params, x: jax.Array) -> jax.Array:
        with nn.intercept_methods(interceptor):
            return model.apply({"params": body_params}, x)

    return features_fn


class DenseHead(NamedTuple):
    """A linear head applied from its parameters: ``features @ kernel + bias``.

    It has the ``apply({"params": head_params}, features)`` signature of a
    Flax module, where ``head_params = {name: {"kernel", "bias"}}`` (the
    layout of a Flax ``nn.Dense`` submodule called ``name``), so the loss
    factories of :mod:`jaxmeta.models` accept it:
    ``classification_loss(DenseHead("head"))`` is the head loss of ``Conv4``.

    Attributes:
      name: the head submodule's name.
    """

    name: str = "head"

    def apply(self, variables: Mapping[str, Params], features: jax.Array) -> jax.Array:
        """``features @ kernel + bias`` with the parameters ``variables["params"][name]``."""
        p = variables["params"][self.name]
        out = features @ p["kernel"]
        return out + p["bias"] if "bias" in p else out


def flax_anil_fns(
    model: nn.Module, make_loss: Callable[[Any], LossFn], *, head: str = "head"
) -> tuple[FeaturesFn, LossFn]:
    """``(features_fn, head_loss_fn)`` for a Flax model with an ``nn.Dense`` head called last.

    Args:
      model: e.g. ``conv4_omniglot(5)``.
      make_loss: a loss factory taking a module, e.g.
        :func:`~jaxmeta.models.classification_loss` or
        :func:`~jaxmeta.models.regression_loss`.
      head: the name of the ``nn.Dense`` submodule (``"head"`` for ``Conv4``).

    Returns:
      ``features_fn`` (:func:`flax_features`) and ``head_loss_fn =
      make_loss(DenseHead(head))``; ``anil_loss_fn`` of the two equals
      ``make_loss(model)``.
    """
    return flax_features(model, head=head), make_loss(DenseHead(head))


def anil_task_objective(
    features_fn: FeaturesFn,
    head_loss_fn: LossFn,
    params: Params,
    task: Task,
    *,
    head: HeadSpec = "head",
    steps: int,
    lr: float | jax.Array | PyTree,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One task's ANIL objective: the query loss after adapting the head on the support features.

    Returns:
      ``(query loss after adaptation, metrics)`` with ``query_*_pre`` (no
      gradient) and ``query_*_post`` metrics.
    """
    body, head_params = head_split(head).split(params)
    (xs, ys), (xq, yq) = task.support, task.query
    support = (features_fn(body, xs), ys)
    query = (features_fn(body, xq), yq)
    adapted = inner_adapt(
        head_loss_fn,
        head_params,
        support,
        steps=steps,
        lr=lr,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
    )
    return query_before_after(head_loss_fn, head_params, adapted, query, has_aux=has_aux)


def anil_objective(
    features_fn: FeaturesFn,
    head_loss_fn: LossFn,
    params: Params,
    tasks: Task,
    *,
    head: HeadSpec = "head",
    steps: int,
    lr: float | jax.Array | PyTree,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ANIL meta-objective with metrics: ``(mean query loss, mean metrics)``.

    Args:
      features_fn: ``features_fn(body_params, x) -> features``.
      head_loss_fn: ``head_loss_fn(head_params, (features, y))``.
      params: the full model parameters (body and head).
      tasks: a :class:`~jaxmeta.Task` batch with a leading task axis.
      head: the head, as for :func:`head_split`.
      steps: inner steps on the head.
      lr: the head's inner learning rate (scalar, or a pytree like the head).
      first_order: drop the second-derivative term of the head adaptation.
      remat: rematerialise inner steps.
      has_aux: whether ``head_loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      ``(loss, metrics)``; ``jax.grad`` of ``loss`` is the exact ANIL meta-gradient.
    """
    objective = functools.partial(
        anil_task_objective,
        features_fn,
        head_loss_fn,
        head=head,
        steps=steps,
        lr=lr,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
    )
    losses, metrics = map_tasks(lambda task: objective(params, task), tasks, chunk_size)
    return losses.mean(), mean_metrics(metrics)


def anil(
    features_fn: FeaturesFn,
    head_loss_fn: LossFn,
    *,
    head: HeadSpec = "head",
    inner_steps: int,
    inner_lr: float | PyTree,
    outer: optax.GradientTransformation,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> MetaLearner:
    """ANIL: MAML with only the head adapted in the inner loop.

    The body runs once per task and set (support, query), not once per inner
    step, and the second-order terms involve only the head, so a meta-step
    costs little more than one forward and backward pass of the body.

    Args:
      features_fn: ``features_fn(body_params, x) -> features`` (see :func:`flax_features`).
      head_loss_fn: ``head_loss_fn(head_params, (features, y))`` (see :class:`DenseHead`).
      head: the head's key(s) in the params dict or a key-path predicate
        (:func:`head_split`); ``"head"`` for ``Conv4``.
      inner_steps: SGD steps on the head.
      inner_lr: the head's inner learning rate (scalar or pytree like the head).
      outer: the outer optimiser, applied to all parameters.
      first_order: first-order approximation of the head adaptation.
      remat: rematerialise each inner step.
      has_aux: whether ``head_loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`MetaLearner` over the full model parameters, whose ``adapt``
      takes SGD steps on the head alone; ``step`` metrics:
      ``loss``, ``query_loss_pre``/``query_loss_post`` (and aux values) and
      ``grad_norm``.
    """
    objective = functools.partial(
        anil_objective,
        features_fn,
        head_loss_fn,
        head=head,
        steps=inner_steps,
        lr=inner_lr,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
        chunk_size=chunk_size,
    )

    def init(params: Params) -> MetaState:
        head_split(head).split(params)  # fail early on a wrong head name
        return init_state(outer, params)

    step = descend(outer, objective)

    rule = lambda params: Adaptation(params, head_only_lr(params, inner_lr, head=head))  # noqa: E731
    adapt = gradient_adapt(anil_loss_fn(features_fn, head_loss_fn, head=head), rule, has_aux=has_aux)
    return MetaLearner(init, step, adapt)
