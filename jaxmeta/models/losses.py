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
        logits = model.apply({"params": params}, x)
        labels = y.astype(jnp.int32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
        return loss, {"accuracy": accuracy}

    return loss_fn


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
