"""The Conv4 network of the MAML paper, with a fast CPU convolution.

Four blocks of ``[3x3 conv, batch norm, ReLU]`` (plus a 2x2 max-pool per block
in the Mini-ImageNet variant), a global mean pool over space and a linear
``ways``-way head.

Batch norm is *transductive* and *stateless*: it always normalises with the
statistics of the batch it is applied to (the setting of the MAML reference
implementation, which never uses running averages), has a learnable per-channel
scale and bias, and keeps no running statistics.  ``init`` therefore returns
only a ``params`` collection, so the network can be differentiated through an
inner loop (grad of grad) and vmapped over tasks with per-task parameters.
Because the statistics come from the batch, the support set and the query set of
a task are each normalised with their own statistics (per task when vmapped over
tasks), and predictions for one example depend on the other examples of the same
call.

Differences from the MAML reference code: the batch norm has a learnable scale
as well as a bias (the reference's ``tf.contrib.layers.batch_norm`` only learns a
bias), the convolutions have no bias (batch norm cancels it), and both variants
end with a global mean pool over space (the reference flattens the 5x5x32
Mini-ImageNet features instead).  Convolution kernels use Glorot-uniform
initialisation as in the reference; the head uses Flax's ``Dense`` default.

Two convolution implementations share one parameter layout (an HWIO kernel
``[3, 3, C_in, C_out]``), so parameters are interchangeable between them:

* ``"native"``: ``lax.conv_general_dilated``.
* ``"patches"``: the nine shifted (strided) slices of the padded input are
  concatenated along channels and multiplied by the kernel reshaped to
  ``[9 * C_in, C_out]``.  On CPU, vmapped over per-task kernels inside a
  second-order meta-gradient, this is many times faster than the native
  convolution, whose batching rule turns per-task kernels into a grouped
  convolution.

``"auto"`` picks ``"patches"`` on the CPU and GPU backends, where it was
measured faster (on an H200, the 5-way 1-shot second-order meta-step took
2.9 ms against 8.6 ms with one inner step and 6.3 ms against 39.9 ms with
five; see docs/benchmark.md, "The patches convolution on the GPU"), and ``"native"`` elsewhere (TPU: not measured).
The choice also selects the 2x2 max-pool: an argmax-mask over reshaped windows
for ``"patches"`` (faster than ``lax.reduce_window`` under vmap on CPU) and
``lax.reduce_window`` for ``"native"``; both pass gradients to the first
maximum of each window.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxmeta.errors import ConfigError

CONV_IMPLS = ("auto", "patches", "native")


def resolve_conv_impl(conv_impl: str) -> str:
    """Resolves a convolution implementation name to ``"patches"`` or ``"native"``.

    Args:
      conv_impl: One of ``"auto"``, ``"patches"``, ``"native"``.  ``"auto"``
        means ``"patches"`` on the CPU and GPU backends and ``"native"``
        otherwise.

    Returns:
      ``"patches"`` or ``"native"``.

    Raises:
      ConfigError: If ``conv_impl`` is not a known name.
    """
    if conv_impl not in CONV_IMPLS:
        raise ConfigError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "patches" if jax.default_backend() in ("cpu", "gpu") else "native"
    return conv_impl


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding ``(low, high)`` of XLA's ``"SAME"`` rule along one axis.

    The output has ``ceil(size / stride)`` positions; the total padding needed
    is split with the smaller half (``total // 2``) before and the rest after,
    so an odd total pads one more at the end (e.g. 28 -> 14 with stride 2 pads
    ``(0, 1)``, 7 -> 4 pads ``(1, 1)``).

    Args:
      size: Input length.
      kernel: Kernel length.
      stride: Stride.

    Returns:
      ``(low, high)`` padding.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d_patches(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A ``"SAME"`` 2-D convolution as image patches times a matmul.

    Args:
      x: Input ``[N, H, W, C_in]``.
      kernel: HWIO kernel ``[kh, kw, C_in, C_out]``.
      stride: Stride along both spatial axes.

    Returns:
      Output ``[N, ceil(H / stride), ceil(W / stride), C_out]``, equal to
      :func:`conv2d_native` up to float rounding.
    """
    n, h, w, c = x.shape
    kh, kw, c_in, c_out = kernel.shape
    if c_in != c:
        raise ValueError(f"kernel expects {c_in} input channels, input has {c}")
    pad_h = same_padding(h, kh, stride)
    pad_w = same_padding(w, kw, stride)
    ho, wo = -(-h // stride), -(-w // stride)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    slices = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    # Channel order (i, j, c_in) matches the row-major flattening of HWIO.
    patches = jnp.concatenate(slices, axis=-1).reshape(n * ho * wo, kh * kw * c)
    out = patches @ kernel.reshape(kh * kw * c_in, c_out)
    return out.reshape(n, ho, wo, c_out)


def conv2d_native(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A ``"SAME"`` 2-D convolution with ``lax.conv_general_dilated``.

    Args:
      x: Input ``[N, H, W, C_in]``.
      kernel: HWIO kernel ``[kh, kw, C_in, C_out]``.
      stride: Stride along both spatial axes.

    Returns:
      Output ``[N, ceil(H / stride), ceil(W / stride), C_out]``.
    """
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def max_pool_2x2_patches(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, ``"VALID"`` padding, as a reshape and a masked sum.

    Each window's winner is chosen by ``argmax`` (the first maximum, as
    ``lax.reduce_window``'s gradient does) and turned into a constant one-hot
    mask; the output is the masked sum of the window, so every derivative is
    linear in the mask.  ``jnp.max`` is deliberately not used: its derivative
    locates the winner by testing bitwise equality between the input and the
    output, and when XLA recomputes the input in another fusion with different
    rounding (e.g. a batch-norm output in a jitted second-order MAML step) the
    test fails and the gradient is silently wrong.

    Args:
      x: Input ``[N, H, W, C]``.

    Returns:
      Output ``[N, H // 2, W // 2, C]``.
    """
    n, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    windows = (
        x[:, : 2 * ho, : 2 * wo, :]
        .reshape(n, ho, 2, wo, 2, c)
        .transpose(0, 1, 3, 5, 2, 4)
        .reshape(n, ho, wo, c, 4)
    )
    mask = lax.stop_gradient(jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype))
    return jnp.sum(windows * mask, axis=-1)


def max_pool_2x2_native(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, ``"VALID"`` padding, with ``lax.reduce_window``.

    Args:
      x: Input ``[N, H, W, C]``.

    Returns:
      Output ``[N, H // 2, W // 2, C]``.
    """
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class Conv3x3(nn.Module):
    """A bias-free 3x3 ``"SAME"`` convolution with a selectable implementation.

    There is no bias: every use in :class:`Conv4` is followed by batch norm,
    which subtracts the per-channel mean and would cancel it.

    Attributes:
      features: Output channels.
      stride: Stride along both spatial axes.
      conv_impl: ``"auto"``, ``"patches"`` or ``"native"`` (see
        :func:`resolve_conv_impl`); the ``kernel`` parameter is HWIO
        ``[3, 3, C_in, features]`` for all of them.
      kernel_init: Initialiser of the kernel.
    """

    features: int
    stride: int = 1
    conv_impl: str = "auto"
    kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves ``x`` (``[N, H, W, C_in]``)."""
        kernel = self.param(
            "kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32
        )
        kernel = kernel.astype(x.dtype)
        if resolve_conv_impl(self.conv_impl) == "patches":
            return conv2d_patches(x, kernel, self.stride)
        return conv2d_native(x, kernel, self.stride)


class BatchNorm(nn.Module):
    """Stateless batch norm that always uses the current batch's statistics.

    Normalises every channel (last axis) with the mean and biased variance over
    all other axes of the input, then applies a learnable per-channel ``scale``
    (initialised to 1) and ``bias`` (initialised to 0).  There are no running
    statistics and no mutable collections, so training and evaluation behave
    identically (transductive batch norm, as in the MAML reference).

    Attributes:
      epsilon: Added to the variance before the inverse square root.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x`` (``[..., C]``) with its own per-channel statistics."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=axes)
        inv = lax.rsqrt(var + self.epsilon) * scale.astype(x.dtype)
        return centred * inv + bias.astype(x.dtype)


class Conv4(nn.Module):
    """The four-block convolutional network of the MAML paper.

    Each block is a 3x3 ``"SAME"`` convolution with ``filters`` channels and
    the given ``stride``, stateless batch norm (:class:`BatchNorm`), ReLU, and,
    when ``pool`` is set, a 2x2 max-pool with stride 2.  The features are then
    averaged over space and mapped to ``ways`` logits by a linear head.

    * Omniglot: ``filters=64, stride=2, pool=False`` on ``[N, 28, 28, 1]``
      (spatial sizes 28 -> 14 -> 7 -> 4 -> 2).
    * Mini-ImageNet: ``filters=32, stride=1, pool=True`` on ``[N, 84, 84, 3]``
      (84 -> 42 -> 21 -> 10 -> 5).

    Parameters are ``conv_{k}/kernel`` (HWIO), ``bn_{k}/scale``,
    ``bn_{k}/bias`` for ``k`` in 0..3, and ``head/kernel``, ``head/bias``.

    Attributes:
      ways: Number of output classes.
      filters: Channels of every convolution.
      stride: Stride of every convolution.
      pool: Whether each block ends with a 2x2 max-pool.
      conv_impl: ``"auto"``, ``"patches"`` or ``"native"``; parameters are
        identical across implementations.
      bn_epsilon: Batch-norm epsilon.
    """

    ways: int
    filters: int = 64
    stride: int = 2
    pool: bool = False
    conv_impl: str = "auto"
    bn_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.ways < 1:
            raise ConfigError(f"ways must be >= 1, got {self.ways}")
        if self.filters < 1:
            raise ConfigError(f"filters must be >= 1, got {self.filters}")
        if self.stride < 1:
            raise ConfigError(f"stride must be >= 1, got {self.stride}")
        if self.conv_impl not in CONV_IMPLS:
            raise ConfigError(
                f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits.

        Args:
          x: Images ``[N, H, W, C]``.  The whole call is one batch for the
            batch-norm statistics.

        Returns:
          Logits ``[N, ways]``.

        Raises:
          ValueError: At trace time, if ``x`` is not 4-D or is too small for
            four blocks (a block would leave no spatial positions).
        """
        if x.ndim != 4:
            raise ValueError(f"Conv4 expects [N, H, W, C] inputs, got shape {x.shape}")
        impl = resolve_conv_impl(self.conv_impl)
        input_hw = x.shape[1:3]
        for k in range(4):
            x = Conv3x3(self.filters, self.stride, impl, name=f"conv_{k}")(x)
            x = BatchNorm(self.bn_epsilon, name=f"bn_{k}")(x)
            x = nn.relu(x)
            if self.pool:
                x = max_pool_2x2_patches(x) if impl == "patches" else max_pool_2x2_native(x)
            if x.shape[1] == 0 or x.shape[2] == 0:
                raise ValueError(
                    f"input of spatial size {input_hw} is too small: block {k} of Conv4 "
                    f"(stride={self.stride}, pool={self.pool}) leaves no positions"
                )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.ways, name="head")(x)


def conv4_omniglot(ways: int, conv_impl: str = "auto") -> Conv4:
    """Conv4 for Omniglot: 64 filters, stride-2 convolutions, 28x28x1 input.

    Args:
      ways: Number of classes.
      conv_impl: ``"auto"``, ``"patches"`` or ``"native"``.

    Returns:
      The module.
    """
    return Conv4(ways=ways, filters=64, stride=2, pool=False, conv_impl=conv_impl)


def conv4_miniimagenet(ways: int, conv_impl: str = "auto") -> Conv4:
    """Conv4 for Mini-ImageNet: 32 filters, stride-1 convs + 2x2 max-pool, 84x84x3.

    Args:
      ways: Number of classes.
      conv_impl: ``"auto"``, ``"patches"`` or ``"native"``.

    Returns:
      The module.
    """
    return Conv4(ways=ways, filters=32, stride=1, pool=True, conv_impl=conv_impl)
