"""Loss functions in the form the meta-learning algorithms consume.

Each factory wraps a Flax module into ``loss_fn(params, batch)``, where
``params`` is the module's ``params`` collection (a plain pytree) and
``batch = (x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxmeta.types import Batch, Params

ClassificationLossFn = Callable[[Params, Batch], tuple[jax.Array, dict[str, jax.Array]]]
RegressionLossFn = Callable[[Params, Batch], jax.Array]


def _cross_entropy_and_accuracy(logits: jax.Array, y: jax.Array, *, probabilities: bool = False
                                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    labels = y.astype(jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
    aux = {"accuracy": accuracy}
    if probabilities:
        aux["probabilities"] = jax.nn.softmax(logits, axis=-1)
    return loss, aux


def classification_loss(model: nn.Module) -> ClassificationLossFn:
    """Mean softmax cross-entropy with integer labels, plus accuracy.

    Args:
      model: A module mapping ``x`` to logits ``[N, classes]``.

    Returns:
      ``loss_fn(params, (x, y)) -> (loss, {"accuracy": accuracy})`` where ``y``
      holds integer labels ``[N]``, ``loss`` is the mean cross-entropy and
      ``accuracy`` the fraction of examples whose arg-max logit is the label.
    """

    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, y = batch
        return _cross_entropy_and_accuracy(model.apply({"params": params}, x), y)

    return loss_fn


QueryScore = Callable[[Params, Batch, Batch], tuple[jax.Array, dict[str, jax.Array]]]
"""``score(params, support, query) -> (loss, aux)``: how an adapted model is scored on a query set."""


def transductive_classification_score(model: nn.Module, *, probabilities: bool = False) -> QueryScore:
    """Scores the whole query set in one batch (batch norm sees every query example at once).

    The same loss and accuracy as :func:`classification_loss` on the query
    set, as a :data:`QueryScore`; with ``probabilities``, ``aux`` also holds
    the softmax ``[queries, classes]`` (what a checkpoint ensemble averages).
    """

    def score(params: Params, support: Batch, query: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        x, y = query
        return _cross_entropy_and_accuracy(model.apply({"params": params}, x), y, probabilities=probabilities)

    return score


def non_transductive_classification_score(model: nn.Module, *, probabilities: bool = False) -> QueryScore:
    """Scores each query example alone: in one batch with the whole support set, never with another query.

    With batch norm over the batch (as in :class:`~jaxmeta.models.Conv4`),
    scoring the query set in one batch lets its examples see each other's
    statistics (*transductive*, the MAML reference code's evaluation).  This
    is the Reptile paper's non-transductive evaluation (openai/supervised-reptile
    without ``--transductive``): query example ``j`` is predicted in a batch of
    the support images plus ``x_j``, and only that last row is scored.

    Args:
      model: A module mapping ``x`` to logits ``[N, classes]``.
      probabilities: also return each query example's softmax
        (``aux["probabilities"]``, ``[queries, classes]``).

    Returns:
      ``score(params, support, (x, y)) -> (loss, {"accuracy"})``, the mean
      cross-entropy and accuracy over the query examples.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmeta.models import Conv4
      >>> model = Conv4(ways=2, filters=4)
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1)); y = jnp.array([0, 1, 0, 1, 0, 1])
      >>> params = model.init(jax.random.PRNGKey(1), x)["params"]
      >>> loss, aux = non_transductive_classification_score(model)(params, (x[:2], y[:2]), (x[2:], y[2:]))
      >>> loss.shape, aux["accuracy"].shape
      ((), ())
    """

    def score(params: Params, support: Batch, query: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        context, (x, y) = support[0], query

        def alone(example):
            batch = jnp.concatenate([context, example[None].astype(context.dtype)])
            return model.apply({"params": params}, batch)[-1]

        return _cross_entropy_and_accuracy(jax.vmap(alone)(x), y, probabilities=probabilities)

    return score


def regression_loss(model: nn.Module) -> RegressionLossFn:
    """Mean squared error.

    Args:
      model: A module mapping ``x`` to predictions.

    Returns:
      ``loss_fn(params, (x, y)) -> mse``, a scalar.  Predictions are reshaped to
      ``y``'s shape when they hold the same number of values (so ``[N, 1]``
      predictions against ``[N]`` targets never broadcast to ``[N, N]``).

    Raises:
      ValueError: At trace time, if predictions and targets differ in size.
    """

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        pred = model.apply({"params": params}, x)
        if pred.shape != y.shape:
            if pred.size != y.size:
                raise ValueError(
                    f"predictions of shape {pred.shape} do not match targets {y.shape}"
                )
            pred = pred.reshape(y.shape)
        return jnp.mean(jnp.square(pred - y))

    return loss_fn
