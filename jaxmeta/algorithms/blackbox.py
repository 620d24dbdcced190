"""The black-box (in-context) learner: a Transformer that reads a task's support set and predicts its queries.

The learner has no inner gradient loop.  A network receives the support set
and a query example and returns the query's logits directly; meta-training
fits that network over many tasks, so it learns to learn from its input
("learning to learn" as amortised inference).

The network (:class:`InContextTransformer`):

* an embedding network (by default the task's :class:`~jaxmeta.models.Conv4`,
  its head widened to ``dim``) embeds every image;
* each support example becomes one token from its embedding and its one-hot
  label, each query example one token from its embedding and a blank (zero)
  label, through the same linear map;
* pre-norm Transformer layers without positional encodings, in which support
  tokens attend to the support tokens and each query token to the support
  tokens and itself (never to another query, so a query's prediction does not
  depend on the other queries beyond the embedding's batch norm);
* a linear read-out of each query token gives its ``ways`` logits.

Without positional encodings the predictions are invariant to the order of
the support examples.  Labels carry no class identity: the episode sampler
gives labels ``0..N-1`` to classes drawn afresh for every task, so the same
character has a different label in every task and the network cannot
memorise classes; it must read the label-image pairings from its input.

Which published design this follows, and where it differs: it is a black-box
meta-learner in the sense of Santoro et al. (2016, MANN) and Mishra et al.
(2018, SNAIL): labels are fed in with the support examples and the query
label is predicted from the sequence.  SNAIL reads the examples in a
sequence with temporal convolutions and causal attention, the query last;
here the support set is a *set* (no order, no causal mask) read by
self-attention, as in the Set Transformer (Lee et al., 2019), and all queries
of a task are predicted in one call, each attending only to the support set
and itself.  The embedding is the MAML paper's Conv4 rather than SNAIL's
ResNet-like encoder, and the model is small (2 layers, width 64) to train on
a CPU.

:func:`in_context_model` turns the task's classifier into the model the
pipelines train: a :class:`InContextModel` whose parameters hold the support
set it conditions on, so ``loss_fn(adapted, query)``, :func:`jaxmeta.evaluate`,
the non-transductive score and checkpoint ensembles treat it like any other
model.  :func:`blackbox` is the learner: ``adapt`` is conditioning on the
support set.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxmeta.algorithms.base import MetaLearner, amortized
from jaxmeta.inner import LossFn
from jaxmeta.types import Batch, Params


class InContextTransformer(nn.Module):
    """Query logits from a support set and query examples (see the module docstring).

    Attributes:
      embed: maps images ``[N, ...]`` to embeddings ``[N, dim]``.
      ways: classes per task (the one-hot labels and the logits).
      dim: the token width.
      heads: attention heads per layer.
      layers: Transformer layers.
      mlp_ratio: the feed-forward width as a multiple of ``dim``.
    """

    embed: nn.Module
    ways: int
    dim: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, support_x: jax.Array, support_y: jax.Array, query_x: jax.Array) -> jax.Array:
        """Logits ``[Q, ways]`` for the ``Q`` query examples, given the support set ``(support_x, support_y)``."""
        support_e, query_e = self.embed(support_x), self.embed(query_x)
        labels = jax.nn.one_hot(support_y, self.ways, dtype=support_e.dtype)
        blank = jnp.zeros((query_e.shape[0], self.ways), query_e.dtype)
        token = nn.Dense(self.dim, name="token")
        h = jnp.concatenate([token(jnp.concatenate([support_e, labels], -1)),
                             token(jnp.concatenate([query_e, blank], -1))])
        s, n = support_e.shape[0], h.shape[0]
        index = jnp.arange(n)
        mask = (index[None, :] < s) | (index[:, None] == index[None, :])  # [to, from]: the support set, and itself
        for i in range(self.layers):
            attention = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim,
                                                        name=f"attention_{i}")
            h = h + attention(nn.LayerNorm(name=f"norm_a{i}")(h), mask=mask[None])
            y = nn.LayerNorm(name=f"norm_m{i}")(h)
            y = nn.Dense(self.dim * self.mlp_ratio, name=f"mlp_in_{i}")(y)
            h = h + nn.Dense(self.dim, name=f"mlp_out_{i}")(nn.gelu(y))
        return nn.Dense(self.ways, name="readout")(nn.LayerNorm(name="norm_out")(h[s:]))


class InContextModel(NamedTuple):
    """The in-context network as a classifier of ``x`` alone: its parameters carry the support set.

    ``apply({"params": {"net": ..., "support": (x_s, y_s)}}, x)`` returns the
    logits of ``x`` given that support set, the signature of a Flax module
    that the loss factories of :mod:`jaxmeta.models` and
    :func:`jaxmeta.evaluate` expect.  ``init(key, x)`` gives the meta-parameters
    ``{"net": ...}`` (no support set: :func:`blackbox`'s ``adapt`` adds it).

    Attributes:
      net: the :class:`InContextTransformer`.
    """

    net: InContextTransformer

    def init(self, key: jax.Array, x: jax.Array) -> dict[str, Params]:
        """``{"params": {"net": ...}}`` initialised with ``x`` as both support set and queries."""
        labels = jnp.arange(x.shape[0]) % self.net.ways
        return {"params": {"net": self.net.init(key, x, labels, x)["params"]}}

    def apply(self, variables: dict[str, Any], x: jax.Array) -> jax.Array:
        """The logits of ``x`` given the support set in ``variables["params"]["support"]``."""
        params = variables["params"]
        if "support" not in params:
            raise ValueError("an in-context model predicts only after adapt() has given it a support set")
        support_x, support_y = params["support"]
        return self.net.apply({"params": params["net"]}, support_x, support_y, x)


def in_context_model(model: nn.Module, *, dim: int = 64, heads: int = 4, layers: int = 2) -> InContextModel:
    """The :class:`InContextModel` over a task classifier with a ``ways`` attribute (e.g. ``Conv4``).

    The classifier, its head widened to ``dim`` outputs, embeds the images;
    its ``ways`` sets the labels and logits.
    """
    return InContextModel(InContextTransformer(embed=model.clone(ways=dim), ways=model.ways, dim=dim,
                                               heads=heads, layers=layers))


def condition(params: Params, support: Batch) -> Params:
    """The black box's adaptation: its parameters together with the support set it reads."""
    return {**params, "support": tuple(support)}


def blackbox(loss_fn: LossFn, *, outer: optax.GradientTransformation, has_aux: bool = False,
             chunk_size: int | None = None) -> MetaLearner:
    """The in-context learner as a :class:`~jaxmeta.MetaLearner`.

    Args:
      loss_fn: ``loss_fn(adapted, (x, y))`` of an :class:`InContextModel`,
        e.g. ``classification_loss(in_context_model(conv4_omniglot(5)))``.
      outer: the optax optimiser of the network.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: tasks per chunk (``None``: all tasks in one ``vmap``).

    Returns:
      A :class:`~jaxmeta.MetaLearner` (:func:`~jaxmeta.algorithms.base.amortized`):
      ``step`` minimises the query loss given each task's support set;
      ``adapt`` is :func:`condition` (no gradient steps: with ``observe``
      every step count sees the same predictions).
    """
    return amortized(condition, loss_fn, outer=outer, has_aux=has_aux, chunk_size=chunk_size)
