"""Data-parallel meta-training on JAX's own engine: the task batch sharded over devices.

The meta-step is unchanged: tasks drawn inside the compiled program are
constrained to be split along their leading (task) axis over a one-axis
:class:`~jax.sharding.Mesh`, the parameters stay replicated, and XLA's SPMD
partitioner inserts the all-reduce of the mean over tasks. On several hosts,
call :func:`initialize` first (it wraps ``jax.distributed.initialize``); every
host then runs the same program over the global devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmeta.errors import ConfigError
from jaxmeta.types import PyTree

TASK_AXIS = "tasks"


def initialize() -> None:
    """Joins a multi-host run when JAX's coordinator variables are set (no-op otherwise).

    Set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` on every host (or run under a cluster that JAX detects,
    such as SLURM or Cloud TPU), then start the same command on each host.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def task_mesh(devices: int | None = None) -> Mesh | None:
    """A one-axis mesh over ``devices`` devices (all by default); ``None`` for one device."""
    available = jax.devices()
    count = len(available) if devices is None else devices
    if count < 1:
        raise ConfigError(f"devices must be positive, got {count}")
    if count > len(available):
        raise ConfigError(f"asked for {count} devices but only {len(available)} are available")
    if count == 1:
        return None
    return Mesh(np.asarray(available[:count]), (TASK_AXIS,))


def check_meta_batch(meta_batch: int, mesh: Mesh | None) -> None:
    """The task batch must split evenly over the devices."""
    if mesh is not None and meta_batch % mesh.size:
        raise ConfigError(
            f"meta-batch {meta_batch} does not divide evenly over {mesh.size} devices; "
            f"use a multiple of {mesh.size} or --devices"
        )


def shard_tasks(tasks: PyTree, mesh: Mesh | None) -> PyTree:
    """Constrains every array of a task batch to be split along its leading axis over ``mesh``."""
    if mesh is None:
        return tasks
    sharding = NamedSharding(mesh, PartitionSpec(TASK_AXIS))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tasks)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Places ``tree`` on every device of ``mesh`` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
