"""Prototypical Networks (Snell, Swersky & Zemel, 2017): a metric learner on the learner interface.

A body embeds the examples; each class's *prototype* ``c_k`` is the mean of
its support embeddings, and a query embedding ``f`` gets the logits
``-||f - c_k||²``.  Training minimises the query cross-entropy, so the body
learns an embedding in which classes cluster around their means.  There is
no inner gradient loop: adaptation is computing the prototypes.

The squared-Euclidean classifier is a linear one (the paper's §2.4):
``-||f - c_k||² = 2 c_k·f - ||c_k||² - ||f||²``, and the last term is the
same for every class, so it cancels in the softmax.  :func:`prototype_head`
writes the prototypes as the weights of the model's own linear head
(``kernel = 2 Cᵀ``, ``bias = -||c_k||²``).  The adapted parameters are
therefore ordinary model parameters: the same loss function, evaluation
modes (transductive or not), checkpoints and ensembles serve Prototypical
Networks and MAML alike.

Differences from the paper's Omniglot set-up: the body is this library's
:class:`~jaxmeta.models.Conv4` (stride-2 convolutions and a global mean pool
instead of max-pools; 64 features either way), and training episodes have
the test's ways unless the pipeline is told otherwise (the paper trains
1-shot Omniglot with 60 classes per episode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxmeta.algorithms.anil import FeaturesFn, head_split
from jaxmeta.algorithms.base import MetaLearner, amortized
from jaxmeta.inner import LossFn
from jaxmeta.types import Batch, Params


def prototypes(features: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
    """Each class's mean embedding: ``[ways, dim]`` from ``features [N, dim]`` and integer ``labels [N]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
      >>> prototypes(f, jnp.array([0, 0, 1]), 2).tolist()
      [[1.0, 0.0], [0.0, 4.0]]
    """
    one_hot = jax.nn.one_hot(labels, ways, dtype=features.dtype)
    counts = jnp.maximum(one_hot.sum(axis=0), 1.0)
    return (one_hot.T @ features) / counts[:, None]


def prototype_head(features: jax.Array, labels: jax.Array, ways: int) -> dict[str, jax.Array]:
    """The linear head whose logits are ``-||f - c_k||²`` up to a per-example constant.

    Returns ``{"kernel": 2 Cᵀ [dim, ways], "bias": -||c_k||² [ways]}`` for the
    :func:`prototypes` ``C`` of the support set: the layout of a Flax
    ``nn.Dense`` head, so the softmax of ``features @ kernel + bias`` is the
    Prototypical Networks classifier.
    """
    c = prototypes(features, labels, ways)
    return {"kernel": 2.0 * c.T, "bias": -jnp.sum(c * c, axis=-1)}


def protonet(
    features_fn: FeaturesFn,
    loss_fn: LossFn,
    *,
    head: str = "head",
    outer: optax.GradientTransformation,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> MetaLearner:
    """Prototypical Networks as a :class:`~jaxmeta.MetaLearner` over a model with a linear head.

    Args:
      features_fn: ``features_fn(body_params, x) -> [N, dim]`` embeddings, e.g.
        :func:`~jaxmeta.algorithms.anil.flax_features`.
      loss_fn: the whole model's ``loss_fn(params, (x, y))`` with integer
        labels ``y``, e.g. ``classification_loss(model)``; its head is the
        ``nn.Dense`` at ``head``.
      head: the top-level key of the head's parameters (``"head"`` for
        :class:`~jaxmeta.models.Conv4`); its bias gives the number of ways.
      outer: the optax optimiser of the body (the paper: Adam 1e-3).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`~jaxmeta.MetaLearner` (:func:`~jaxmeta.algorithms.base.amortized`)
      whose state holds the full model parameters (the head's own weights are
      never trained: ``adapt`` replaces them with the prototypes).
      ``adapt(state, support, steps=S)`` returns the parameters with the
      prototype head; it takes no gradient steps, so with ``observe`` every
      one of the ``S + 1`` entries is the same.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxmeta.algorithms.anil import DenseHead, anil_loss_fn
      >>> from jaxmeta.models import classification_loss
      >>> features = lambda body, x: x @ body["embed"]
      >>> loss = anil_loss_fn(features, classification_loss(DenseHead("head")), head="head")
      >>> learner = protonet(features, loss, outer=optax.adam(1e-2), has_aux=True)
      >>> params = {"embed": jnp.eye(2), "head": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
      >>> support = (jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0, 1]))
      >>> adapted = learner.adapt(learner.init(params), support, steps=0)
      >>> loss(adapted, (jnp.array([[0.9, 0.2], [0.1, 0.8]]), jnp.array([0, 1])))[1]["accuracy"].item()
      1.0
    """
    split, merge = head_split(head)

    def rule(params: Params, support: Batch) -> Params:
        body, head_params = split(params)
        x, y = support
        ways = head_params[head]["bias"].shape[-1]
        return merge(body, {head: prototype_head(features_fn(body, x), y, ways)})

    return amortized(rule, loss_fn, outer=outer, has_aux=has_aux, chunk_size=chunk_size)
