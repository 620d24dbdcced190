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
import platform

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmeta.errors import ConfigError
from jaxmeta.types import PyTree

TASK_AXIS = "tasks"


def initialize() -> None:
    """Joins a multi-host run when JAX's coordinator variables are set (no-op otherwise).

    Set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` on every host, then start the same command on each
    host.  Without ``JAX_COORDINATOR_ADDRESS`` it does nothing: a cluster that
    :func:`jax.distributed.initialize` could detect by itself (SLURM, Cloud
    TPU) is not joined unless the variable is set.
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


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def device_description() -> dict:
    """The default device and host (recorded with benchmarks and training runs)."""
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "devices": len(jax.devices()),
        "cpu_count": cpu_count(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }


def machine_name(description: dict | None = None) -> str:
    """A short name of the machine a run used: ``"one NVIDIA H200"``, ``"AMD EPYC ..., 2 CPU cores"``."""
    d = device_description() if description is None else description
    if d.get("backend") == "cpu":
        return f"{d.get('processor')}, {d.get('cpu_count')} CPU cores"
    n = d.get("devices", 1)
    return f"{'one' if n == 1 else n} {d.get('device_kind')}"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
