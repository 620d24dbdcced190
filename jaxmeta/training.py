"""The compiled meta-training loop shared by every experiment.

Tasks are sampled inside the compiled program and many meta-steps run per
dispatch (a ``lax.scan`` over ``learner.step``), so Python and host-device
transfers vanish from the step time.  Around it: a progress bar, metrics in
``RUN/metrics.jsonl`` (rewritten atomically), periodic validation, Orbax
checkpoints of the whole state (parameters, optimiser, step, PRNG key), exact
resume, and a guard that keeps non-finite updates away from the parameters.

Faults end in one clear error with the last good checkpoint kept: SIGTERM or
SIGINT (a preemption, Ctrl-C) stops after the current dispatch with a
checkpoint at that step (:class:`Interrupted`); a full disk stops with a
:class:`~jaxmeta.errors.CheckpointError`; a resume skips a damaged newest
checkpoint and sets it aside.
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Collection
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmeta import checkpoint as ckpt
from jaxmeta.algorithms.base import MetaLearner, MetaState
from jaxmeta.distributed import replicate, shard_tasks
from jaxmeta.errors import CheckpointError, JaxmetaError, JaxmetaWarning
from jaxmeta.io import read_jsonl, write_jsonl
from jaxmeta.types import Params, PRNGKey, Task

METRICS_FILE = "metrics.jsonl"


class TrainState(NamedTuple):
    """Everything needed to continue training exactly.

    Attributes:
      meta: the meta-learner's state (parameters, optimiser state, updates applied).
      key: the PRNG key the task sampler draws from next.
      step: meta-iterations run so far (including skipped ones).
      bad_streak: consecutive non-finite meta-steps just before ``step``.
      skipped: non-finite meta-steps skipped in total.
    """

    meta: MetaState
    key: jax.Array
    step: jax.Array
    bad_streak: jax.Array
    skipped: jax.Array


class TrainingDiverged(JaxmetaError):
    """Too many consecutive meta-steps gave a non-finite loss or update."""


class Interrupted(JaxmetaError):
    """Training stopped by SIGTERM or SIGINT, at a meta-step whose state was checkpointed.

    Attributes:
      signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
      step: the meta-step reached (logged, and checkpointed with an output directory).
      checkpoint: the checkpoint directory of ``step`` (``None`` without an output directory).
      seconds: wall time of the interrupted call.
      step_ms: wall milliseconds per meta-step of every dispatch of that call (as in :class:`TrainResult`).
      complete: the signal arrived during the final dispatch: training reached its last
        meta-step (``step``), so there is nothing to resume; what the caller meant to do
        after training (a test evaluation) did not run.
      result: with ``complete``, the :class:`TrainResult` that :func:`train` would have returned.
      then: with ``complete``, the arguments of the command that does what is left (set by
        the caller that knows it, e.g. ``["evaluate", "--run", RUN]``); the CLI prints it.
    """

    def __init__(self, signal_name: str, step: int, checkpoint: str | None, *, seconds: float = 0.0,
                 step_ms: list[float] | None = None, complete: bool = False, result: "TrainResult | None" = None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.seconds, self.step_ms = seconds, list(step_ms or [])
        self.complete, self.result, self.then = complete, result, None
        saved = f"checkpoint {checkpoint}" if checkpoint else "nothing saved (no output directory)"
        when = f"after the last meta-step ({step}), training complete" if complete else f"at meta-step {step}"
        super().__init__(f"interrupted by {signal_name} {when}; {saved}")

    @property
    def signum(self) -> int:
        """The signal's number (the conventional exit code is ``128 + signum``)."""
        return int(signal.Signals[self.signal_name])

    def __reduce__(self):
        return functools.partial(type(self), complete=self.complete), (self.signal_name, self.step, self.checkpoint)


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the final :class:`TrainState`.
      history: the logged rows (those of ``metrics.jsonl``).
      seconds: wall time of the call.
      step_ms: wall milliseconds per meta-step of every dispatch of this call
        (sampling included; validation, checkpoints and logging excluded).  The
        first dispatch of each chunk length includes its compilation.
    """

    state: TrainState
    history: list[dict]
    seconds: float
    step_ms: list[float] = []


def steady_step_ms(step_ms: list[float]) -> float | None:
    """The median of :attr:`TrainResult.step_ms` without the first dispatch (compilation); ``None`` if too few."""
    steady = step_ms[1:]
    return float(np.median(steady)) if steady else None


def best_steps(history: list[dict], metric: str, k: int, among: Collection[int] | None = None) -> list[int]:
    """The ``k`` logged steps with the highest ``metric``, best first (ties: the later step first).

    Rows without the metric (or with a non-finite value) are never chosen;
    ``among`` restricts the choice (e.g. to the steps that have a checkpoint).

    Examples:
      >>> rows = [{"step": 100, "val/accuracy": 0.5}, {"step": 200}, {"step": 300, "val/accuracy": 0.7},
      ...         {"step": 400, "val/accuracy": 0.5}]
      >>> best_steps(rows, "val/accuracy", 2)
      [300, 400]
      >>> best_steps(rows, "val/accuracy", 2, among={100, 200})
      [100]
    """
    scored = [(float(row[metric]), int(row["step"])) for row in history
              if metric in row and math.isfinite(float(row[metric])) and (among is None or row["step"] in among)]
    return [step for _, step in sorted(scored, reverse=True)[:k]]


def init_train_state(learner: MetaLearner, params: Params, key: PRNGKey) -> TrainState:
    """A fresh :class:`TrainState`."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(learner.init(params), key, zero, zero, zero)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_step(
    learner: MetaLearner,
    sample_tasks: Callable[[PRNGKey, Any], Task],
    data: Any = None,
    mesh: Mesh | None = None,
):
    """One meta-iteration that skips (and counts) non-finite updates.

    A step whose meta-loss or new state is not finite leaves the meta-state
    unchanged; the sampler key advances either way. With a ``mesh``, the task
    batch is split over its devices.
    """

    def step(state: TrainState, _=None):
        key, sub = jax.random.split(state.key)
        tasks = shard_tasks(sample_tasks(sub, data), mesh)
        new_meta, metrics = learner.step(state.meta, tasks)
        ok = jnp.isfinite(metrics["loss"]) & _all_finite(new_meta)
        meta = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_meta, state.meta)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        state = TrainState(
            meta=meta,
            key=key,
            step=state.step + 1,
            bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
            skipped=state.skipped + bad,
        )
        return state, {**metrics, "finite": ok}

    return step


def make_train_chunk(
    learner: MetaLearner, sample_tasks: Callable[[PRNGKey, Any], Task], mesh: Mesh | None = None
):
    """``run(state, data, n) -> (state, metrics stacked over n steps)``, compiled per ``n``.

    ``data`` (e.g. the training images on the device) is an argument of the
    compiled program rather than a constant baked into it.  With a ``mesh``
    the task batch of every step is sharded over its devices.
    """

    def run(state: TrainState, data: Any, n: int):
        return jax.lax.scan(guarded_step(learner, sample_tasks, data, mesh), state, None, length=n)

    return jax.jit(run, static_argnums=2)


def summarize_chunk(metrics: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over a chunk's finite steps, with the number of skipped steps."""
    finite = np.asarray(metrics["finite"], bool)
    out = {}
    for name, values in metrics.items():
        if name == "finite":
            continue
        values = np.asarray(values, np.float64)
        out[name] = float(values[finite].mean()) if finite.any() else float("nan")
    out["skipped"] = int((~finite).sum())
    return out


def _diverged_message(first: int, last: int, limit: int, ckpt_step: int | None) -> str:
    kept = f"the last good checkpoint (step {ckpt_step}) is kept" if ckpt_step is not None else "no checkpoint was written"
    return (
        f"training stopped: meta-steps {first}..{last} all gave a non-finite loss or update "
        f"(limit: {limit} consecutive); {kept}"
    )


class _StopRequests:
    """While active, SIGTERM and SIGINT only note that a stop was asked for (:attr:`signum`).

    A SIGINT while a stop is pending restores the previous handlers and raises
    :class:`KeyboardInterrupt` at once (a user forcing the quit). Handlers can
    only be installed from the main thread: elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # not the main interpreter, or no such signal here
                    pass
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            self._restore()
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum


def _os_error_reason(e: BaseException) -> str | None:
    """The operating-system error behind ``e`` (``"No space left on device"``), or ``None``.

    Orbax raises the ``OSError`` itself or chains it; TensorStore raises a
    ``ValueError`` whose text carries ``[os_error_code='28']``.
    """
    seen = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError):
            return cause.strerror or str(cause) or type(cause).__name__
        found = re.search(r"os_error_code='?(\d+)", str(cause))
        if found:
            return os.strerror(int(found.group(1)))
        cause = cause.__cause__ or cause.__context__
    return None


def _written(what: str, step: int, out_dir: str, last_ckpt: int | None, write: Callable[[], None]) -> None:
    """Runs ``write()``; an operating-system failure (a full disk) becomes one :class:`CheckpointError`."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - only OS-level failures are translated, the rest propagates
        reason = _os_error_reason(e)
        if reason is None:
            raise
        kept = (f"the checkpoint at step {last_ckpt} is intact" if last_ckpt is not None
                else "no checkpoint was written yet")
        raise CheckpointError(
            f"cannot write {what} at meta-step {step} in {out_dir}: {reason}; {kept}") from e


def train(
    learner: MetaLearner,
    params: Params,
    sample_tasks: Callable[[PRNGKey, Any], Task],
    *,
    key: PRNGKey,
    meta_steps: int,
    data: Any = None,
    log_every: int = 100,
    validate: Callable[[Params], dict[str, float]] | None = None,
    validate_every: int | None = None,
    out_dir: str | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    keep_best: int = 0,
    best_metric: str = "val/accuracy",
    resume: bool = False,
    identity: dict | None = None,
    max_bad_steps: int = 20,
    progress: bool = True,
    desc: str = "meta-train",
    mesh: Mesh | None = None,
) -> TrainResult:
    """Meta-trains ``learner`` from ``params`` for ``meta_steps`` meta-iterations.

    Args:
      learner: a :class:`~jaxmeta.MetaLearner` (``maml``, ``reptile``, ...).
      params: initial parameters (ignored when resuming from a checkpoint).
      sample_tasks: ``sample_tasks(key, data) -> Task`` batch; traced into
        the compiled loop, so it must be a pure JAX function.
      key: PRNG key of the task sampler.
      meta_steps: total meta-iterations (when resuming: in total, not more).
      data: a pytree of arrays handed to ``sample_tasks`` (e.g. the images of
        the training split, on the device).
      log_every: meta-steps per compiled dispatch and per logged line.
      validate: ``validate(params) -> {name: value}``, logged with a ``val/`` prefix.
      validate_every: validation period in meta-steps (rounded up to a
        multiple of ``log_every``); the final step is always validated.
      out_dir: run directory for ``metrics.jsonl`` and ``checkpoints/``.
      checkpoint_every: checkpoint period (multiple of ``log_every``); the
        final step is always checkpointed when ``out_dir`` is given.
      keep_checkpoints: how many of the newest checkpoints to keep.
      keep_best: also keep the checkpoints of the ``keep_best`` logged steps
        with the highest ``best_metric`` (a checkpoint ensemble's members;
        :func:`best_steps`). Only steps that are both validated and
        checkpointed can be chosen, so align ``validate_every`` with
        ``checkpoint_every``.
      best_metric: the logged metric ranking checkpoints for ``keep_best``.
      resume: continue from the newest checkpoint in ``out_dir`` (from scratch
        when there is none). Damaged newer checkpoints (see
        :func:`jaxmeta.checkpoint.restore`) are moved to
        ``out_dir/damaged-checkpoints/`` with a warning.
      identity: the run's model/task configuration, stored with checkpoints;
        resuming from a checkpoint with a different one is refused.
      max_bad_steps: stop after this many consecutive non-finite meta-steps.
      progress: show a progress bar with ETA and running metrics.
      desc: the progress bar's label.
      mesh: a one-axis device mesh (:func:`jaxmeta.distributed.task_mesh`);
        the task batch is sharded over it, data and state are replicated.

    Returns:
      A :class:`TrainResult` with the final state, the logged rows, and the
      wall time of this call in seconds.

    Raises:
      TrainingDiverged: ``max_bad_steps`` consecutive non-finite meta-steps.
      CheckpointError: resuming from a missing or mismatched checkpoint, or
        ``metrics.jsonl`` or a checkpoint could not be written (a full disk).
      Interrupted: SIGTERM or SIGINT arrived (when called from the main
        thread): the current dispatch finished, was logged and checkpointed,
        and resuming continues exactly. A second SIGINT quits at once
        (``KeyboardInterrupt``). A signal during the final dispatch raises
        this once training is complete and checkpointed, with ``complete`` set and
        the :class:`TrainResult` attached, so the caller can still record the
        call before it stops.
    """
    from tqdm.auto import tqdm

    identity = identity or {}
    state = init_train_state(learner, params, key)
    history: list[dict] = []
    mngr = None
    metrics_path = None
    last_ckpt = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        metrics_path = os.path.join(out_dir, METRICS_FILE)
        existing = ckpt.latest_step(out_dir)
        if existing is not None and not resume:
            raise CheckpointError(
                f"{out_dir} already holds a run (checkpoint at step {existing}): resume it or choose another output directory"
            )
        if resume and existing is not None:
            last_ckpt, state = ckpt.restore(out_dir, jax.eval_shape(lambda: state), identity)
            newer = [s for s in ckpt.steps(out_dir) if s > last_ckpt]  # damaged: restore fell back past them
            for path in ckpt.set_aside(out_dir, newer):
                warnings.warn(f"moved damaged checkpoint to {path}; resuming from step {last_ckpt}",
                              JaxmetaWarning, stacklevel=2)
            history = [row for row in read_jsonl(metrics_path) if row["step"] <= last_ckpt]
        mngr = ckpt.manager(out_dir, keep=None if keep_best else keep_checkpoints)

    def period(every):
        return None if not every else max(log_every, int(math.ceil(every / log_every)) * log_every)

    validate_every = period(validate_every)
    checkpoint_every = period(checkpoint_every)
    run_chunk = make_train_chunk(learner, sample_tasks, mesh)
    state, data = replicate(state, mesh), replicate(data, mesh)
    start_step = int(state.step)
    started = time.perf_counter()
    step_ms: list[float] = []
    bar = tqdm(total=meta_steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True)

    def save(step):
        _written("the checkpoint", step, out_dir, last_ckpt, lambda: ckpt.save(mngr, step, state, identity))
        if keep_best:
            saved = sorted(mngr.all_steps(), reverse=True)
            ckpt.prune(mngr, {*saved[:keep_checkpoints], *best_steps(history, best_metric, keep_best, saved)})
        return step

    stop = _StopRequests()

    def interrupted(step, seconds, **finished):
        where = None if mngr is None else os.path.join(out_dir, ckpt.CHECKPOINT_DIR, str(step))
        return Interrupted(signal.Signals(stop.signum).name, step, where, seconds=seconds, step_ms=step_ms, **finished)

    try:
        with stop:
            while int(state.step) < meta_steps:
                step = int(state.step)
                n = min(log_every - step % log_every, meta_steps - step)
                dispatched = time.perf_counter()
                state, metrics = run_chunk(state, data, n)
                metrics = jax.device_get(metrics)
                step_ms.append(1e3 * (time.perf_counter() - dispatched) / n)
                step = int(state.step)
                row = {"step": step, **{f"train/{k}": v for k, v in summarize_chunk(metrics).items()}}
                if int(state.bad_streak) >= max_bad_steps:
                    first_bad = step - int(state.bad_streak) + 1
                    raise TrainingDiverged(_diverged_message(first_bad, step, max_bad_steps, last_ckpt))
                final = step >= meta_steps
                if validate is not None and (final or (validate_every and step % validate_every == 0)):
                    row.update({f"val/{k}": float(v) for k, v in validate(state.meta.params).items()})
                history.append(row)
                if metrics_path is not None:
                    _written(METRICS_FILE, step, out_dir, last_ckpt,
                             lambda: write_jsonl(metrics_path, history))
                if mngr is not None and (final or (checkpoint_every and step % checkpoint_every == 0)):
                    last_ckpt = save(step)
                bar.update(n)
                bar.set_postfix(_postfix(row), refresh=False)
                if stop.signum is not None and not final:
                    if mngr is not None and last_ckpt != step:
                        last_ckpt = save(step)
                    raise interrupted(step, time.perf_counter() - started)
    finally:
        bar.close()
        if mngr is not None:
            mngr.close()
    result = TrainResult(state, history, time.perf_counter() - started, step_ms)
    if stop.signum is not None:  # it arrived during the final dispatch: training is complete, now obey it
        raise interrupted(int(state.step), result.seconds, complete=True, result=result)
    return result


def _postfix(row: dict) -> dict[str, str]:
    keys = ("train/loss", "train/query_accuracy_post", "val/accuracy", "val/loss")
    return {k.split("/", 1)[1] if k.startswith("train") else k: f"{row[k]:.4g}" for k in keys if k in row}
