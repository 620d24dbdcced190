"""A small byte-level encoder-decoder Transformer (Flax), its loss and greedy decoding.

Pre-layer-norm blocks, sinusoidal positions (no learned position table, so a
test sentence may be longer than any training one), one embedding table shared
by the encoder input, the decoder input and the output projection.  No
dropout: meta-learning differentiates through the inner loop, and a
deterministic model keeps that exact.

Decoding keeps a key/value cache per decoder layer, so each generated token
costs one token's worth of computation (not a re-run over the prefix).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxmeta.tokens import BOS, EOS, PAD, VOCAB_SIZE
from jaxmeta.types import Batch, Params

NEG_INF = -1e9


class TransformerConfig(NamedTuple):
    """Sizes of the model (all hashable, stored in run identities)."""

    d_model: int = 128
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 512
    vocab: int = VOCAB_SIZE


def positions(length: int, d_model: int, offset: jax.Array | int = 0) -> jax.Array:
    """Sinusoidal position encodings ``[length, d_model]`` starting at ``offset``."""
    pos = (jnp.arange(length) + offset)[:, None].astype(jnp.float32)
    i = jnp.arange(d_model // 2)[None, :].astype(jnp.float32)
    angle = pos / jnp.power(10_000.0, 2 * i / d_model)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class Attention(nn.Module):
    """Multi-head attention, with its key/value projection callable on its own (for caches)."""

    heads: int
    d_model: int

    def setup(self):
        dh = self.d_model // self.heads
        self.query = nn.DenseGeneral((self.heads, dh), name="query")
        self.key = nn.DenseGeneral((self.heads, dh), name="key")
        self.value = nn.DenseGeneral((self.heads, dh), name="value")
        self.out = nn.DenseGeneral(self.d_model, axis=(-2, -1), name="out")

    def keys_values(self, kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.key(kv), self.value(kv)

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """``x [B, T, d]`` attends to ``k, v [B, S, h, dh]`` where ``mask [B, T, S]`` is true."""
        q = self.query(x) / math.sqrt(self.d_model // self.heads)
        logits = jnp.einsum("bthd,bshd->bhts", q, k)
        logits = jnp.where(mask[:, None], logits, NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1)
        return self.out(jnp.einsum("bhts,bshd->bthd", weights, v))

    def __call__(self, x, kv, mask):
        return self.attend(x, *self.keys_values(kv), mask)


class FeedForward(nn.Module):
    d_model: int
    d_ff: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d_model)(nn.relu(nn.Dense(self.d_ff)(x)))


class EncoderLayer(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        h = nn.LayerNorm()(x)
        x = x + Attention(c.heads, c.d_model, name="self_attention")(h, h, mask)
        return x + FeedForward(c.d_model, c.d_ff)(nn.LayerNorm()(x))


class DecoderLayer(nn.Module):
    config: TransformerConfig

    def setup(self):
        c = self.config
        self.norm_self = nn.LayerNorm()
        self.self_attention = Attention(c.heads, c.d_model)
        self.norm_cross = nn.LayerNorm()
        self.cross_attention = Attention(c.heads, c.d_model)
        self.norm_ff = nn.LayerNorm()
        self.feed_forward = FeedForward(c.d_model, c.d_ff)

    def __call__(self, y, encoded, self_mask, cross_mask):
        h = self.norm_self(y)
        y = y + self.self_attention(h, h, self_mask)
        y = y + self.cross_attention(self.norm_cross(y), encoded, cross_mask)
        return y + self.feed_forward(self.norm_ff(y))

    def cross_keys_values(self, encoded):
        return self.cross_attention.keys_values(encoded)

    def step(self, y, cache, position, cross_kv, cross_mask):
        """One new position ``y [B, 1, d]`` with the cached keys/values of the earlier ones."""
        h = self.norm_self(y)
        k, v = self.self_attention.keys_values(h)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache[0], k, position, axis=1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache[1], v, position, axis=1)
        length = cache_k.shape[1]
        mask = jnp.broadcast_to(jnp.arange(length) <= position, (y.shape[0], 1, length))
        y = y + self.self_attention.attend(h, cache_k, cache_v, mask)
        y = y + self.cross_attention.attend(self.norm_cross(y), *cross_kv, cross_mask)
        return y + self.feed_forward(self.norm_ff(y)), (cache_k, cache_v)


class Transformer(nn.Module):
    """``Transformer(config)(source, target_in) -> logits [B, T, vocab]``."""

    config: TransformerConfig

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab, c.d_model, embedding_init=nn.initializers.normal(c.d_model**-0.5))
        self.encoder = [EncoderLayer(c, name=f"encoder_{i}") for i in range(c.encoder_layers)]
        self.encoder_norm = nn.LayerNorm()
        self.decoder = [DecoderLayer(c, name=f"decoder_{i}") for i in range(c.decoder_layers)]
        self.decoder_norm = nn.LayerNorm()

    def _embed(self, tokens, offset=0):
        scale = math.sqrt(self.config.d_model)
        return self.embed(tokens) * scale + positions(tokens.shape[1], self.config.d_model, offset)

    def encode(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(encoded [B, S, d], source_mask [B, S])``; padding positions are masked everywhere."""
        keep = source != PAD
        mask = keep[:, None, :] & keep[:, :, None]
        x = self._embed(source)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x), keep

    def _logits(self, y):
        return self.embed.attend(self.decoder_norm(y))

    def decode(self, target_in: jax.Array, encoded: jax.Array, source_mask: jax.Array) -> jax.Array:
        length = target_in.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None]
        cross = jnp.broadcast_to(source_mask[:, None, :], (target_in.shape[0], length, source_mask.shape[1]))
        y = self._embed(target_in)
        for layer in self.decoder:
            y = layer(y, encoded, causal, cross)
        return self._logits(y)

    def __call__(self, source, target_in):
        return self.decode(target_in, *self.encode(source))

    def cross_keys_values(self, encoded):
        return [layer.cross_keys_values(encoded) for layer in self.decoder]

    def decode_step(self, token, position, caches, cross_kv, source_mask):
        """Logits ``[B, vocab]`` for the next token after ``token [B]`` at ``position``."""
        y = self._embed(token[:, None], offset=position)
        cross_mask = source_mask[:, None, :]
        new_caches = []
        for layer, cache, kv in zip(self.decoder, caches, cross_kv):
            y, cache = layer.step(y, cache, position, kv, cross_mask)
            new_caches.append(cache)
        return self._logits(y)[:, 0], new_caches


def translation_loss(model: Transformer):
    """Teacher-forced cross-entropy per target token (padding ignored), plus token accuracy.

    Returns:
      ``loss_fn(params, (source, target)) -> (loss, {"accuracy": ...})`` where
      ``target`` is ``BOS english EOS PAD...``; the loss averages over the
      non-padding target tokens of the whole batch.
    """

    def loss_fn(params: Params, batch: Batch):
        source, target = batch
        logits = model.apply({"params": params}, source, target[:, :-1])
        labels = target[:, 1:]
        weight = (labels != PAD).astype(logits.dtype)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        count = jnp.maximum(weight.sum(), 1.0)
        accuracy = ((jnp.argmax(logits, -1) == labels) * weight).sum() / count
        return (losses * weight).sum() / count, {"accuracy": accuracy}

    return loss_fn


def init_params(model: Transformer, key: jax.Array, max_len: int = 8) -> Params:
    source = jnp.full((1, max_len), BOS, jnp.int32)
    return model.init(key, source, source)["params"]


def greedy_decode(model: Transformer, params: Params, source: jax.Array, max_len: int) -> jax.Array:
    """Greedy translations ``[B, max_len]`` of ``source [B, S]`` (EOS then PAD after the end)."""
    variables = {"params": params}
    encoded, source_mask = model.apply(variables, source, method=Transformer.encode)
    cross_kv = model.apply(variables, encoded, method=Transformer.cross_keys_values)
    c = model.config
    batch = source.shape[0]
    shape = (batch, max_len, c.heads, c.d_model // c.heads)
    caches = [(jnp.zeros(shape, encoded.dtype), jnp.zeros(shape, encoded.dtype)) for _ in range(c.decoder_layers)]

    def step(carry, position):
        token, caches, done = carry
        logits, caches = model.apply(variables, token, position, caches, cross_kv, source_mask,
                                     method=Transformer.decode_step)
        nxt = jnp.where(done, PAD, jnp.argmax(logits, -1).astype(jnp.int32))
        return (nxt, caches, done | (nxt == EOS)), nxt

    start = (jnp.full((batch,), BOS, jnp.int32), caches, jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(step, start, jnp.arange(max_len))
    return tokens.T
