"""Models: Flax modules and the loss functions the algorithms consume."""

from __future__ import annotations

from jaxmeta.models.conv4 import (
    CONV_IMPLS,
    BatchNorm,
    Conv3x3,
    Conv4,
    conv2d_native,
    conv2d_patches,
    conv4_miniimagenet,
    conv4_omniglot,
    max_pool_2x2_native,
    max_pool_2x2_patches,
    resolve_conv_impl,
    same_padding,
)
from jaxmeta.models.losses import (
    classification_loss,
    non_transductive_classification_score,
    regression_loss,
    transductive_classification_score,
)
from jaxmeta.models.mlp import MLP

__all__ = [
    "CONV_IMPLS",
    "MLP",
    "BatchNorm",
    "Conv3x3",
    "Conv4",
    "classification_loss",
    "conv2d_native",
    "conv2d_patches",
    "conv4_miniimagenet",
    "conv4_omniglot",
    "max_pool_2x2_native",
    "max_pool_2x2_patches",
    "non_transductive_classification_score",
    "regression_loss",
    "resolve_conv_impl",
    "same_padding",
    "transductive_classification_score",
]
