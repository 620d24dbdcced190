"""Multi-layer perceptron: the MAML sinusoid-regression network (1-40-40-1)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """A ReLU multi-layer perceptron with a linear output layer.

    The defaults give the network of the MAML sinusoid experiments: two hidden
    layers of 40 units and one output.  The module is stateless: ``init``
    returns only a ``params`` collection.

    Attributes:
      features: Widths of the hidden layers, each followed by a ReLU.
      out: Width of the final linear layer.
    """

    features: Sequence[int] = (40, 40)
    out: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the network.

        Args:
          x: Inputs of shape ``[..., d_in]``.

        Returns:
          Outputs of shape ``[..., out]``.
        """
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.out)(x)
