"""Tests of the models: shapes, conv implementations, batch norm, losses."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmeta.errors import ConfigError
from jaxmeta.models import (
    MLP,
    BatchNorm,
    Conv4,
    classification_loss,
    conv2d_native,
    conv2d_patches,
    conv4_miniimagenet,
    conv4_omniglot,
    max_pool_2x2_native,
    max_pool_2x2_patches,
    non_transductive_classification_score,
    regression_loss,
    resolve_conv_impl,
    same_padding,
)


def _allclose_tree(a, b, rtol: float, atol: float) -> None:
    flat_a, tree_a = jax.tree.flatten_with_path(a)
    flat_b, tree_b = jax.tree.flatten_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------- shapes


def test_omniglot_output_shape_and_params():
    model = conv4_omniglot(5)
    x = jnp.zeros((4, 28, 28, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert list(variables) == ["params"]
    params = variables["params"]
    assert params["conv_0"]["kernel"].shape == (3, 3, 1, 64)
    assert params["conv_3"]["kernel"].shape == (3, 3, 64, 64)
    assert params["bn_2"]["scale"].shape == (64,)
    assert params["head"]["kernel"].shape == (64, 5)
    for impl in ("patches", "native"):
        out = jax.eval_shape(conv4_omniglot(5, conv_impl=impl).apply, variables, x)
        assert out.shape == (4, 5)


def test_miniimagenet_output_shape_and_params():
    model = conv4_miniimagenet(5)
    x = jnp.zeros((2, 84, 84, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert list(variables) == ["params"]
    params = variables["params"]
    assert params["conv_0"]["kernel"].shape == (3, 3, 3, 32)
    assert params["conv_3"]["kernel"].shape == (3, 3, 32, 32)
    assert params["head"]["kernel"].shape == (32, 5)
    for impl in ("patches", "native"):
        out = jax.eval_shape(conv4_miniimagenet(5, conv_impl=impl).apply, variables, x)
        assert out.shape == (2, 5)


def test_too_small_input_is_a_clear_error():
    model = conv4_miniimagenet(5)
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 12, 12, 3)))


def test_mlp_shapes_and_stateless():
    model = MLP()
    variables = model.init(jax.random.key(0), jnp.zeros((7, 1)))
    assert list(variables) == ["params"]
    shapes = jax.tree.map(jnp.shape, variables["params"])
    assert shapes == {
        "Dense_0": {"kernel": (1, 40), "bias": (40,)},
        "Dense_1": {"kernel": (40, 40), "bias": (40,)},
        "Dense_2": {"kernel": (40, 1), "bias": (1,)},
    }
    assert model.apply(variables, jnp.ones((7, 1))).shape == (7, 1)


def test_config_errors_and_auto():
    with pytest.raises(ConfigError):
        Conv4(ways=5, conv_impl="winograd")
    with pytest.raises(ConfigError):
        Conv4(ways=0)
    with pytest.raises(ConfigError):
        resolve_conv_impl("fft")
    expected = "patches" if jax.default_backend() == "cpu" else "native"
    assert resolve_conv_impl("auto") == expected
    assert resolve_conv_impl("native") == "native"


# --------------------------------------------------------------------------- conv / pool


@pytest.mark.parametrize(
    ("size", "stride", "expected"),
    [(28, 2, (0, 1)), (14, 2, (0, 1)), (7, 2, (1, 1)), (4, 2, (0, 1)), (84, 1, (1, 1))],
)
def test_same_padding_matches_xla_rule(size, stride, expected):
    assert same_padding(size, 3, stride) == expected


@functools.partial(jax.jit, static_argnums=2)
def _both_convs(x, kernel, stride):
    return conv2d_patches(x, kernel, stride), conv2d_native(x, kernel, stride)


@pytest.mark.parametrize(
    ("size", "c_in", "stride"),
    [(28, 1, 2), (14, 4, 2), (7, 4, 2), (4, 4, 2), (2, 4, 2), (5, 3, 2), (10, 3, 1), (7, 2, 1)],
)
def test_conv_patches_matches_native(size, c_in, stride):
    kx, kk = jax.random.split(jax.random.key(size * 10 + stride))
    x = jax.random.normal(kx, (3, size, size, c_in))
    kernel = jax.random.normal(kk, (3, 3, c_in, 6))
    a, b = _both_convs(x, kernel, stride)
    assert a.shape == b.shape == (3, -(-size // stride), -(-size // stride), 6)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [4, 5, 84, 21])
def test_max_pool_patches_matches_native(size):
    x = jax.random.normal(jax.random.key(size), (2, size, size, 3))

    @jax.jit
    def both(v):
        pools = (max_pool_2x2_patches, max_pool_2x2_native)
        outs = [pool(v) for pool in pools]
        grads = [jax.grad(lambda u, f=pool: jnp.sum(jnp.sin(f(u))))(v) for pool in pools]
        return outs, grads

    (a, b), (ga, gb) = both(x)
    assert a.shape == b.shape == (2, size // 2, size // 2, 3)
    np.testing.assert_array_equal(a, b)
    # Both send the gradient to the first maximum of each window.
    np.testing.assert_allclose(ga, gb, atol=1e-6)


def test_max_pool_second_order_under_jit():
    """Regression: a ``jnp.max`` pool gave wrong jitted second-order gradients.

    Its derivative locates the maximum by bitwise equality, which breaks when
    XLA recomputes the batch-normalised input with different rounding.
    """

    def make(conv, pool):
        def f(k, xx):
            y = conv(xx, k, 1)
            y = (y - y.mean((0, 1, 2))) / jnp.sqrt(y.var((0, 1, 2)) + 1e-5)
            return jnp.sum(jnp.sin(pool(y)))

        def meta(k, x):
            return jax.vmap(lambda xx: jnp.sum(jax.grad(f)(k, xx) ** 2))(x).sum()

        return jax.grad(meta)

    reference_fn = make(conv2d_native, max_pool_2x2_native)  # eager
    jitted_fn = jax.jit(make(conv2d_patches, max_pool_2x2_patches))
    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (2, 3, 2, 2, 2))
        kernel = jax.random.normal(jax.random.key(seed + 100), (3, 3, 2, 2))
        np.testing.assert_allclose(
            jitted_fn(kernel, x), reference_fn(kernel, x), rtol=1e-4, atol=1e-4
        )


# Small stand-ins for the two variants keep compile and run times short.
_VARIANTS = {
    "stride2": (dict(ways=3, filters=16, stride=2, pool=False), (28, 28, 1)),
    "pooled": (dict(ways=3, filters=8, stride=1, pool=True), (20, 20, 3)),
}


def _task_batch(image_shape, ways: int, tasks: int, shots: int, queries: int):
    keys = jax.random.split(jax.random.key(1), 2)
    sx = jax.random.normal(keys[0], (tasks, ways * shots, *image_shape))
    qx = jax.random.normal(keys[1], (tasks, ways * queries, *image_shape))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (tasks, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (tasks, 1))
    return sx, sy, qx, qy


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_conv4_patches_and_native_agree(variant):
    """Same outputs, loss gradients and second-order MAML meta-gradients."""
    fields, image_shape = _VARIANTS[variant]
    ways = fields["ways"]
    models = {impl: Conv4(**fields, conv_impl=impl) for impl in ("patches", "native")}
    sx, sy, qx, qy = _task_batch(image_shape, ways, tasks=2, shots=2, queries=3)
    params = jax.jit(models["native"].init)(jax.random.key(0), sx[0])["params"]
    # Parameters are interchangeable: the patches model inits to the same tree.
    patches_params = jax.jit(models["patches"].init)(jax.random.key(0), sx[0])["params"]
    _allclose_tree(params, patches_params, rtol=0, atol=0)

    def maml_objective(loss_fn):
        """One SGD inner step on the support set, query loss after; mean over tasks."""

        def task_loss(p, sx_t, sy_t, qx_t, qy_t):
            grads = jax.grad(lambda q: loss_fn(q, (sx_t, sy_t))[0])(p)
            adapted = jax.tree.map(lambda w, g: w - 0.4 * g, p, grads)
            return loss_fn(adapted, (qx_t, qy_t))[0]

        def meta_loss(p):
            per_task = jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
            return per_task.mean()

        return meta_loss

    @jax.jit
    def everything(p):
        out = {}
        for impl, model in models.items():
            loss_fn = classification_loss(model)
            out[impl] = (
                model.apply({"params": p}, qx[0]),
                jax.grad(lambda q: loss_fn(q, (qx[0], qy[0]))[0])(p),
                jax.value_and_grad(maml_objective(loss_fn))(p),
            )
        return out

    out = everything(params)
    (logits_p, grad_p, (meta_p, meta_grad_p)) = out["patches"]
    (logits_n, grad_n, (meta_n, meta_grad_n)) = out["native"]
    assert logits_p.shape == (ways * 3, ways)
    np.testing.assert_allclose(logits_p, logits_n, atol=1e-5, rtol=1e-5)
    _allclose_tree(grad_p, grad_n, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(meta_p, meta_n, atol=1e-5, rtol=1e-5)
    _allclose_tree(meta_grad_p, meta_grad_n, rtol=1e-4, atol=1e-5)
    # The meta-gradient is not trivially zero.
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(meta_grad_p))


# --------------------------------------------------------------------------- batch norm


def test_batch_norm_uses_batch_statistics():
    x = 3.0 + 2.5 * jax.random.normal(jax.random.key(0), (6, 5, 5, 4))
    x = x * jnp.arange(1.0, 5.0)  # channels with different scales
    bn = BatchNorm()
    variables = bn.init(jax.random.key(1), x)
    assert list(variables) == ["params"]
    np.testing.assert_array_equal(variables["params"]["scale"], jnp.ones(4))
    np.testing.assert_array_equal(variables["params"]["bias"], jnp.zeros(4))
    y = bn.apply(variables, x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), jnp.zeros(4), atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), jnp.ones(4), atol=1e-4)
    # A learnt scale and bias set the per-channel std and mean.
    params = {"scale": jnp.full((4,), 2.0), "bias": jnp.full((4,), -1.0)}
    z = bn.apply({"params": params}, x)
    np.testing.assert_allclose(jnp.mean(z, axis=(0, 1, 2)), jnp.full(4, -1.0), atol=1e-5)
    np.testing.assert_allclose(jnp.std(z, axis=(0, 1, 2)), jnp.full(4, 2.0), atol=1e-4)


def test_conv4_is_stateless_and_transductive():
    model = conv4_omniglot(4)
    x = jax.random.normal(jax.random.key(0), (6, 28, 28, 1))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    assert list(variables) == ["params"]
    # No mutable collections: apply without `mutable` works and is repeatable.
    apply = jax.jit(model.apply)
    a = apply(variables, x)
    np.testing.assert_array_equal(a, apply(variables, x))
    # Statistics come from the batch: an example's logits depend on its batch.
    b = apply(variables, jnp.concatenate([x[:3], 5.0 * x[3:]]))
    assert not np.allclose(a[:3], b[:3], atol=1e-4)


# --------------------------------------------------------------------------- losses


class _Identity(nn.Module):
    """Returns its input, so a loss can be checked on hand-written logits."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def test_classification_loss_hand_computed():
    loss_fn = classification_loss(_Identity())
    logits = jnp.tile(jnp.array([[0.0, math.log(3.0)]]), (4, 1))  # softmax = [1/4, 3/4]
    labels = jnp.array([1, 0, 1, 0])  # arg-max is always 1: half correct
    loss, aux = loss_fn({}, (logits, labels))
    expected = -(math.log(0.75) + math.log(0.25)) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert set(aux) == {"accuracy"}
    np.testing.assert_allclose(aux["accuracy"], 0.5)


def test_regression_loss_hand_computed():
    loss_fn = regression_loss(_Identity())
    x = jnp.array([[1.0], [2.0], [3.0]])
    # [N, 1] predictions against [N] targets: reshaped, not broadcast to [N, N].
    np.testing.assert_allclose(loss_fn({}, (x, jnp.array([1.0, 0.0, 3.0]))), 4.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(loss_fn({}, (x, jnp.array([[0.0], [2.0], [5.0]]))), 5.0 / 3.0)
    with pytest.raises(ValueError):
        loss_fn({}, (x, jnp.zeros(4)))


def test_regression_loss_with_mlp_is_differentiable():
    model = MLP()
    x = jnp.linspace(-5.0, 5.0, 10)[:, None]
    y = jnp.sin(x)[:, 0]
    params = model.init(jax.random.key(0), x)["params"]
    loss_fn = regression_loss(model)
    loss = loss_fn(params, (x, y))
    assert loss.shape == ()
    grads = jax.grad(loss_fn)(params, (x, y))
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_non_transductive_score_predicts_each_query_example_with_the_support_set_alone():
    """Reptile's evaluation: query example j is scored in a batch of the support set plus x_j only."""
    model = Conv4(ways=3, filters=8, stride=2)
    rng = np.random.default_rng(5)
    support = (jnp.asarray(rng.normal(size=(3, 12, 12, 1)), jnp.float32), jnp.arange(3))
    query = (jnp.asarray(rng.normal(size=(6, 12, 12, 1)), jnp.float32), jnp.array([0, 1, 2, 2, 1, 0]))
    params = model.init(jax.random.PRNGKey(0), support[0])["params"]
    score = jax.jit(non_transductive_classification_score(model))
    loss, aux = score(params, support, query)

    # By hand: one forward pass per query example, its own row of the logits.
    rows = np.stack([np.asarray(model.apply({"params": params}, jnp.concatenate([support[0], query[0][j:j + 1]])))[-1]
                     for j in range(6)])
    logp = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
    labels = np.asarray(query[1])
    np.testing.assert_allclose(loss, -logp[np.arange(6), labels].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], np.mean(rows.argmax(-1) == labels), rtol=1e-6)

    # No query example sees another: the set's score is the mean of each example's scored alone, while
    # transductively (batch norm over the query set) example 0's logits move when the others change.
    singles = [score(params, support, (query[0][j:j + 1], query[1][j:j + 1]))[0] for j in range(6)]
    np.testing.assert_allclose(loss, np.mean(singles), rtol=1e-5)
    first_logits = lambda x: np.asarray(model.apply({"params": params}, x))[0]
    assert np.abs(first_logits(query[0]) - first_logits(query[0].at[1:].multiply(3.0))).max() > 1e-3

    # Without batch norm there is nothing to share: both modes agree.
    mlp = MLP(features=(16,), out=3)
    flat = (support[0].reshape(3, -1), support[1]), (query[0].reshape(6, -1), query[1])
    mlp_params = mlp.init(jax.random.PRNGKey(1), flat[0][0])["params"]
    np.testing.assert_allclose(non_transductive_classification_score(mlp)(mlp_params, *flat)[0],
                               classification_loss(mlp)(mlp_params, flat[1])[0], rtol=1e-5)
