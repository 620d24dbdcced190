"""On-device N-way K-shot episode sampling, jit- and vmap-friendly.

The image array lives on the device once (``jax.device_put``) and is passed to the
jitted sampler as an *argument* (never closed over, which would embed it as a
constant); each episode gathers only the ``ways * (shots + queries)`` images it needs.

Episode layout: support and query are grouped by class slot (slot ``i`` holds the
``shots`` / ``queries`` examples of the ``i``-th drawn class), and slot ``i`` gets the
label ``perm[i]`` of a random permutation ``perm`` of ``0..ways-1`` drawn per task.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from jaxmeta.errors import ConfigError
from jaxmeta.types import Task

__all__ = ["choose_distinct", "sample_task", "sample_tasks", "validate_episode"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    try:
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value}")
    return value


def validate_episode(
    num_classes: int,
    examples_per_class: int,
    *,
    ways: int,
    shots: int,
    queries: int,
) -> None:
    """Checks that ``ways``-way ``shots``-shot episodes can be drawn from a data set.

    Args:
      num_classes: Number of classes available.
      examples_per_class: Number of examples of each class.
      ways: Classes per episode.
      shots: Support examples per class.
      queries: Query examples per class.

    Raises:
      ConfigError: One line, for a non-positive value, ``ways > num_classes`` or
        ``shots + queries > examples_per_class`` (examples are drawn without
        replacement, so support and query never share an example).
    """
    ways = _positive_int("ways", ways)
    shots = _positive_int("shots", shots)
    queries = _positive_int("queries", queries)
    if ways > num_classes:
        raise ConfigError(f"ways={ways} exceeds the {num_classes} classes available")
    if shots + queries > examples_per_class:
        raise ConfigError(
            f"shots + queries = {shots} + {queries} = {shots + queries} exceeds the "
            f"{examples_per_class} examples per class"
        )


def choose_distinct(key: jax.Array, n: int, k: int) -> jax.Array:
    """``k`` distinct integers from ``0..n-1``, every ``k``-subset equally likely (Floyd's algorithm).

    ``jax.random.choice(key, n, (k,), replace=False)`` shuffles all ``n``
    integers (a sort of ``n`` keys per call): with Omniglot's 4,400 training
    classes that sort dominated the training loop's sampling.  Floyd's
    algorithm draws ``k`` integers instead: for ``j = n-k, ..., n-1`` it draws
    ``t`` uniformly from ``0..j`` and keeps ``t``, or ``j`` when ``t`` is
    already kept.  The order of the result is not uniformly random, so a caller
    that needs a random order permutes it (episodes assign labels by a random
    permutation anyway).

    Args:
      key: PRNG key.
      n: Population size (static).
      k: Sample size, ``0 < k <= n`` (static).

    Returns:
      int32 ``[k]``, distinct values in ``0..n-1``.

    Examples:
      >>> import jax
      >>> sorted(choose_distinct(jax.random.PRNGKey(0), 5, 5).tolist())
      [0, 1, 2, 3, 4]
    """
    if not 0 < k <= n:
        raise ConfigError(f"cannot choose {k} distinct values from {n}")
    draws = jax.random.randint(key, (k,), 0, jnp.arange(n - k + 1, n + 1))
    chosen = jnp.full((k,), -1, jnp.int32)
    for i in range(k):  # k is small and static: unrolled, k scalar draws and k tiny membership tests.
        t = draws[i].astype(jnp.int32)
        chosen = chosen.at[i].set(jnp.where(jnp.any(chosen == t), n - k + i, t))
    return chosen


def sample_task(
    key: jax.Array,
    images: jax.Array,
    *,
    ways: int,
    shots: int,
    queries: int,
) -> Task:
    """Samples one episode: ``ways`` distinct classes, disjoint support and query.

    Works under ``jax.jit`` (with ``ways``, ``shots`` and ``queries`` static) and
    ``jax.vmap`` over ``key``; deterministic given ``key``.

    Args:
      key: PRNG key.
      images: ``[classes, examples, H, W, C]`` (any trailing shape works).
      ways: Classes per episode (drawn without replacement).
      shots: Support examples per class.
      queries: Query examples per class (drawn without replacement together with the
        support examples, so the two never share an example).

    Returns:
      ``Task(support=(x [ways*shots, H, W, C], y [ways*shots]),
      query=(x [ways*queries, H, W, C], y [ways*queries]))`` with int32 labels in
      ``0..ways-1``, randomly assigned to the classes.

    Raises:
      ConfigError: If the episode cannot be drawn from ``images`` (see
        :func:`validate_episode`).
    """
    num_classes, num_examples = images.shape[0], images.shape[1]
    validate_episode(num_classes, num_examples, ways=ways, shots=shots, queries=queries)
    per_class = shots + queries
    class_key, example_key, label_key = jax.random.split(key, 3)
    # Slot i's label is perm[i] below, so the slots' order need not be random.
    classes = choose_distinct(class_key, num_classes, ways)
    examples = jax.vmap(
        lambda k: jax.random.choice(k, num_examples, (per_class,), replace=False)
    )(jax.random.split(example_key, ways))
    x = images[classes[:, None], examples]  # [ways, shots + queries, ...]: only these.
    labels = jax.random.permutation(label_key, ways).astype(jnp.int32)
    item_shape = images.shape[2:]
    support_x = x[:, :shots].reshape(ways * shots, *item_shape)
    query_x = x[:, shots:].reshape(ways * queries, *item_shape)
    support_y = jnp.repeat(labels, shots, total_repeat_length=ways * shots)
    query_y = jnp.repeat(labels, queries, total_repeat_length=ways * queries)
    return Task(support=(support_x, support_y), query=(query_x, query_y))


def sample_tasks(
    key: jax.Array,
    images: jax.Array,
    *,
    batch_size: int,
    ways: int,
    shots: int,
    queries: int,
) -> Task:
    """Samples ``batch_size`` independent episodes (vmapped :func:`sample_task`).

    Args:
      key: PRNG key; split into one key per task.
      images: ``[classes, examples, H, W, C]``, ideally already on the device.
      batch_size: Number of tasks (static).
      ways: Classes per episode (static).
      shots: Support examples per class (static).
      queries: Query examples per class (static).

    Returns:
      A :class:`~jaxmeta.types.Task` whose arrays carry a leading task axis of size
      ``batch_size``: support x ``[batch_size, ways*shots, H, W, C]``, y
      ``[batch_size, ways*shots]``, query likewise with ``queries``.

    Raises:
      ConfigError: For a non-positive ``batch_size`` or an impossible episode.
    """
    batch_size = _positive_int("batch_size", batch_size)
    validate_episode(*images.shape[:2], ways=ways, shots=shots, queries=queries)
    keys = jax.random.split(key, batch_size)
    return jax.vmap(
        lambda k: sample_task(k, images, ways=ways, shots=shots, queries=queries)
    )(keys)
