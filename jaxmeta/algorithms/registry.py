"""Meta-learners by name, so every experiment builds them the same way."""

from __future__ import annotations

import optax

from jaxmeta.algorithms.base import MetaLearner
from jaxmeta.algorithms.maml import maml
from jaxmeta.algorithms.pretrain import pretrain
from jaxmeta.algorithms.reptile import reptile
from jaxmeta.errors import ConfigError
from jaxmeta.inner import LossFn

ALGORITHMS = ("maml", "fomaml", "reptile", "pretrain")


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
) -> MetaLearner:
    """Builds the named meta-learner with the experiments' conventions.

    MAML and first-order MAML use Adam(``outer_lr``) as the outer optimiser;
    Reptile uses SGD with step size ``reptile_epsilon`` annealed linearly to 0
    over ``meta_steps`` (Nichol et al.); pre-training uses Adam(``outer_lr``).

    Raises:
      ConfigError: an unknown algorithm name.
    """
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
        )
    if algo == "reptile":
        return reptile(
            loss_fn,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            epsilon=reptile_epsilon,
            anneal_steps=meta_steps,
            has_aux=has_aux,
            chunk_size=chunk_size,
        )
    if algo == "pretrain":
        return pretrain(loss_fn, optimizer=optax.adam(outer_lr), has_aux=has_aux, chunk_size=chunk_size)
    raise ConfigError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGORITHMS)}")
