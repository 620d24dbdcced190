"""Helpers over a batch of tasks, shared by every algorithm and the evaluation (below both)."""

from __future__ import annotations

from typing import Callable

import jax

from jaxmeta.types import PyTree


def map_tasks(fn: Callable, tasks: PyTree, chunk_size: int | None = None):
    """Maps ``fn`` over the leading task axis: ``vmap``, or ``lax.map`` in chunks.

    ``chunk_size=None`` vectorises over all tasks at once; an integer runs
    ``chunk_size`` tasks at a time (vectorised within a chunk), which bounds
    memory and can be faster on CPUs.
    """
    if chunk_size is None:
        return jax.vmap(fn)(tasks)
    return jax.lax.map(fn, tasks, batch_size=chunk_size)
