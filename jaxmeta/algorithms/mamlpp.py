"""MAML++ (Antoniou, Edwards & Storkey, 2019): the generic stabilisers of MAML.

Each stabiliser is a switch of :func:`mamlpp`:

* **Multi-step loss (MSL)**: the meta-objective is a weighted sum of the query
  losses after *every* inner step; the weights start uniform and are annealed
  toward the final step (:func:`msl_weights`, the schedule of the MAML++
  reference code), after which only the final step counts.
* **Learned per-layer per-step inner rates (LSLR)**: one learning rate per
  parameter leaf (a layer's kernel or bias) and inner step, meta-learned
  with the initialisation: ``lr`` is a pytree like the params whose leaves
  have shape ``[inner_steps]``.
* **Derivative-order annealing (DA)**: first-order meta-gradients for the
  first ``derivative_order_anneal_steps`` meta-steps, exact second-order ones
  afterwards, switched by a traced ``lax.cond`` so one compiled step serves both.
* **Cosine annealing of the outer learning rate (CA)**: the outer updates are
  scaled by ``optax.cosine_decay_schedule(1, total_steps, alpha)``, which for
  Adam or SGD is cosine annealing of the meta learning rate.
* **Per-step batch-norm weights and biases (BNWB)**, with ``per_step_bn=True``:
  every batch-norm leaf (:func:`is_batch_norm`; any predicate on key paths)
  gets a leading ``[inner_steps + 1]`` axis, and the network after ``t`` inner
  steps uses row ``t``: the support loss of step ``t + 1`` and the query loss
  after ``t`` steps see row ``t`` (row 0 the initialisation, row ``N`` the
  adapted network).  The rows are meta-learned and not adapted in the inner
  loop (the reference code's default), so the inner loop adapts the other
  leaves only.  It is a composition, not a model change: the step's rows are
  selected by :func:`per_step_view` and merged into ordinary parameters
  before ``loss_fn`` sees them.

Per-step batch-norm running statistics (BNRS) have nothing to act on here:
:class:`~jaxmeta.models.Conv4` uses stateless transductive batch norm, so
every inner step already normalises with the statistics of its own batch and
no running averages exist to be kept per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxmeta.algorithms.anil import head_split
from jaxmeta.algorithms.base import (
    MetaLearner,
    MetaState,
    apply_outer,
    init_state,
    mean_metrics,
    meta_params,
    scored,
)
from jaxmeta.inner import LossFn, StepView, adapt_and_observe
from jaxmeta.tasks import map_tasks
from jaxmeta.types import Batch, Params, PyTree, Task

LeafPredicate = Callable[[tuple, object], bool]
"""``predicate(key_path, leaf) -> bool`` on :func:`jax.tree_util` key paths."""


def msl_weights(
    step: int | jax.Array, *, steps: int, anneal_steps: int, min_weight: float = 0.03
) -> jax.Array:
    """Multi-step-loss weights of the query losses after inner steps 1..``steps``.

    The MAML++ reference schedule with meta-steps in place of epochs: at meta-step
    ``t`` every non-final weight is ``max(1/N − t/(N·T), min_weight/N)`` and the
    final one ``min(1/N + t(N−1)/(N·T), 1 − (N−1)·min_weight/N)`` (they sum to
    1); from ``t = T = anneal_steps`` on, all weight is on the final step.

    Args:
      step: the meta-step ``t`` (may be traced).
      steps: the number of inner steps ``N``.
      anneal_steps: ``T``, meta-steps over which the weights are annealed.
      min_weight: the non-final weights' floor is ``min_weight / N``.

    Returns:
      ``[steps]`` weights.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if anneal_steps < 1:
        raise ValueError(f"anneal_steps must be >= 1, got {anneal_steps}")
    n = steps
    t = jnp.asarray(step, jnp.float32)
    decay = 1.0 / n / anneal_steps
    floor = min_weight / n
    early = jnp.maximum(1.0 / n - t * decay, floor)
    last = jnp.minimum(1.0 / n + t * (n - 1) * decay, 1.0 - (n - 1) * floor)
    annealed = jnp.concatenate([jnp.full((n - 1,), early), last[None]])
    return jnp.where(t < anneal_steps, annealed, final_step_weights(n))


def final_step_weights(steps: int) -> jax.Array:
    """``[0, ..., 0, 1]``: the multi-step loss reduced to MAML's final-step loss."""
    return jnp.zeros((steps,), jnp.float32).at[-1].set(1.0)


def per_step_lr(params: Params, inner_lr: float, steps: int) -> PyTree:
    """Per-layer per-step rates: a pytree like ``params`` with ``[steps]`` leaves set to ``inner_lr``."""
    return jax.tree.map(lambda p: jnp.full((steps,), inner_lr, jnp.result_type(p)), params)


def rates_for_steps(lrs: PyTree, steps: int) -> PyTree:
    """Per-step rates for ``steps`` inner steps: the first ``steps`` rows, the last repeated beyond them.

    MAML++ learns one rate per trained step; testing with more steps keeps
    the last step's rate (and, with per-step batch norm, :func:`per_step_view`
    keeps the last row), testing with fewer uses the first rows.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")

    def extend(r):
        index = jnp.minimum(jnp.arange(steps), r.shape[0] - 1)
        return r[index]

    return jax.tree.map(extend, lrs)


def is_batch_norm(path: tuple, leaf: object) -> bool:
    """Whether a leaf belongs to a batch-norm layer: a key on its path starts with ``bn`` or ``BatchNorm``.

    Matches :class:`~jaxmeta.models.Conv4`'s ``bn_{k}/scale`` and ``bn_{k}/bias``
    and Flax's default ``BatchNorm_{k}`` names.
    """
    del leaf
    return any(str(getattr(k, "key", "")).startswith(("bn", "BatchNorm")) for k in path)


def per_step_init(params: Params, steps: int, per_step: LeafPredicate = is_batch_norm) -> Params:
    """``params`` with every ``per_step`` leaf repeated along a new leading ``[steps + 1]`` axis.

    Row ``t`` is the leaf of the network after ``t`` inner steps; all rows
    start equal to the given leaf.

    Raises:
      ValueError: no leaf matches ``per_step``.
    """
    split, merge = head_split(per_step)
    shared, rows = split(params)
    if not jax.tree.leaves(rows):
        raise ValueError("no parameter leaf matches the per-step predicate (no batch-norm layer?)")
    return merge(shared, jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a)[None], steps + 1, axis=0), rows))


def per_step_view(params: Params, per_step: LeafPredicate = is_batch_norm) -> tuple[Params, StepView]:
    """Splits per-step parameters into the inner loop's part and a view of step ``t``.

    Args:
      params: parameters whose ``per_step`` leaves have a leading ``[steps + 1]``
        axis (:func:`per_step_init`).
      per_step: which leaves are per step.

    Returns:
      ``(shared, at_step)``: ``shared`` is ``params`` with ``None`` in place of
      the per-step leaves (what the inner loop adapts), and
      ``at_step(shared, t)`` fills in row ``t`` of every per-step leaf (``t``
      clipped to the last row), giving ordinary parameters for ``loss_fn``.
      Gradients reach the rows through ``at_step``.
    """
    split, merge = head_split(per_step)
    shared, rows = split(params)

    def at_step(p: Params, t: jax.Array) -> Params:
        return merge(p, jax.tree.map(lambda a: a[jnp.minimum(t, a.shape[0] - 1)], rows))

    return shared, at_step


def mamlpp_task_objective(
    loss_fn: LossFn,
    params: Params,
    lrs: PyTree,
    task: Task,
    *,
    weights: jax.Array,
    first_order: bool | jax.Array = False,
    remat: bool = False,
    has_aux: bool = False,
    at_step: StepView | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One task's multi-step loss ``Σ_i weights[i] · L_query(φ_i)`` and its metrics.

    ``φ_i`` are the parameters after ``i = 1..N`` inner steps (seen through
    ``at_step(·, i)``, see :func:`~jaxmeta.inner.adapt_with_state`).  The
    metrics hold the query loss (and aux values) before adaptation
    (``query_*_pre``) and after the final step (``query_*_post``).
    """

    def observe(p):
        return scored(loss_fn, p, task.query, "query", has_aux=has_aux)

    _, (losses, seen) = adapt_and_observe(
        loss_fn, params, task.support, steps=jax.tree.leaves(lrs)[0].shape[0], step_lrs=lrs,
        first_order=first_order, remat=remat, has_aux=has_aux, observe=observe, at_step=at_step,
    )
    objective = jnp.sum(weights * losses[1:])
    metrics = {f"{k}_pre": v[0] for k, v in seen.items()}
    metrics.update({f"{k}_post": v[-1] for k, v in seen.items()})
    return objective, metrics


def mamlpp_objective(
    loss_fn: LossFn,
    params: Params,
    lrs: PyTree,
    tasks: Task,
    *,
    weights: jax.Array,
    first_order: bool | jax.Array = False,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    per_step: LeafPredicate | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MAML++ meta-objective on a batch of tasks: ``(mean multi-step loss, mean metrics)``.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      params: the initialisation θ.
      lrs: per-step rates (``step_lrs`` of :func:`~jaxmeta.inner.adapt_with_state`); their number sets the inner steps.
      tasks: a :class:`~jaxmeta.Task` batch with a leading task axis.
      weights: ``[steps]`` weights of the query losses after each step
        (:func:`msl_weights`; :func:`final_step_weights` gives MAML's objective).
      first_order: first-order meta-gradient (a traced boolean is allowed).
      remat: rematerialise inner steps.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).
      per_step: ``None``, or which leaves of ``params`` are per step (a
        predicate such as :func:`is_batch_norm`): those have a leading
        ``[steps + 1]`` axis (:func:`per_step_init`), are not adapted, and
        ``lrs`` holds ``None`` in their place.

    Returns:
      ``(loss, metrics)``; differentiable with respect to ``params`` and ``lrs``.
    """
    at_step = None
    if per_step is not None:
        params, at_step = per_step_view(params, per_step)
    objective = functools.partial(
        mamlpp_task_objective,
        loss_fn,
        weights=weights,
        first_order=first_order,
        remat=remat,
        has_aux=has_aux,
        at_step=at_step,
    )
    losses, metrics = map_tasks(lambda task: objective(params, lrs, task), tasks, chunk_size)
    return losses.mean(), mean_metrics(metrics)


def mamlpp_params(state: MetaState | dict[str, PyTree]) -> tuple[Params, PyTree]:
    """The meta-learned ``(params, lrs)`` of a MAML++ state (``lrs`` leaves are ``[steps]``).

    The learner's ``adapt`` (and :func:`jaxmeta.evaluate`) steps with one rate
    per step (:func:`mamlpp_adapt`).  With per-step batch norm the batch-norm
    leaves of ``params`` are ``[steps + 1, ...]`` rows and ``lrs`` is ``None``
    there.
    """
    meta = meta_params(state)
    return meta["params"], meta["lr"]


def mamlpp_adapt(
    loss_fn: LossFn,
    params: Params,
    lrs: PyTree,
    support: Batch,
    *,
    steps: int,
    has_aux: bool = False,
    per_step: LeafPredicate | None = None,
    observe: Callable[[Params], PyTree] | None = None,
) -> Params | tuple[Params, PyTree]:
    """Adapts a MAML++ initialisation to one support set with ``steps`` per-step-rate SGD steps.

    The rates come from :func:`rates_for_steps` (the last trained step's
    beyond the trained steps); with ``per_step`` (per-step batch norm) the
    returned parameters carry row ``steps`` of every per-step leaf (the last
    row beyond the trained steps), so ``loss_fn`` and the model take them as
    they are.  With ``observe``, also returns ``observe`` of the parameters
    after 0, 1, ..., ``steps`` steps (each seen as the model sees it then),
    as the learner's ``adapt`` does (:class:`~jaxmeta.algorithms.base.Adapt`).
    """
    at_step = None
    if per_step is not None:
        params, at_step = per_step_view(params, per_step)
    adapted, seen = adapt_and_observe(loss_fn, params, support, steps=steps, step_lrs=rates_for_steps(lrs, steps),
                                      has_aux=has_aux, at_step=at_step, observe=observe)
    if at_step is not None:
        adapted = at_step(adapted, steps)
    return adapted if observe is None else (adapted, seen)


def mamlpp(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: float,
    outer: optax.GradientTransformation,
    multi_step_loss: bool = True,
    msl_anneal_steps: int = 5000,
    msl_min_weight: float = 0.03,
    learn_inner_lr: bool = True,
    derivative_order_anneal_steps: int | None = None,
    cosine_outer: bool = False,
    total_steps: int | None = None,
    cosine_alpha: float = 0.0,
    per_step_bn: bool = False,
    bn_leaves: LeafPredicate = is_batch_norm,
    remat: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> MetaLearner:
    """MAML++: MAML with the multi-step loss, learned per-step rates and annealing.

    The state's ``params`` are ``{"params": θ, "lr": lrs}`` (``lrs`` a pytree
    like θ with ``[inner_steps]`` leaves, initialised to ``inner_lr``); get
    them with :func:`mamlpp_params`.  With ``learn_inner_lr=False`` the rates
    stay fixed (the outer optimiser is masked on them).  With every switch
    off (``multi_step_loss=False, learn_inner_lr=False``, no annealing) a
    step is exactly a MAML step.  With ``per_step_bn`` the ``bn_leaves`` of θ
    are ``[inner_steps + 1, ...]`` rows, one per inner step (BNWB, see the
    module docstring), and ``lrs`` is ``None`` in their place.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      inner_steps: inner SGD steps N (>= 1).
      inner_lr: initial (or fixed) inner learning rate.
      outer: the outer optimiser, e.g. ``optax.adam(1e-3)``.
      multi_step_loss: use the annealed multi-step loss (:func:`msl_weights`);
        otherwise only the final step's query loss.
      msl_anneal_steps: meta-steps over which the MSL weights move to the
        final step (the reference code anneals over its first epochs; default
        5000 ≈ 10 epochs of 500 meta-steps); afterwards only the final step counts.
      msl_min_weight: floor of the non-final weights during annealing, times 1/N.
      learn_inner_lr: meta-learn one rate per parameter leaf and inner step.
      derivative_order_anneal_steps: use first-order meta-gradients for this
        many meta-steps, then exact ones (``None``: always exact).
      cosine_outer: anneal the outer learning rate with a cosine over ``total_steps``.
      total_steps: meta-steps of the cosine schedule (required with ``cosine_outer``).
      cosine_alpha: final outer learning rate as a fraction of the initial one.
      per_step_bn: meta-learn one copy of every batch-norm scale and bias per
        inner step (BNWB), used by the network after that many steps and not
        adapted in the inner loop.
      bn_leaves: which leaves are batch norm (a key-path predicate;
        :func:`is_batch_norm` matches ``Conv4``).
      remat: rematerialise each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`MetaLearner`; ``step`` metrics: ``loss`` (the weighted
      multi-step loss), ``query_loss_pre``/``query_loss_post`` (after the
      final step; aux values likewise) and ``grad_norm``.

    Raises:
      ValueError: ``inner_steps < 1``, or ``cosine_outer`` without ``total_steps``;
        (from ``init``) ``per_step_bn`` and no leaf matches ``bn_leaves``.
    """
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    if cosine_outer:
        if total_steps is None:
            raise ValueError("cosine_outer needs total_steps")
        schedule = optax.cosine_decay_schedule(1.0, total_steps, alpha=cosine_alpha)
        outer = optax.chain(outer, optax.scale_by_schedule(schedule))
    if not learn_inner_lr:
        outer = optax.multi_transform(
            {"params": outer, "lr": optax.set_to_zero()},
            lambda meta: {k: jax.tree.map(lambda _, label=k: label, v) for k, v in meta.items()},
        )
    if multi_step_loss:
        msl_weights(0, steps=inner_steps, anneal_steps=msl_anneal_steps)  # validate now, not at trace time

    per_step = bn_leaves if per_step_bn else None

    def init(params: Params) -> MetaState:
        if per_step is not None:
            params = per_step_init(params, inner_steps, per_step)
            adapted, _ = per_step_view(params, per_step)
        else:
            adapted = params
        return init_state(outer, {"params": params, "lr": per_step_lr(adapted, inner_lr, inner_steps)})

    def step(state: MetaState, tasks: Task):
        if multi_step_loss:
            weights = msl_weights(
                state.step, steps=inner_steps, anneal_steps=msl_anneal_steps, min_weight=msl_min_weight
            )
        else:
            weights = final_step_weights(inner_steps)
        first_order = (
            False if derivative_order_anneal_steps is None else state.step < derivative_order_anneal_steps
        )

        def objective(meta):
            lrs = meta["lr"] if learn_inner_lr else jax.lax.stop_gradient(meta["lr"])
            return mamlpp_objective(
                loss_fn,
                meta["params"],
                lrs,
                tasks,
                weights=weights,
                first_order=first_order,
                remat=remat,
                has_aux=has_aux,
                chunk_size=chunk_size,
                per_step=per_step,
            )

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        return apply_outer(outer, state, grads), metrics

    def adapt(state, support, *, steps, key=None, observe=None):
        del key  # the rule is deterministic
        params, lrs = mamlpp_params(state)
        return mamlpp_adapt(loss_fn, params, lrs, support, steps=steps, has_aux=has_aux, per_step=per_step,
                            observe=observe)

    return MetaLearner(init, step, adapt)
