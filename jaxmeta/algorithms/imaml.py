"""iMAML (Rajeswaran, Finn, Kakade & Levine, 2019): implicit meta-gradients.

Each task's adapted parameters approximately minimise the proximally
regularised support loss

    φ*(θ) = argmin_φ  L_support(φ) + (λ/2)·||φ − θ||²,

found by ``inner_steps`` SGD steps from ``θ`` with no backpropagation through
them.  At the minimum ``∇L_support(φ*) + λ(φ* − θ) = 0``, so by the implicit
function theorem ``dφ*/dθ = (I + H/λ)⁻¹`` with ``H = ∇²L_support(φ*)``, and
the task's meta-gradient is ``g = (I + H/λ)⁻¹ ∇L_query(φ*)``.  It is computed
by ``cg_steps`` of conjugate gradient on ``(I + H/λ) g = ∇L_query(φ*)`` with
Hessian-vector products (forward-over-reverse, ``jax.jvp`` of ``jax.grad``),
so memory does not grow with the number of inner steps.

The implicit gradient is exact only at the minimum.  A fixed number of inner
steps from ``θ`` stops short of it, and at such a ``φ`` the support Hessian can
have large negative eigenvalues that make the system indefinite and the
gradient wild.  ``cg_damping`` ``δ`` solves ``(I + H/(λ + δ)) g = ∇L_query(φ)``
instead, a Levenberg-Marquardt damping that moves the gradient toward the
first-order one (``δ → ∞`` gives ``∇L_query(φ)``).  The paper authors' code
(aravindr93/imaml_dev, Omniglot) solves ``(2I + H/(λ + 10)) g = ∇L_query(φ)``:
up to a factor ½, which Adam's update ignores, that is ``δ = λ + 20``.
"""

from __future__ import annotations

from collections.abc import Callable

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
    mean_metrics,
    query_before_after,
)
from jaxmeta.inner import LossFn, inner_adapt, loss_value
from jaxmeta.tasks import map_tasks
from jaxmeta.types import Batch, Params, PyTree, Task


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def conjugate_gradient(matvec: Callable[[PyTree], PyTree], b: PyTree, *, steps: int) -> PyTree:
    """Solves ``A x = b`` for a symmetric positive-definite ``A`` with ``steps`` CG iterations.

    A fixed number of iterations (``lax.fori_loop``, from ``x = 0``), safe
    once the residual is exactly zero, over pytrees of arrays.

    Args:
      matvec: ``v ↦ A v`` on pytrees shaped like ``b``.
      b: the right-hand side.
      steps: CG iterations (exact after ``dim`` steps in exact arithmetic).

    Returns:
      The approximate solution, a pytree like ``b``.
    """
    x = jax.tree.map(jnp.zeros_like, b)
    rs = _vdot(b, b)

    def body(_, carry):
        x, r, p, rs = carry
        ap = matvec(p)
        pap = _vdot(p, ap)
        alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1), 0)
        x = jax.tree.map(lambda xi, pi: xi + alpha * pi, x, p)
        r = jax.tree.map(lambda ri, ai: ri - alpha * ai, r, ap)
        rs_new = _vdot(r, r)
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1), 0)
        p = jax.tree.map(lambda ri, pi: ri + beta * pi, r, p)
        return x, r, p, rs_new

    x, *_ = jax.lax.fori_loop(0, steps, body, (x, b, b, rs))
    return x


def proximal_adapt(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    steps: int,
    lr: float | PyTree,
    lam: float,
    has_aux: bool = False,
    optimizer: optax.GradientTransformation | None = None,
) -> Params:
    """``steps`` SGD steps on ``loss(φ) + (λ/2)||φ − θ||²`` from ``φ = θ``, without gradient.

    Args:
      loss_fn: ``loss_fn(params, batch)`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      params: the initialisation θ (also the proximal centre).
      batch: the support set.
      steps: SGD steps.
      lr: inner learning rate (scalar or pytree like ``params``).
      lam: the proximal regularisation strength λ.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      optimizer: an optax solver for the proximal problem instead of SGD at
        ``lr`` (e.g. Adam, whose bounded steps do not blow up where the
        support loss is sharp).

    Returns:
      The adapted parameters ``φ``, with the gradient stopped.
    """
    theta = jax.lax.stop_gradient(params)
    adapted = inner_adapt(loss_fn, theta, batch, steps=steps, lr=lr, first_order=True, has_aux=has_aux,
                          proximal=lam, optimizer=optimizer)
    return jax.lax.stop_gradient(adapted)


def imaml_task_gradient(
    loss_fn: LossFn,
    params: Params,
    task: Task,
    *,
    steps: int,
    lr: float | PyTree,
    lam: float,
    cg_steps: int,
    cg_damping: float = 0.0,
    has_aux: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> tuple[PyTree, jax.Array, dict[str, jax.Array]]:
    """One task's implicit meta-gradient ``(I + H/(λ + δ))⁻¹ ∇L_query(φ)`` at the proximal solution φ.

    ``δ = cg_damping`` (0: the exact implicit gradient).

    Returns:
      ``(gradient, query loss at φ, metrics)`` with ``query_*_pre``/``query_*_post`` metrics.
    """
    theta = jax.lax.stop_gradient(params)
    phi = proximal_adapt(loss_fn, theta, task.support, steps=steps, lr=lr, lam=lam, has_aux=has_aux,
                         optimizer=inner_optimizer)
    (post, metrics), v = jax.value_and_grad(
        lambda p: query_before_after(loss_fn, theta, p, task.query, has_aux=has_aux), has_aux=True
    )(phi)
    support_grad = jax.grad(lambda p: loss_value(loss_fn, p, task.support, has_aux=has_aux)[0])

    def matvec(u):
        hu = jax.jvp(support_grad, (phi,), (u,))[1]
        return jax.tree.map(lambda ui, hi: ui + hi / (lam + cg_damping), u, hu)

    return conjugate_gradient(matvec, v, steps=cg_steps), post, metrics


def imaml_gradient(
    loss_fn: LossFn,
    params: Params,
    tasks: Task,
    *,
    steps: int,
    lr: float | PyTree,
    lam: float,
    cg_steps: int,
    cg_damping: float = 0.0,
    has_aux: bool = False,
    chunk_size: int | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> tuple[PyTree, jax.Array, dict[str, jax.Array]]:
    """The iMAML meta-gradient of a batch of tasks (mean over tasks).

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      params: the initialisation θ.
      tasks: a :class:`~jaxmeta.Task` batch with a leading task axis.
      steps: inner SGD steps on the regularised support loss.
      lr: inner learning rate (keep ``lr < 2 / (λ + curvature)``).
      lam: proximal regularisation λ (> 0).
      cg_steps: conjugate-gradient iterations.
      cg_damping: ``δ ≥ 0``; the system is ``(I + H/(λ + δ)) g = ∇L_query(φ)``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).
      inner_optimizer: an optax solver for the inner problem instead of SGD.

    Returns:
      ``(gradient like params, mean query loss after adaptation, mean metrics)``.
    """

    def per_task(task):
        return imaml_task_gradient(
            loss_fn, params, task, steps=steps, lr=lr, lam=lam, cg_steps=cg_steps, cg_damping=cg_damping,
            has_aux=has_aux, inner_optimizer=inner_optimizer,
        )

    grads, losses, metrics = map_tasks(per_task, tasks, chunk_size)
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), losses.mean(), mean_metrics(metrics)


def imaml(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: float | PyTree,
    lam: float,
    cg_steps: int,
    outer: optax.GradientTransformation,
    cg_damping: float = 0.0,
    has_aux: bool = False,
    chunk_size: int | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> MetaLearner:
    """iMAML: meta-gradients from the implicit function theorem, not backprop through the inner loop.

    Args:
      loss_fn: ``loss_fn(params, (x, y))`` (scalar, or ``(scalar, aux)`` with ``has_aux``).
      inner_steps: SGD steps on ``L_support(φ) + (λ/2)||φ − θ||²`` from ``θ``.
      inner_lr: their learning rate.
      lam: the proximal strength λ (> 0); larger keeps φ near θ and the
        linear system better conditioned.
      cg_steps: conjugate-gradient iterations for ``(I + H/λ) g = ∇L_query(φ)``
        (the paper uses 5 to 20).
      outer: the outer optimiser.
      cg_damping: ``δ ≥ 0`` (see the module docstring): solve
        ``(I + H/(λ + δ)) g = ∇L_query(φ)``; 0 is the exact implicit gradient.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).
      inner_optimizer: an optax solver for the inner problem instead of SGD at
        ``inner_lr`` (the implicit gradient does not depend on how φ was found).

    Returns:
      A :class:`MetaLearner` whose ``adapt`` solves the training's inner
      problem (the support loss plus the proximal term); ``step`` metrics:
      ``loss`` (mean query loss at
      the adapted parameters, which is not the objective differentiated by
      backprop but the one whose implicit gradient is applied),
      ``query_loss_pre``/``query_loss_post`` (and aux values) and ``grad_norm``.

    Raises:
      ValueError: ``lam <= 0``, ``cg_damping < 0`` or a negative step count.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if not cg_damping >= 0:
        raise ValueError(f"cg_damping must be >= 0, got {cg_damping}")
    if inner_steps < 0 or cg_steps < 0:
        raise ValueError(f"inner_steps and cg_steps must be >= 0, got {inner_steps}, {cg_steps}")

    def init(params: Params) -> MetaState:
        return init_state(outer, params)

    def step(state: MetaState, tasks: Task):
        grads, loss, metrics = imaml_gradient(
            loss_fn,
            state.params,
            tasks,
            steps=inner_steps,
            lr=inner_lr,
            lam=lam,
            cg_steps=cg_steps,
            cg_damping=cg_damping,
            has_aux=has_aux,
            chunk_size=chunk_size,
            inner_optimizer=inner_optimizer,
        )
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        return apply_outer(outer, state, grads), metrics

    rule = lambda params: Adaptation(params, inner_lr, proximal=lam, optimizer=inner_optimizer)  # noqa: E731
    return MetaLearner(init, step, gradient_adapt(loss_fn, rule, has_aux=has_aux))
