"""Tests for the on-device episode sampler (jaxmeta.data.episodes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itertools

from jaxmeta.data.episodes import choose_distinct, sample_task, sample_tasks, validate_episode
from jaxmeta.errors import ConfigError

NUM_CLASSES, NUM_EXAMPLES = 12, 10


@pytest.fixture(scope="module")
def images() -> jax.Array:
    """``[12, 10, 2, 3, 1]`` where every pixel of image (c, e) equals ``100 * c + e``."""
    codes = 100 * np.arange(NUM_CLASSES)[:, None] + np.arange(NUM_EXAMPLES)[None, :]
    x = np.broadcast_to(codes[:, :, None, None, None], (NUM_CLASSES, NUM_EXAMPLES, 2, 3, 1))
    return jax.device_put(jnp.asarray(x, dtype=jnp.float32))


def _decode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image batch -> (class ids, example ids), checking every pixel agrees."""
    x = np.asarray(x)
    flat = x.reshape(x.shape[0], -1)
    assert (flat == flat[:, :1]).all()
    code = flat[:, 0].astype(int)
    return code // 100, code % 100


def _check_task(task, ways: int, shots: int, queries: int) -> None:
    (sx, sy), (qx, qy) = task
    sx, sy, qx, qy = map(np.asarray, (sx, sy, qx, qy))
    assert sx.shape == (ways * shots, 2, 3, 1) and qx.shape == (ways * queries, 2, 3, 1)
    assert sy.shape == (ways * shots,) and qy.shape == (ways * queries,)
    assert sy.dtype == np.int32 and qy.dtype == np.int32
    # Every label 0..ways-1 appears exactly `shots` (`queries`) times.
    np.testing.assert_array_equal(np.bincount(sy, minlength=ways), np.full(ways, shots))
    np.testing.assert_array_equal(np.bincount(qy, minlength=ways), np.full(ways, queries))
    s_cls, s_ex = _decode(sx)
    q_cls, q_ex = _decode(qx)
    label_to_class = {}
    for cls, y in zip(np.concatenate([s_cls, q_cls]), np.concatenate([sy, qy])):
        assert label_to_class.setdefault(int(y), int(cls)) == cls  # one class per label
    assert len(set(label_to_class.values())) == ways  # distinct classes
    for label, cls in label_to_class.items():
        support_examples = set(s_ex[sy == label])
        query_examples = set(q_ex[qy == label])
        assert len(support_examples) == shots and len(query_examples) == queries
        assert not support_examples & query_examples  # disjoint support / query


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 4), (3, 5, 5), (12, 2, 8), (1, 1, 1)])
def test_single_task_invariants(images: jax.Array, ways: int, shots: int, queries: int) -> None:
    for seed in range(3):
        task = sample_task(jax.random.key(seed), images, ways=ways, shots=shots, queries=queries)
        _check_task(task, ways, shots, queries)


def test_deterministic_per_key_and_jit_matches_eager(images: jax.Array) -> None:
    kw = dict(ways=5, shots=2, queries=3)
    jitted = jax.jit(functools.partial(sample_task, **kw))
    a = sample_task(jax.random.key(7), images, **kw)
    b = jitted(jax.random.key(7), images)
    c = jitted(jax.random.key(8), images)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.support[0], c.support[0])


def test_batched_under_jit_and_vmap(images: jax.Array) -> None:
    ways, shots, queries, batch = 4, 3, 2, 16
    fn = jax.jit(
        sample_tasks, static_argnames=("batch_size", "ways", "shots", "queries")
    )
    tasks = fn(jax.random.key(0), images, batch_size=batch, ways=ways, shots=shots, queries=queries)
    assert tasks.support[0].shape == (batch, ways * shots, 2, 3, 1)
    assert tasks.support[1].shape == (batch, ways * shots)
    assert tasks.query[0].shape == (batch, ways * queries, 2, 3, 1)
    assert tasks.query[1].shape == (batch, ways * queries)
    tasks = jax.tree.map(np.asarray, tasks)
    for i in range(batch):
        _check_task(jax.tree.map(lambda x: x[i], tasks), ways, shots, queries)
    # Tasks of a batch differ from each other; the same key gives the same batch.
    first_classes = {tuple(_decode(tasks.support[0][i])[0]) for i in range(batch)}
    assert len(first_classes) > batch // 2
    again = fn(jax.random.key(0), images, batch_size=batch, ways=ways, shots=shots, queries=queries)
    for x, y in zip(jax.tree.leaves(tasks), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y)
    # Also under an explicit outer vmap over keys.
    keys = jax.random.split(jax.random.key(1), 3)
    vm = jax.vmap(lambda k: sample_task(k, images, ways=ways, shots=shots, queries=queries))(keys)
    assert vm.query[0].shape == (3, ways * queries, 2, 3, 1)


def test_labels_randomly_assigned_and_classes_uniform(images: jax.Array) -> None:
    ways, batch = 5, 2000
    tasks = jax.jit(
        sample_tasks, static_argnames=("batch_size", "ways", "shots", "queries")
    )(jax.random.key(3), images, batch_size=batch, ways=ways, shots=1, queries=1)
    sx, sy = np.asarray(tasks.support[0]), np.asarray(tasks.support[1])
    classes = (sx.reshape(batch, ways, -1)[:, :, 0] // 100).astype(int)
    # Classes drawn uniformly: each of the 12 is drawn 2000 * 5 / 12 ~ 833 times.
    counts = np.bincount(classes.ravel(), minlength=NUM_CLASSES)
    assert counts.min() > 0.85 * batch * ways / NUM_CLASSES
    assert counts.max() < 1.15 * batch * ways / NUM_CLASSES
    # The label of the first support slot is uniform over 0..ways-1 ...
    first = np.bincount(sy[:, 0], minlength=ways)
    assert first.min() > 0.8 * batch / ways
    # ... and labels are not ordered by class id (that would happen in 1/120 of tasks).
    order_matches = [
        np.array_equal(np.argsort(classes[i]), np.argsort(sy[i])) for i in range(batch)
    ]
    assert np.mean(order_matches) < 0.05


def test_many_classes_gathers_only_the_episode() -> None:
    big = jax.ShapeDtypeStruct((4400, 20, 28, 28, 1), jnp.float32)
    fn = jax.jit(sample_tasks, static_argnames=("batch_size", "ways", "shots", "queries"))
    lowered = fn.lower(jax.random.key(0), big, batch_size=2, ways=5, shots=1, queries=15)
    assert lowered.out_info.query[0].shape == (2, 75, 28, 28, 1)
    hlo = lowered.compile().as_text()
    # Nothing but the input parameter has the size of the whole array: only the
    # 2 * 5 * 16 images of the episodes are gathered.
    full = [line for line in hlo.splitlines() if "= f32[4400,20,28,28,1]" in line]
    assert full and all("parameter(" in line for line in full)
    assert "f32[160," in hlo or "f32[2,5,16," in hlo


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ways=13, shots=1, queries=1), "ways=13 exceeds the 12 classes"),
        (dict(ways=5, shots=6, queries=5), "shots \\+ queries = 6 \\+ 5 = 11 exceeds the 10"),
        (dict(ways=0, shots=1, queries=1), "ways must be a positive integer, got 0"),
        (dict(ways=5, shots=-1, queries=1), "shots must be a positive integer, got -1"),
        (dict(ways=5, shots=1, queries=0), "queries must be a positive integer, got 0"),
        (dict(ways=5, shots=1.5, queries=1), "shots must be a positive integer, got 1.5"),
    ],
)
def test_validate_episode_errors(kwargs: dict, match: str, images: jax.Array) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        validate_episode(NUM_CLASSES, NUM_EXAMPLES, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=match):
        sample_task(jax.random.key(0), images, **kwargs)


def test_validate_episode_accepts_the_limits() -> None:
    validate_episode(NUM_CLASSES, NUM_EXAMPLES, ways=NUM_CLASSES, shots=5, queries=5)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        sample_tasks(
            jax.random.key(0), jnp.zeros((3, 4, 1, 1, 1)), batch_size=0, ways=2, shots=1, queries=1
        )


def test_choose_distinct_is_uniform_over_subsets() -> None:
    # Floyd's algorithm: 3 of 6 has 20 subsets; 60,000 draws give each 3,000 expected
    # (standard deviation ~53).  A biased chooser (e.g. one that favours the last
    # integers) moves some subset's count by hundreds; a chi-square over 19 degrees of
    # freedom stays under 43.8 with probability 0.999.
    draws = np.asarray(jax.jit(jax.vmap(lambda k: choose_distinct(k, 6, 3)))(
        jax.random.split(jax.random.PRNGKey(0), 60_000)))
    assert (np.sort(draws, axis=1)[:, 1:] != np.sort(draws, axis=1)[:, :-1]).all(), "values repeat"
    assert draws.min() >= 0 and draws.max() <= 5
    counts = {c: 0 for c in itertools.combinations(range(6), 3)}
    for row in map(tuple, np.sort(draws, axis=1)):
        counts[row] += 1
    expected = 60_000 / 20
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 43.8, (chi2, counts)
    # Every integer appears in half the draws (3 of 6).
    freq = np.bincount(draws.ravel(), minlength=6) / 60_000
    np.testing.assert_allclose(freq, 0.5, atol=0.01)


def test_choose_distinct_rejects_impossible_sizes() -> None:
    with pytest.raises(ConfigError, match="cannot choose 7 distinct values from 6"):
        choose_distinct(jax.random.PRNGKey(0), 6, 7)
