"""The sinusoid regression toy of the MAML paper (§5.1, Appendix C).

Tasks are ``y = a · sin(x + b)`` with ``a ~ U[0.1, 5.0]``, ``b ~ U[0, π]`` and
inputs ``x ~ U[−5, 5]``. Sampling is pure JAX, so it runs inside the compiled
training loop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmeta.types import PRNGKey, Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)


class Sinusoids(NamedTuple):
    """A batch of sinusoid functions: ``amplitude`` and ``phase``, each ``[tasks]``."""

    amplitude: jax.Array
    phase: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        """Evaluates each function at its inputs ``x`` of shape ``[tasks, points, 1]``."""
        return self.amplitude[:, None, None] * jnp.sin(x + self.phase[:, None, None])


def sample_sinusoids(key: PRNGKey, num_tasks: int) -> Sinusoids:
    """Draws ``num_tasks`` amplitudes and phases."""
    ka, kb = jax.random.split(key)
    amplitude = jax.random.uniform(ka, (num_tasks,), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(kb, (num_tasks,), minval=PHASE[0], maxval=PHASE[1])
    return Sinusoids(amplitude, phase)


def sample_points(key: PRNGKey, functions: Sinusoids, points: int) -> tuple[jax.Array, jax.Array]:
    """``points`` inputs per task from ``U[−5, 5]`` and the function values there."""
    n = functions.amplitude.shape[0]
    x = jax.random.uniform(key, (n, points, 1), minval=INPUT_RANGE[0], maxval=INPUT_RANGE[1])
    return x, functions(x)


def sample_tasks(key: PRNGKey, *, batch_size: int, shots: int, queries: int) -> Task:
    """A batch of sinusoid tasks with ``shots`` support and ``queries`` query points each."""
    kf, kp = jax.random.split(key)
    x, y = sample_points(kp, sample_sinusoids(kf, batch_size), shots + queries)
    return Task((x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:]))


def test_pool(key: PRNGKey, *, num_tasks: int, points: int) -> tuple[Sinusoids, jax.Array, jax.Array]:
    """Fixed test tasks: functions and ``points`` inputs/targets each.

    Use :func:`pool_tasks` to cut a K-shot support set and a query set from it.
    """
    kf, kp = jax.random.split(key)
    functions = sample_sinusoids(kf, num_tasks)
    x, y = sample_points(kp, functions, points)
    return functions, x, y


def pool_tasks(x: jax.Array, y: jax.Array, *, shots: int, queries: int) -> Task:
    """K-shot tasks from a test pool: the first ``shots`` points support, the last ``queries`` query.

    The query points are the same whatever ``shots`` is, and never overlap
    the support points while ``shots + queries <= points``.
    """
    return Task((x[:, :shots], y[:, :shots]), (x[:, -queries:], y[:, -queries:]))
