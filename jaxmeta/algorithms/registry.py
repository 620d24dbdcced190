"""Meta-learners by name, so every experiment builds them the same way.

:data:`ALGORITHM_SPECS` says what a pipeline may need to know about an
algorithm (its title, whether it has an inner loop, which switches are its
own), so that no pipeline tests an algorithm's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import optax

from jaxmeta.algorithms.anil import anil, flax_anil_fns, flax_features
from jaxmeta.algorithms.base import MetaLearner
from jaxmeta.algorithms.blackbox import blackbox, in_context_model
from jaxmeta.algorithms.imaml import imaml
from jaxmeta.algorithms.maml import maml
from jaxmeta.algorithms.mamlpp import mamlpp
from jaxmeta.algorithms.meta_sgd import meta_sgd
from jaxmeta.algorithms.pretrain import pretrain
from jaxmeta.algorithms.protonet import protonet
from jaxmeta.algorithms.reptile import reptile
from jaxmeta.errors import ConfigError
from jaxmeta.inner import LossFn



@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """What a pipeline may ask about a registered algorithm instead of testing its name."""

    title: str
    """How tables and messages name it ("first-order MAML")."""
    inner_loop: bool = True
    """``False``: no inner gradient loop in training, so training's inner steps mean nothing to it
    (pre-training trains the current parameters on all tasks; Prototypical Networks compute prototypes)."""
    second_order: bool = False
    """Its meta-gradient differentiates through the inner loop (a differentiated inner Adam needs ``eps_root``)."""
    remat: bool = False
    """``make_learner(remat=True)`` changes it: its meta-gradient keeps every inner step's activations."""
    inner_optimizer: bool = False
    """``make_learner(inner_optimizer=...)`` may replace its inner SGD."""
    protocol: tuple[str, ...] = ()
    """Configuration switches of its own paper's protocol, which the pipelines offer no other algorithm."""
    min_inner_steps: int = 1
    """Fewer training inner steps make it another algorithm (Reptile with one step is joint training)."""
    classification_only: bool = False
    """It needs classes (prototypes, label inputs): no regression task such as the sinusoid."""
    model: Callable[[nn.Module], Any] | None = None
    """Builds the model it trains from the task's classifier (:func:`learner_model`); ``None``: that classifier."""


ALGORITHM_SPECS = {
    "maml": AlgorithmSpec("MAML", second_order=True, remat=True, inner_optimizer=True),
    "fomaml": AlgorithmSpec("first-order MAML", remat=True, inner_optimizer=True),
    "reptile": AlgorithmSpec("Reptile", inner_optimizer=True, min_inner_steps=5,
                             protocol=("inner_batch", "test_inner_batch", "persistent_inner_state", "inner_optimizer")),
    "pretrain": AlgorithmSpec("pre-training", inner_loop=False),
    "meta_sgd": AlgorithmSpec("Meta-SGD", second_order=True, remat=True),
    "anil": AlgorithmSpec("ANIL", second_order=True, remat=True),
    "mamlpp": AlgorithmSpec("MAML++", second_order=True, remat=True, protocol=("per_step_bn",)),
    "imaml": AlgorithmSpec("iMAML", inner_optimizer=True),
    "protonet": AlgorithmSpec("Prototypical Networks", inner_loop=False, classification_only=True),
    "blackbox": AlgorithmSpec("in-context learner", inner_loop=False, classification_only=True,
                              model=in_context_model),
}
"""Every algorithm :func:`make_learner` builds, in the order tables list them."""

ALGORITHMS = tuple(ALGORITHM_SPECS)
BASE_ALGORITHMS = ALGORITHMS[:4]
"""The seed's four: MAML, first-order MAML, Reptile and pre-training."""


def spec(algo: str) -> AlgorithmSpec:
    """The :class:`AlgorithmSpec` of ``algo``; an unknown name is a :class:`ConfigError` listing the known ones."""
    if algo not in ALGORITHM_SPECS:
        raise ConfigError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGORITHMS)}")
    return ALGORITHM_SPECS[algo]


def learner_model(algo: str, model: nn.Module) -> Any:
    """The model ``algo`` trains for a task whose classifier is ``model`` (the in-context learner wraps it)."""
    wrap = spec(algo).model
    return model if wrap is None else wrap(model)


def check_protocol(algo: str, switches: dict[str, bool]) -> None:
    """Refuses, in one line, switches that belong to another algorithm's protocol.

    ``switches`` maps a configuration field to whether it is set (the message
    spells it as a flag, ``inner_batch`` as ``inner-batch``).
    """
    theirs = [name for name, on in switches.items() if on and name not in spec(algo).protocol]
    for owner, owner_spec in ALGORITHM_SPECS.items():
        mine = [name for name in theirs if name in owner_spec.protocol]
        if mine:
            flags = ", ".join(name.replace("_", "-") for name in mine)
            raise ConfigError(f"{flags}: {owner_spec.title}'s protocol (--algo {owner}), not {algo}'s")


SHARED_OPTIONS = ("inner_steps", "inner_lr", "outer_lr", "meta_steps", "reptile_epsilon", "imaml_lam",
                  "imaml_cg_steps", "imaml_cg_damping")
""":func:`make_learner` keywords that experiment configs declare under the same names."""


def config_options(config) -> dict:
    """The :data:`SHARED_OPTIONS` that ``config`` (any dataclass or object) has, as :func:`make_learner` keywords."""
    return {name: getattr(config, name) for name in SHARED_OPTIONS if hasattr(config, name)}


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
    model: nn.Module | None = None,
    make_loss: Callable | None = None,
    imaml_lam: float = 1.0,
    imaml_cg_steps: int = 5,
    imaml_cg_damping: float = 0.0,
    mamlpp_per_step_bn: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
    inner_batch_size: int | None = None,
    persistent_inner_state: bool = False,
    seed: int = 0,
    test_inner_batch_size: int | None = None,
) -> MetaLearner:
    """Builds the named meta-learner with the experiments' conventions.

    MAML and first-order MAML use Adam(``outer_lr``) as the outer optimiser;
    Reptile uses SGD with step size ``reptile_epsilon`` annealed linearly to 0
    over ``meta_steps`` (Nichol et al.); pre-training uses Adam(``outer_lr``).
    Meta-SGD, ANIL, MAML++ and iMAML use Adam(``outer_lr``) too.  ANIL needs
    ``anil_fns=(features_fn, head_loss_fn)``, or the Flax ``model`` and the
    ``make_loss`` that made ``loss_fn`` (e.g. ``classification_loss``), from
    which :func:`~jaxmeta.algorithms.anil.flax_anil_fns` splits them at
    ``anil_head``; Prototypical Networks need the ``model`` (their prototypes
    become its head at ``anil_head``).  MAML++ switches on all
    its generic stabilisers: multi-step loss annealed over the first tenth of
    ``meta_steps``, learned per-layer per-step inner rates, first order for the
    first third, cosine annealing of the outer rate; ``mamlpp_per_step_bn`` adds
    per-step batch-norm weights and biases (BNWB).  ``inner_optimizer``
    (e.g. Adam) replaces inner SGD for MAML, first-order MAML, Reptile and iMAML.
    ``inner_batch_size``, ``persistent_inner_state``, ``seed`` and
    ``test_inner_batch_size`` are Reptile's reference protocol (see
    :func:`~jaxmeta.algorithms.reptile.reptile`).  Every learner adapts at test
    time with its own rule (``learner.adapt``); pre-training fine-tunes with
    SGD at ``inner_lr``.

    Raises:
      ConfigError: an unknown algorithm name, or an ``inner_optimizer`` for an
        algorithm whose inner loop is SGD by definition (Meta-SGD, ANIL,
        MAML++: learned or head-only SGD rates) or that has none (pre-training).
    """
    if inner_optimizer is not None and not spec(algo).inner_optimizer:
        takers = [name for name, s in ALGORITHM_SPECS.items() if s.inner_optimizer]
        raise ConfigError(f"an inner optimizer applies to {', '.join(takers)}, not {algo}")
    check_protocol(algo, {"inner_batch": inner_batch_size is not None,
                          "test_inner_batch": test_inner_batch_size is not None,
                          "persistent_inner_state": persistent_inner_state, "per_step_bn": mamlpp_per_step_bn})
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
            test_inner_batch_size=test_inner_batch_size,
        )
    if algo == "pretrain":
        return pretrain(loss_fn, optimizer=optax.adam(outer_lr), has_aux=has_aux, chunk_size=chunk_size,
                        finetune_lr=inner_lr)
    if algo == "meta_sgd":
        return meta_sgd(loss_fn, inner_steps=inner_steps, init_lr=inner_lr, outer=optax.adam(outer_lr),
                        remat=remat, has_aux=has_aux, chunk_size=chunk_size)
    if algo == "anil":
        if anil_fns is None and model is not None and make_loss is not None:
            anil_fns = flax_anil_fns(model, make_loss, head=anil_head)
        if anil_fns is None:
            raise ConfigError("anil needs anil_fns=(features_fn, head_loss_fn), or the Flax model and make_loss")
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
    if algo == "protonet":
        if model is None:
            raise ConfigError("protonet needs the Flax model (its linear head holds the prototypes)")
        return protonet(flax_features(model, head=anil_head), loss_fn, head=anil_head, outer=optax.adam(outer_lr),
                        has_aux=has_aux, chunk_size=chunk_size)
    if algo == "blackbox":
        return blackbox(loss_fn, outer=optax.adam(outer_lr), has_aux=has_aux, chunk_size=chunk_size)
    raise ConfigError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGORITHMS)}")
