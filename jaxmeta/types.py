"""Core types shared across jaxmeta.

A *task* is an episode: a small labelled ``support`` set to adapt on and a
``query`` set to score the adapted model on.  Every array in a batch of tasks
carries a leading task axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

PyTree = Any
Params = PyTree
PRNGKey = jax.Array
Batch = tuple[jax.Array, jax.Array]
"""An ``(x, y)`` pair: inputs and targets (labels or regression values)."""


class Task(NamedTuple):
    """One episode (or a batch of episodes, with a leading task axis).

    Attributes:
      support: ``(x, y)`` used for the inner-loop adaptation.
      query: ``(x, y)`` used to score the adapted parameters.
    """

    support: Batch
    query: Batch
