"""Meta-learners by name, so every experiment builds them the same way."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import optax

from jaxmeta.algorithms.anil import anil, head_only_lr
from jaxmeta.algorithms.base import MetaLearner
from jaxmeta.algorithms.imaml import imaml
from jaxmeta.algorithms.maml import maml
from jaxmeta.algorithms.mamlpp import is_batch_norm, mamlpp, mamlpp_adapt, mamlpp_evaluate, mamlpp_params
from jaxmeta.algorithms.meta_sgd import meta_sgd, meta_sgd_params
from jaxmeta.algorithms.pretrain import pretrain
from jaxmeta.algorithms.reptile import reptile, reptile_params
from jaxmeta.errors import ConfigError
from jaxmeta.inner import LossFn, adapt_with_state, task_schedule
from jaxmeta.types import Batch, Params, PyTree, Task

BASE_ALGORITHMS = ("maml", "fomaml", "reptile", "pretrain")
ALGORITHMS = BASE_ALGORITHMS + ("meta_sgd", "anil", "mamlpp", "imaml")
INNER_OPTIMIZER_ALGORITHMS = ("maml", "fomaml", "reptile", "imaml")
"""The algorithms whose inner SGD ``make_learner(inner_optimizer=...)`` can replace."""


def make_learner(
    algo: str,
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: float,
    outer_lr: float,
    meta_steps: int | None = None,
    has_aux: bool = False,
    remat: bool = False,
    chunk_size: int | None = None,
    reptile_epsilon: float = 1.0,
    anil_fns: tuple | None = None,
    anil_head: str = "head",
    imaml_lam: float = 1.0,
    imaml_cg_steps: int = 5,
    imaml_cg_damping: float = 0.0,
    mamlpp_per_step_bn: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_batch_size: int | None = None,
    persistent_inner_state: bool = False,
    seed: int = 0,
) -> MetaLearner:
    """Builds the named meta-learner with the experiments' conventions.

    MAML and first-order MAML use Adam(``outer_lr``) as the outer optimiser;
    Reptile uses SGD with step size ``reptile_epsilon`` annealed linearly to 0
    over ``meta_steps`` (Nichol et al.); pre-training uses Adam(``outer_lr``).
    Meta-SGD, ANIL, MAML++ and iMAML use Adam(``outer_lr``) too.  ANIL needs
    ``anil_fns=(features_fn, head_loss_fn)`` (see
    :func:`~jaxmeta.algorithms.anil.flax_anil_fns`).  MAML++ switches on all
    its generic stabilisers: multi-step loss annealed over the first tenth of
    ``meta_steps``, learned per-layer per-step inner rates, first order for the
    first third, cosine annealing of the outer rate; ``mamlpp_per_step_bn`` adds
    per-step batch-norm weights and biases (BNWB).  ``inner_optimizer``
    (e.g. Adam) replaces inner SGD for MAML, first-order MAML, Reptile and iMAML.
    ``inner_batch_size``, ``persistent_inner_state`` and ``seed`` are Reptile's
    reference protocol (see :func:`~jaxmeta.algorithms.reptile.reptile`).

    Raises:
      ConfigError: an unknown algorithm name, or an ``inner_optimizer`` for an
        algorithm whose inner loop is SGD by definition (Meta-SGD, ANIL,
        MAML++: learned or head-only SGD rates) or that has none (pre-training).
    """
    if inner_optimizer is not None and algo not in INNER_OPTIMIZER_ALGORITHMS:
        raise ConfigError(f"an inner optimizer applies to {', '.join(INNER_OPTIMIZER_ALGORITHMS)}, not {algo}")
    if (inner_batch_size is not None or persistent_inner_state) and algo != "reptile":
        raise ConfigError(f"inner mini-batches and a persistent inner state are Reptile's protocol, not {algo}'s")
    if persistent_inner_state and inner_optimizer is None:
        raise ConfigError("a persistent inner state needs an inner optimizer (Reptile's reference: Adam)")
    if algo in ("maml", "fomaml"):
        return maml(
            loss_fn,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            outer=optax.adam(outer_lr),
            first_order=algo == "fomaml",
            remat=remat,
            has_aux=has_aux,
            chunk_size=chunk_size,
            inner_optimizer=inner_optimizer,
        )
    if algo == "reptile":
        return reptile(
            loss_fn,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            epsilon=reptile_epsilon,
            anneal_steps=meta_steps,
            inner_optimizer=inner_optimizer,
            has_aux=has_aux,
            chunk_size=chunk_size,
            inner_batch_size=inner_batch_size,
            persistent_inner_state=persistent_inner_state,
            seed=seed,
        )
    if algo == "pretrain":
        return pretrain(loss_fn, optimizer=optax.adam(outer_lr), has_aux=has_aux, chunk_size=chunk_size)
    if algo == "meta_sgd":
        return meta_sgd(loss_fn, inner_steps=inner_steps, init_lr=inner_lr, outer=optax.adam(outer_lr),
                        remat=remat, has_aux=has_aux, chunk_size=chunk_size)
    if algo == "anil":
        if anil_fns is None:
            raise ConfigError("anil needs anil_fns=(features_fn, head_loss_fn), e.g. flax_anil_fns(model, ...)")
        features_fn, head_loss_fn = anil_fns
        return anil(features_fn, head_loss_fn, head=anil_head, inner_steps=inner_steps, inner_lr=inner_lr,
                    outer=optax.adam(outer_lr), remat=remat, has_aux=has_aux, chunk_size=chunk_size)
    if algo == "mamlpp":
        return mamlpp(loss_fn, inner_steps=inner_steps, inner_lr=inner_lr, outer=optax.adam(outer_lr),
                      msl_anneal_steps=max(1, meta_steps // 10) if meta_steps else 5000,
                      derivative_order_anneal_steps=meta_steps // 3 if meta_steps else None,
                      cosine_outer=meta_steps is not None, total_steps=meta_steps,
                      per_step_bn=mamlpp_per_step_bn, remat=remat, has_aux=has_aux, chunk_size=chunk_size)
    if algo == "imaml":
        return imaml(loss_fn, inner_steps=inner_steps, inner_lr=inner_lr, lam=imaml_lam, cg_steps=imaml_cg_steps,
                     cg_damping=imaml_cg_damping, outer=optax.adam(outer_lr), has_aux=has_aux, chunk_size=chunk_size,
                     inner_optimizer=inner_optimizer)
    raise ConfigError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGORITHMS)}")


class Adaptation(NamedTuple):
    """How a trained learner adapts at test time (the keyword arguments of :func:`jaxmeta.evaluate`)."""

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


def adaptation(
    algo: str,
    meta_params: PyTree,
    inner_lr: float,
    *,
    head: str = "head",
    imaml_lam: float = 1.0,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> Adaptation:
    """The initial parameters, rate and inner problem with which a trained learner adapts at test time.

    Meta-SGD adapts with its learned per-parameter rates; MAML++ with its
    learned per-layer rates of the last training step (for any number of test
    steps); ANIL fine-tunes the head only; iMAML solves its training inner
    problem, the support loss plus ``(imaml_lam/2)·||φ − θ||²``; Reptile with
    its inner optimiser when it was trained with one (from its carried state
    when it keeps one); the others use plain SGD at ``inner_lr`` on all
    parameters.
    """
    if algo == "meta_sgd":
        return Adaptation(*meta_sgd_params(meta_params))
    if algo == "mamlpp":
        params, lrs = mamlpp_params(meta_params)
        return Adaptation(params, jax.tree.map(lambda r: r[-1], lrs))
    if algo == "anil":
        return Adaptation(meta_params, head_only_lr(meta_params, inner_lr, head=head))
    if algo == "reptile":
        params, carried = reptile_params(meta_params)
        return Adaptation(params, inner_lr, optimizer=inner_optimizer, opt_state=carried)
    return Adaptation(meta_params, inner_lr, imaml_lam if algo == "imaml" else None)


def evaluate_learner(
    algo: str,
    loss_fn: LossFn,
    meta_params: PyTree,
    tasks: Task,
    *,
    steps: int,
    inner_lr: float,
    has_aux: bool = False,
    chunk_size: int | None = 50,
    head: str = "head",
    imaml_lam: float = 1.0,
    mamlpp_per_step_bn: bool = False,
    query_score: Callable | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_batch_size: int | None = None,
    key: jax.Array | None = None,
):
    """Adapts a trained learner to every test task as it adapts in training; metrics after 0..``steps`` steps.

    ``query_score`` scores the adapted parameters on each query set (see
    :func:`jaxmeta.evaluate`; ``None``: ``loss_fn`` on the whole query batch);
    ``inner_optimizer``, ``inner_batch_size`` and ``key`` are Reptile's test
    protocol (its inner optimiser on mini-batches of the support set).

    MAML++ adapts with its learned per-step rates (and per-step batch norm),
    the last step's beyond the trained steps (:func:`mamlpp_evaluate`); every
    other algorithm goes through :func:`jaxmeta.evaluate` with
    :func:`adaptation`.

    Returns:
      A :class:`jaxmeta.EvalResult`.
    """
    if algo == "mamlpp":
        params, lrs = mamlpp_params(meta_params)
        return mamlpp_evaluate(loss_fn, params, lrs, tasks, has_aux=has_aux, chunk_size=chunk_size, steps=steps,
                               per_step=is_batch_norm if mamlpp_per_step_bn else None, query_score=query_score)
    from jaxmeta.evaluation import evaluate  # lazy: evaluation imports the algorithms package

    adapt = adaptation(algo, meta_params, inner_lr, head=head, imaml_lam=imaml_lam, inner_optimizer=inner_optimizer)
    return evaluate(loss_fn, adapt.params, tasks, steps=steps, lr=adapt.lr, has_aux=has_aux, chunk_size=chunk_size,
                    proximal=adapt.proximal, query_score=query_score, optimizer=adapt.optimizer,
                    opt_state=adapt.opt_state, inner_batch_size=inner_batch_size, key=key)


def adapt_learner(
    algo: str,
    loss_fn: LossFn,
    meta_params: PyTree,
    support: Batch,
    *,
    steps: int,
    inner_lr: float,
    has_aux: bool = False,
    head: str = "head",
    imaml_lam: float = 1.0,
    mamlpp_per_step_bn: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_batch_size: int | None = None,
    key: jax.Array | None = None,
) -> Params:
    """One task's adapted parameters, adapted as :func:`evaluate_learner` adapts (ordinary parameters)."""
    if algo == "mamlpp":
        params, lrs = mamlpp_params(meta_params)
        return mamlpp_adapt(loss_fn, params, lrs, support, steps=steps, has_aux=has_aux,
                            per_step=is_batch_norm if mamlpp_per_step_bn else None)
    adapt = adaptation(algo, meta_params, inner_lr, head=head, imaml_lam=imaml_lam, inner_optimizer=inner_optimizer)
    batches = task_schedule(jax.random.PRNGKey(0) if key is None else key, support, steps, inner_batch_size)
    return adapt_with_state(loss_fn, adapt.params, support, steps=steps, lr=adapt.lr, has_aux=has_aux,
                            proximal=adapt.proximal, optimizer=adapt.optimizer, opt_state=adapt.opt_state,
                            batches=batches)[0]
