"""Orbax checkpoints of the whole training state, refused when the run differs."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxmeta.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"


def config_identity(config: Any, *, exclude: Collection[str] = (), later: Collection[str] = ()) -> dict:
    """A dataclass configuration's fields as a run identity (what a checkpoint must agree on).

    ``exclude`` names fields that may change between runs of one identity.
    ``later`` names fields added after runs were first written: each is left
    out while it holds its default, so a checkpoint written before it existed
    still matches.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return {k: v for k, v in dataclasses.asdict(config).items()
            if k not in exclude and not (k in later and v == defaults[k])}


def manager(run_dir: str, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager (atomic saves, keeps the last ``keep``)."""
    directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, identity: dict) -> None:
    """Saves ``state`` at ``step`` together with the run's ``identity`` (JSON)."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), identity=ocp.args.JsonSave(identity)),
        force=True,
    )
    mngr.wait_until_finished()


def latest_step(run_dir: str) -> int | None:
    """The newest complete checkpoint's step in ``run_dir`` (``None`` if there is none)."""
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)):
        return None
    return manager(run_dir, create=False).latest_step()


def read_identity(run_dir: str, step: int | None = None) -> dict:
    """The identity (model and task configuration) stored with a checkpoint."""
    mngr = manager(run_dir, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {os.path.join(run_dir, CHECKPOINT_DIR)}")
    try:
        out = mngr.restore(step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any failure here is a corrupt checkpoint
        raise CheckpointError(
            f"cannot read checkpoint {step} in {run_dir} (corrupt or incomplete): {_short(e)}"
        ) from None
    return dict(out["identity"])


def identity_differences(stored: dict, identity: dict) -> list[str]:
    """Keys of ``identity`` whose stored value differs (keys the code no longer checks are ignored)."""
    identity = json.loads(json.dumps(identity))  # compare as stored: tuples become lists
    return sorted(k for k in identity if k not in stored or stored[k] != identity[k])


def restore(run_dir: str, abstract_state: Any, identity: dict, *, step: int | None = None) -> tuple[int, Any]:
    """Restores the newest (or the given) checkpoint after checking its identity.

    Args:
      run_dir: the run directory.
      abstract_state: a pytree of the state's structure, shapes and dtypes
        (e.g. from ``jax.eval_shape``). Leaves without a sharding are placed
        on this process's first device, whatever devices wrote the
        checkpoint: a run trained on a GPU restores on a CPU.
      identity: the current run's model and task configuration; a checkpoint
        written with a different one is refused.
      step: which checkpoint (default: the newest).

    Returns:
      ``(step, state)``.

    Raises:
      CheckpointError: no checkpoint, a different configuration, or corrupt files.
    """
    stored = read_identity(run_dir, step)
    differ = identity_differences(stored, identity)
    if differ:
        parts = ", ".join(f"{k}: checkpoint {stored.get(k)!r} vs now {identity.get(k)!r}" for k in differ)
        raise CheckpointError(f"checkpoint in {run_dir} is from a different configuration ({parts})")
    mngr = manager(run_dir, create=False)
    step = mngr.latest_step() if step is None else step
    try:
        target = _placed(abstract_state)
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"cannot restore checkpoint {step} in {run_dir} (corrupt or incomplete): {_short(e)}"
        ) from None
    state = out["state"]
    # Orbax may hand back a different pytree node type for NamedTuples; rebuild ours.
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), jax.tree.leaves(state))
    return step, state


def _placed(abstract_state: Any) -> Any:
    """``abstract_state`` with every unplaced array leaf on the first local device.

    Without a target sharding Orbax reuses the one stored in the checkpoint,
    which names the devices that wrote it (``cuda:0``) and fails elsewhere.
    """
    device = jax.local_devices()[0]

    def place(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
        return leaf

    return jax.tree.map(place, abstract_state)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
