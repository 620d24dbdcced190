"""Orbax checkpoints of the whole training state, refused when the run differs.

Every save also records the SHA-256 of each file of the new checkpoint in
``RUN/checkpoints.sha256.json``.  Restoring the newest checkpoint skips one
whose files no longer match (a truncated or bit-flipped file) or that Orbax
cannot read, with a :class:`~jaxmeta.errors.JaxmetaWarning`, and falls back to
the next older one; damaged files are never modified or deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from jaxmeta.errors import CheckpointError, JaxmetaWarning
from jaxmeta.io import sha256_file, write_json

CHECKPOINT_DIR = "checkpoints"
CHECKSUM_FILE = "checkpoints.sha256.json"
"""``RUN/checkpoints.sha256.json``: ``{step: {file relative to checkpoints/<step>: sha256}}``."""
DAMAGED_DIR = "damaged-checkpoints"
"""``RUN/damaged-checkpoints/<step>``: damaged checkpoints set aside by a resumed run."""
UNCHECKED_FILES = frozenset({"_sharding"})
"""File names left out of the checksums: ``_sharding`` only records which devices wrote the
arrays, which :func:`restore` overrides (a run moved to another machine may rewrite it)."""
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax names a save in progress ``<step>.orbax-checkpoint-tmp...``

T = TypeVar("T")


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


def manager(run_dir: str, *, keep: int | None = 3, create: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager (atomic saves, keeps the last ``keep``; ``None``: every one)."""
    directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, identity: dict) -> None:
    """Saves ``state`` at ``step`` together with the run's ``identity`` (JSON), then records its checksums.

    A save that fails (a full disk, say) leaves the earlier checkpoints as
    they were and removes its own partial temporary directory; the error
    propagates.
    """
    directory = os.fspath(mngr.directory)
    run_dir = os.path.dirname(directory)
    record = read_checksums(run_dir)
    if str(step) in record:  # a stale record of an earlier checkpoint at this step (set aside since)
        record.pop(str(step))
        write_json(checksum_path(run_dir), record)
    try:
        with _quiet_closed_event_loops():
            mngr.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), identity=ocp.args.JsonSave(identity)),
                force=True,
            )
            mngr.wait_until_finished()
    except BaseException:
        _remove_partial_save(mngr, directory, step)
        raise
    kept = {k: v for k, v in record.items() if os.path.isdir(os.path.join(directory, k))}
    kept[str(step)] = step_checksums(os.path.join(directory, str(step)))
    write_json(checksum_path(run_dir), dict(sorted(kept.items(), key=lambda kv: int(kv[0]))))


def checksum_path(run_dir: str) -> str:
    """Where the run's checkpoint checksums are recorded."""
    return os.path.join(run_dir, CHECKSUM_FILE)


def step_checksums(step_dir: str) -> dict[str, str]:
    """``{path relative to step_dir: sha256}`` of a checkpoint's files (but :data:`UNCHECKED_FILES`)."""
    out = {}
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            if name not in UNCHECKED_FILES:
                path = os.path.join(root, name)
                out[os.path.relpath(path, step_dir).replace(os.sep, "/")] = sha256_file(path)
    return out


def read_checksums(run_dir: str) -> dict[str, dict[str, str]]:
    """The recorded checksums ``{step: {file: sha256}}`` (empty when absent or unreadable: old runs)."""
    try:
        with open(checksum_path(run_dir), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def verify_step(run_dir: str, step: int, record: dict | None = None) -> str | None:
    """Why checkpoint ``step`` fails its recorded checksums, or ``None`` (also when nothing is recorded)."""
    record = read_checksums(run_dir) if record is None else record
    expected = record.get(str(step))
    if not isinstance(expected, dict):
        return None
    step_dir = os.path.join(run_dir, CHECKPOINT_DIR, str(step))
    for rel, digest in sorted(expected.items()):
        path = os.path.join(step_dir, *rel.split("/"))
        if not os.path.isfile(path):
            return f"{rel} is missing"
        try:
            actual = sha256_file(path)
        except OSError as e:
            return f"{rel} cannot be read: {e.strerror}"
        if actual != digest:
            return f"{rel} does not match its recorded checksum"
    return None


def steps(run_dir: str) -> list[int]:
    """The steps of the run's complete checkpoints, newest first (damaged ones included)."""
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)):
        return []
    return sorted(manager(run_dir, create=False).all_steps(), reverse=True)


def latest_step(run_dir: str) -> int | None:
    """The newest complete checkpoint's step in ``run_dir`` (``None`` if there is none)."""
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)):
        return None
    return manager(run_dir, create=False).latest_step()


def latest_good_step(run_dir: str) -> int | None:
    """The newest checkpoint's step whose files pass their checksums, without restoring it.

    A checkpoint without a record (written before checksums were) passes:
    only restoring it can tell. ``None`` if there is none.
    """
    record = read_checksums(run_dir)
    return next((s for s in steps(run_dir) if verify_step(run_dir, s, record) is None), None)


def read_identity(run_dir: str, step: int | None = None) -> dict:
    """The identity (model and task configuration) stored with a checkpoint.

    Without ``step``, the newest checkpoint that is not damaged (see :func:`restore`).
    """
    return _first_intact(run_dir, step, _restore_identity)[1]


def identity_differences(stored: dict, identity: dict) -> list[str]:
    """Keys of ``identity`` whose stored value differs (keys the code no longer checks are ignored)."""
    identity = json.loads(json.dumps(identity))  # compare as stored: tuples become lists
    return sorted(k for k in identity if k not in stored or stored[k] != identity[k])


def restore(run_dir: str, abstract_state: Any, identity: dict, *, step: int | None = None) -> tuple[int, Any]:
    """Restores the newest (or the given) checkpoint after checking its identity.

    Without ``step``, checkpoints are tried newest first: one whose files fail
    their recorded checksums, or that Orbax cannot read, is skipped with a
    :class:`~jaxmeta.errors.JaxmetaWarning` naming the step restored instead.

    Args:
      run_dir: the run directory.
      abstract_state: a pytree of the state's structure, shapes and dtypes
        (e.g. from ``jax.eval_shape``). Leaves without a sharding are placed
        on this process's first device, whatever devices wrote the
        checkpoint: a run trained on a GPU restores on a CPU.
      identity: the current run's model and task configuration; a checkpoint
        written with a different one is refused.
      step: which checkpoint (default: the newest intact one); a damaged
        ``step`` is an error, not a fallback.

    Returns:
      ``(step, state)``.

    Raises:
      CheckpointError: no checkpoint, a different configuration, or corrupt
        files (of the given step, or of every step).
    """

    def load(mngr: ocp.CheckpointManager, s: int) -> Any:
        stored = _restore_identity(mngr, s)
        differ = identity_differences(stored, identity)
        if differ:
            parts = ", ".join(f"{k}: checkpoint {stored.get(k)!r} vs now {identity.get(k)!r}" for k in differ)
            raise CheckpointError(f"checkpoint in {run_dir} is from a different configuration ({parts})")
        out = _restoring(mngr, s, ocp.args.Composite(state=ocp.args.StandardRestore(_placed(abstract_state))))
        # Orbax may hand back a different pytree node type for NamedTuples; rebuild ours.
        return jax.tree.unflatten(jax.tree.structure(abstract_state), jax.tree.leaves(out["state"]))

    return _first_intact(run_dir, step, load)


def prune(mngr: ocp.CheckpointManager, keep: Collection[int]) -> list[int]:
    """Deletes every checkpoint of ``mngr`` whose step is not in ``keep``; returns the deleted steps.

    Their checksum records go with them. (Orbax's ``max_to_keep`` only keeps
    the newest; this keeps any chosen set, e.g. the best by validation.)
    """
    directory = os.fspath(mngr.directory)
    run_dir = os.path.dirname(directory)
    keep = {int(s) for s in keep}
    deleted = [s for s in sorted(mngr.all_steps()) if s not in keep]
    for s in deleted:
        mngr.delete(s)
    if deleted and os.path.exists(checksum_path(run_dir)):
        record = read_checksums(run_dir)
        write_json(checksum_path(run_dir), {k: v for k, v in record.items() if int(k) not in set(deleted)})
    return deleted


def set_aside(run_dir: str, bad_steps: Collection[int]) -> list[str]:
    """Moves checkpoints ``bad_steps`` to ``RUN/damaged-checkpoints/<step>``; returns the new paths.

    They are moved, never deleted, since a later save at such a step would
    collide with them. Their checksum records are dropped.
    """
    moved = []
    record = read_checksums(run_dir)
    for s in sorted(bad_steps):
        source = os.path.join(run_dir, CHECKPOINT_DIR, str(s))
        if not os.path.isdir(source):
            continue
        target = os.path.join(run_dir, DAMAGED_DIR, str(s))
        n = 1
        while os.path.exists(target):  # set aside before: keep both
            target = os.path.join(run_dir, DAMAGED_DIR, f"{s}.{n}")
            n += 1
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        moved.append(target)
        record.pop(str(s), None)
    if moved and os.path.exists(checksum_path(run_dir)):
        write_json(checksum_path(run_dir), record)
    return moved


class _Damaged(Exception):
    """A checkpoint that cannot be used (its message is the reason)."""


_warned: set[str] = set()  # the damaged checkpoints' directories already reported (once per process)


def _first_intact(run_dir: str, step: int | None,
                  load: Callable[[ocp.CheckpointManager, int], T]) -> tuple[int, T]:
    """``(s, load(mngr, s))`` for the given ``step``, else for the newest step that is not damaged."""
    candidates = steps(run_dir) if step is None else [step]
    if not candidates:
        raise CheckpointError(f"no checkpoint in {os.path.join(run_dir, CHECKPOINT_DIR)}")
    mngr = manager(run_dir, create=False)
    record = read_checksums(run_dir)
    damaged: list[tuple[int, str]] = []
    for s in candidates:
        reason = verify_step(run_dir, s, record)
        if reason is not None:
            damaged.append((s, reason))
            continue
        try:
            with _quiet_closed_event_loops():
                value = load(mngr, s)
        except _Damaged as e:
            damaged.append((s, str(e)))
            continue
        for bad, reason in damaged:
            where = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR, str(bad)))
            if where not in _warned:  # Orbax's reason may differ between attempts: one warning per checkpoint
                _warned.add(where)
                warnings.warn(f"checkpoint step {bad} in {run_dir} is damaged ({reason}); "
                              f"falling back to step {s}", JaxmetaWarning, stacklevel=3)
        return s, value
    if len(damaged) == 1:
        s, reason = damaged[0]
        raise CheckpointError(f"cannot restore checkpoint {s} in {run_dir} (corrupt or incomplete): {reason}")
    listed = "; ".join(f"step {s}: {reason}" for s, reason in damaged)
    raise CheckpointError(f"every checkpoint in {run_dir} is damaged ({listed})")


def _restore_identity(mngr: ocp.CheckpointManager, step: int) -> dict:
    return dict(_restoring(mngr, step, ocp.args.Composite(identity=ocp.args.JsonRestore()))["identity"])


def _restoring(mngr: ocp.CheckpointManager, step: int, args: Any) -> Any:
    """``mngr.restore(step, args=args)``; any failure means a damaged checkpoint (:class:`_Damaged`)."""
    try:
        return mngr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - any failure here is a corrupt checkpoint
        reason = _short(e)
    raise _Damaged(reason)  # outside the handler: Orbax's failed tasks are not kept alive by a __context__


def _remove_partial_save(mngr: ocp.CheckpointManager, directory: str, step: int) -> None:
    """Removes what a failed save of ``step`` left (Orbax's temporary directory), no finished checkpoint.

    The save's other writes may still be in flight when its first failure
    propagates (TensorStore writes from worker threads, and may create files
    in the temporary directory after a first removal): wait for them, then
    remove until nothing of the save is left.
    """
    with contextlib.suppress(Exception):
        mngr.wait_until_finished()
    for _ in range(100):  # at most about 5 s
        try:
            partial = [name for name in os.listdir(directory) if name.startswith(f"{step}{_TMP_SUFFIX}")]
        except OSError:
            return
        if not partial:
            return
        for name in partial:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        time.sleep(0.05)


@contextlib.contextmanager
def _quiet_closed_event_loops():
    """Drops the asyncio noise of a failing save or restore.

    When a write or read fails, TensorStore's callbacks still reach the event
    loop Orbax already closed (unraisable "Event loop is closed" tracebacks),
    during the call and after it, and its failed tasks are logged as "never
    retrieved" whenever they are collected; the operation's own exception is
    what tells the user. After a failure both filters stay for the rest of the
    process (they match only that noise).
    """
    previous = sys.unraisablehook
    if not getattr(previous, "drops_closed_loop_noise", False):  # not already left in place by a failure
        sys.unraisablehook = _closed_loop_filter(previous)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        if not any(f is _never_retrieved for f in logging.getLogger("asyncio").filters):
            logging.getLogger("asyncio").addFilter(_never_retrieved)
        gc.collect()  # most failed tasks go now
        raise
    finally:
        if not failed:
            sys.unraisablehook = previous


def _closed_loop_filter(hook):
    def filtered(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and "Event loop is closed" in str(error)):
            hook(unraisable)

    filtered.drops_closed_loop_noise = True
    return filtered


def _never_retrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


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
