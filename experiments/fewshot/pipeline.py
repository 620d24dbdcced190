"""N-way K-shot image classification: one pipeline for Omniglot and Mini-ImageNet.

The experiments ``python -m experiments.omniglot`` and
``python -m experiments.miniimagenet`` are thin launchers over this module:
they differ only in their data set (:data:`DATASETS`) and presets.  It
provides ``train`` (meta-training with validation, checkpoints, metrics, a
curve and a final test evaluation), ``evaluate`` (600 fixed test tasks) and
``episode`` (adapt the meta-learned initialisation to a user's own folders of
images).

Batch norm always uses the statistics of the batch it sees (the reference
MAML implementation's *transductive* setting): the support set during
adaptation, the whole query set when scoring.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmeta import checkpoint as ckpt
from jaxmeta.algorithms.registry import (
    ALGORITHMS,
    check_protocol,
    config_options,
    learner_model,
    make_learner,
    spec,
)
from jaxmeta.config import NONNEGATIVE, POSITIVE, Config, option
from jaxmeta.data import episodes, provenance
from jaxmeta.distributed import check_meta_batch, machine_name, task_mesh
from jaxmeta.errors import CheckpointError, ConfigError, DataError, JaxmetaWarning
from jaxmeta.evaluation import ci95, evaluate
from jaxmeta.io import atomic_write_bytes, figure, pyplot, read_jsonl, save_figure, to_json, write_json
from jaxmeta.models import (
    CONV_IMPLS,
    classification_loss,
    conv4_miniimagenet,
    conv4_omniglot,
    non_transductive_classification_score,
    transductive_classification_score,
)
from jaxmeta.training import METRICS_FILE, Interrupted, best_steps, init_train_state, steady_step_ms, train

CONFIG_FILE = "config.json"
EVAL_FILE = "eval.json"
TRAIN_FILE = "train.json"
TEST_SEED = 2017  # the fixed test tasks: the same 600 tasks for every run and method
VAL_SEED = 1234


class Dataset(NamedTuple):
    """What differs between image data sets.

    Attributes:
      load: ``load(config) -> (train, val | None, test)`` arrays
        ``[classes, examples, H, W, C]`` (float in [0, 1] or uint8).
      model: ``model(ways, conv_impl) -> flax module``.
      preprocess: PIL image → one example ``[H, W, C]`` (for user episodes).
      normalize: applied on device to sampled images (``None``: use as is).
      identity: ``identity(config) -> dict``, the source files' names, sizes and
        SHA-256 (:mod:`jaxmeta.data.provenance`), recorded in ``config.json``.
    """

    load: Callable
    model: Callable
    preprocess: Callable
    normalize: Callable | None
    identity: Callable


def _load_omniglot(config: FewShotConfig):
    from jaxmeta.data import omniglot

    return omniglot.load(config.split, data_dir=config.data_dir, cache_dir=config.cache_dir)


def _omniglot_identity(config: FewShotConfig) -> dict:
    from jaxmeta.data import omniglot

    return omniglot.source_identity(config.data_dir, config.cache_dir)


def _miniimagenet_identity(config: FewShotConfig) -> dict:
    from jaxmeta.data import miniimagenet

    return miniimagenet.source_identity(config.data_dir)


def _load_miniimagenet(config: FewShotConfig):
    from jaxmeta.data import miniimagenet

    return miniimagenet.load(data_dir=config.data_dir, cache_dir=config.cache_dir)


def _omniglot_preprocess(img):
    from jaxmeta.data import omniglot

    return omniglot.preprocess_image(img)


def _miniimagenet_preprocess(img):
    from jaxmeta.data import miniimagenet

    return miniimagenet.preprocess_image(img)


def _miniimagenet_normalize(x):
    from jaxmeta.data import miniimagenet

    return miniimagenet.normalize(x)


DATASETS = {
    "omniglot": Dataset(_load_omniglot, conv4_omniglot, _omniglot_preprocess, None, _omniglot_identity),
    "miniimagenet": Dataset(_load_miniimagenet, conv4_miniimagenet, _miniimagenet_preprocess,
                            _miniimagenet_normalize, _miniimagenet_identity),
}


EVAL_MODES = ("transductive", "non-transductive")
"""How validation and test query sets are scored (see :func:`query_score`)."""
INNER_OPTIMIZERS = ("sgd", "adam")
"""The inner optimisers a run can choose (Adam for Reptile's protocol)."""


def eval_file(eval_mode: str = "transductive", ensemble: int = 0, shots: int | None = None) -> str:
    """The run file of a test evaluation: ``eval.json``, or ``eval-non-transductive.json`` for that mode
    (a run can hold both, as the Reptile paper reports both); a K-checkpoint ensemble's adds
    ``-ensembleK`` (``eval-ensemble5.json``), an evaluation at other test shots than the run's
    ``-Kshot`` (``eval-non-transductive-1shot.json``)."""
    stem = EVAL_FILE.removesuffix(".json")
    stem += f"-{eval_mode}" if eval_mode != "transductive" else ""
    stem += f"-ensemble{ensemble}" if ensemble else ""
    stem += f"-{shots}shot" if shots is not None else ""
    return f"{stem}.json"


@dataclasses.dataclass(frozen=True)
class FewShotConfig(Config):
    """A few-shot classification run (frozen and hashable; presets are instances).

    The inner learning rate applies to a *mean*-reduced cross-entropy (the MAML
    reference code differentiated a sum over the support examples).
    ``eval_queries=None`` evaluates with as many query examples per class as
    training used (the reference code's protocol): with transductive batch
    norm the query batch is part of the model, and its size should match.
    ``eval_mode`` scores validation and test query sets in one batch
    (``"transductive"``, MAML's evaluation) or each query example in a batch
    of the support set plus itself (``"non-transductive"``, Reptile's).
    ``train_shots``, ``inner_optimizer``/``inner_beta1``, ``inner_batch``,
    ``test_inner_batch`` and ``persistent_inner_state`` express Reptile's
    reference protocol: training episodes with more shots than the test
    ones, inner Adam with β1 = 0 on mini-batches of the support set, its
    state carried from task to task (see :func:`jaxmeta.algorithms.reptile.reptile`).
    """

    dataset: str = option("omniglot", choices=tuple(DATASETS), flag=False)
    algo: str = option("maml", choices=ALGORITHMS, help="default maml")
    ways: int = option(5, check=POSITIVE, help="N classes per task (default 5)")
    shots: int = option(1, check=POSITIVE, help="K support examples per class (default 1)")
    queries: int = option(15, check=POSITIVE, help="query examples per class in training")
    meta_batch: int = option(32, check=POSITIVE, help="tasks per meta-step")
    inner_steps: int = option(1, check=POSITIVE, help="inner SGD steps in training")
    inner_lr: float = option(0.4, check=POSITIVE, help="inner learning rate (mean-reduced loss)")
    test_inner_steps: int = option(3, check=NONNEGATIVE, help="inner steps at validation/test time")
    outer_lr: float = option(1e-3, check=POSITIVE, help="outer (Adam) learning rate")
    reptile_epsilon: float = option(1.0, check=POSITIVE, help="Reptile's outer step size (default 1, annealed to 0)")
    imaml_lam: float = option(1.0, check=POSITIVE, help="iMAML's proximal strength lambda (default 1)")
    imaml_cg_steps: int = option(5, check=POSITIVE, help="iMAML's conjugate-gradient steps (default 5)")
    imaml_cg_damping: float = option(
        0.0, check=NONNEGATIVE,
        help="iMAML: solve (I + H/(lambda + D)) g = grad instead of the exact D = 0 (default 0)")
    per_step_bn: bool = option(False, help="MAML++: per-step batch-norm weights and biases (BNWB)")
    train_shots: int | None = option(
        None, check=POSITIVE, help="support examples per class in training tasks (default: --shots; Reptile's paper: 10)")
    inner_optimizer: str = option("sgd", choices=INNER_OPTIMIZERS, help="Reptile: inner sgd (default) or adam")
    inner_beta1: float = option(0.9, check=NONNEGATIVE, help="the inner Adam's beta1 (default 0.9; Reptile's 0)")
    inner_batch: int | None = option(None, check=POSITIVE,
                                     help="Reptile: support examples per inner step (default all)")
    test_inner_batch: int | None = option(
        None, check=POSITIVE, help="Reptile: support examples per inner step at validation/test time (default all)")
    persistent_inner_state: bool = option(
        False, help="Reptile: carry the inner Adam state from task to task (the reference code)")
    meta_steps: int = option(60_000, check=POSITIVE, help="meta-iterations in total (also when resuming)")
    split: str = option("maml", choices=("maml", "lake"))
    seed: int = option(0)
    conv_impl: str = option("auto", choices=CONV_IMPLS, help="convolution: auto (patches on CPU), patches, native")
    chunk_size: int | None = option(None, check=POSITIVE, help="tasks per chunk (default: vmap all tasks)")
    remat: bool = option(False, help="rematerialise inner steps (saves memory)")
    eval_queries: int | None = option(
        None, check=POSITIVE, help="query examples per class in validation/test tasks (default: as in training)")
    eval_mode: str = option(
        "transductive", choices=EVAL_MODES,
        help="score validation/test query sets in one batch (transductive, the default: MAML's) or "
             "each query example with the support set alone (non-transductive: Reptile's)")
    test_tasks: int = option(600, check=POSITIVE, help="fixed test tasks of the final evaluation (600)")
    val_tasks: int = option(100, check=POSITIVE, help="fixed validation tasks")
    log_every: int = option(100, check=POSITIVE, help="meta-steps per logged line (and per dispatch)")
    val_every: int = option(1_000, check=POSITIVE)
    checkpoint_every: int = option(1_000, check=POSITIVE)
    keep_best: int = option(
        0, check=NONNEGATIVE,
        help="also keep the K checkpoints with the best validation accuracy (for evaluate --ensemble K)")
    max_bad_steps: int = option(20, check=POSITIVE, help="stop after this many consecutive non-finite meta-steps")
    devices: int | None = option(None, check=POSITIVE,
                                 help="devices to shard the task batch over (default: all local devices)")
    data_dir: str | None = option(None, help="directory of the original data")
    cache_dir: str | None = option(None, help="preprocessed-data cache (else $JAXMETA_CACHE_DIR or ~/.cache/jaxmeta)")

    IDENTITY_EXCLUDE = ("meta_steps", "log_every", "val_every", "checkpoint_every", "max_bad_steps",
                        "data_dir", "cache_dir", "test_tasks", "val_tasks", "test_inner_steps", "chunk_size",
                        "eval_queries", "eval_mode", "test_inner_batch", "devices", "keep_best")

    IDENTITY_LATER = ("imaml_lam", "imaml_cg_steps", "imaml_cg_damping", "per_step_bn", "train_shots",
                      "inner_optimizer", "inner_beta1", "inner_batch", "persistent_inner_state")
    """Fields added after runs were first written: out of the identity at their defaults."""

    def validate(self) -> None:
        """Checks everything that needs no data; raises :class:`ConfigError`."""
        spec(self.algo)  # an unknown name is one line
        super().validate()
        if self.ways < 2:
            raise ConfigError(f"ways must be at least 2, got {self.ways}")
        if self.test_tasks < 2:
            raise ConfigError("tasks must be at least 2 for a confidence interval")
        if not 0 <= self.inner_beta1 < 1:
            raise ConfigError(f"inner-beta1 must be in [0, 1), got {self.inner_beta1}")
        check_protocol(self.algo, {"inner_batch": self.inner_batch is not None,
                                   "test_inner_batch": self.test_inner_batch is not None,
                                   "persistent_inner_state": self.persistent_inner_state,
                                   "inner_optimizer": self.inner_optimizer != "sgd", "per_step_bn": self.per_step_bn})
        if self.persistent_inner_state and self.inner_optimizer == "sgd":
            raise ConfigError("persistent-inner-state carries the inner optimizer's state: use --inner-optimizer adam")
        if self.inner_batch is not None and self.inner_batch > self.ways * self.support_shots:
            raise ConfigError(f"inner-batch {self.inner_batch} exceeds the support set "
                              f"({self.ways} x {self.support_shots} examples)")
        if self.test_inner_batch is not None and self.test_inner_batch > self.ways * self.shots:
            raise ConfigError(f"test-inner-batch {self.test_inner_batch} exceeds the test support set "
                              f"({self.ways} x {self.shots} examples)")

    def validate_data(self, train: np.ndarray, test: np.ndarray) -> None:
        """Checks the episodes against the data: ways ≤ classes, K + Q ≤ examples per class."""
        try:
            episodes.validate_episode(train.shape[0], train.shape[1], ways=self.ways, shots=self.support_shots,
                                      queries=self.queries)
        except ConfigError as e:
            raise ConfigError(f"training split of {self.dataset} ({self.split}): {e}") from None
        self.validate_test(test)

    @property
    def support_shots(self) -> int:
        """Support examples per class in training tasks (``train_shots``, else ``shots``)."""
        return self.shots if self.train_shots is None else self.train_shots

    @property
    def test_queries(self) -> int:
        """Query examples per class in validation and test tasks."""
        return self.queries if self.eval_queries is None else self.eval_queries

    def validate_test(self, test: np.ndarray) -> None:
        try:
            episodes.validate_episode(test.shape[0], test.shape[1], ways=self.ways, shots=self.shots,
                                      queries=self.test_queries)
        except ConfigError as e:
            raise ConfigError(f"test split of {self.dataset} ({self.split}): {e}") from None


def reptile_protocol(*, inner_batch: int, inner_steps: int, inner_lr: float, train_shots: int, test_inner_batch: int,
                     meta_steps: int) -> dict:
    """The Reptile paper's training and test protocol (openai/supervised-reptile's flags) as config fields.

    Shared by every setting: meta-batch 5; inner Adam with β1 = 0 whose state
    carries over from task to task (the reference's one TensorFlow optimiser);
    meta step size 1 decayed linearly to 0 (``reptile_epsilon`` with the
    learner's annealing over ``meta_steps``); at test, 50 inner iterations on
    mini-batches of ``test_inner_batch``, one query example per class, scored
    non-transductively (the paper's main rows; evaluate ``--eval-mode
    transductive`` for the others).
    """
    return dict(meta_batch=5, inner_steps=inner_steps, inner_lr=inner_lr, inner_optimizer="adam", inner_beta1=0.0,
                inner_batch=inner_batch, train_shots=train_shots, persistent_inner_state=True, reptile_epsilon=1.0,
                meta_steps=meta_steps, queries=1, test_inner_steps=50, test_inner_batch=test_inner_batch,
                eval_mode="non-transductive")


def algo_defaults(config: FewShotConfig, explicit: set[str]) -> FewShotConfig:
    """At least the algorithm's fewest inner steps unless given (Reptile needs 5: with one it is joint training)."""
    fewest = spec(config.algo).min_inner_steps
    if "inner_steps" not in explicit and config.inner_steps < fewest:
        config = dataclasses.replace(config, inner_steps=fewest, test_inner_steps=max(config.test_inner_steps, fewest))
    return config


# --------------------------------------------------------------------------------------
# Pieces shared by train / evaluate / episode.
# --------------------------------------------------------------------------------------


def build(config: FewShotConfig):
    """``(model, loss_fn, learner)`` for a configuration."""
    model = learner_model(config.algo, DATASETS[config.dataset].model(config.ways, config.conv_impl))
    loss_fn = classification_loss(model)
    learner = make_learner(
        config.algo,
        loss_fn,
        **config_options(config),
        has_aux=True,
        remat=config.remat,
        chunk_size=config.chunk_size,
        mamlpp_per_step_bn=config.per_step_bn,
        model=model,
        make_loss=classification_loss,
        inner_optimizer=make_inner_optimizer(config),
        inner_batch_size=config.inner_batch,
        persistent_inner_state=config.persistent_inner_state,
        seed=config.seed,
        test_inner_batch_size=config.test_inner_batch,
    )
    return model, loss_fn, learner


@functools.lru_cache(maxsize=None)
def learner_of(config: FewShotConfig):
    """The learner of ``config``, one object per configuration (its ``adapt`` is a static argument of the
    compiled evaluation, so evaluations of one configuration reuse one program)."""
    return build(config)[2]


@functools.lru_cache(maxsize=None)
def make_inner_optimizer(config: FewShotConfig):
    """The inner optimiser of ``config`` (``None``: SGD at ``inner_lr``); one object per configuration, so
    programs compiled with it as a static argument are reused."""
    if config.inner_optimizer == "sgd":
        return None
    return optax.adam(config.inner_lr, b1=config.inner_beta1)


def init_params(config: FewShotConfig, model, example_shape: tuple[int, ...]):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    return model.init(key, jnp.zeros((config.ways * config.shots, *example_shape)))["params"]


def task_sampler(config: FewShotConfig, *, batch_size: int, queries: int, shots: int | None = None):
    """``sample(key, images) -> Task`` batch drawn on the device from ``images`` (``shots``: default ``config.shots``)."""
    shots = config.shots if shots is None else shots
    normalize = DATASETS[config.dataset].normalize

    def sample(key, images):
        tasks = episodes.sample_tasks(key, images, batch_size=batch_size, ways=config.ways, shots=shots,
                                      queries=queries)
        if normalize is not None:
            tasks = tasks._replace(support=(normalize(tasks.support[0]), tasks.support[1]),
                                   query=(normalize(tasks.query[0]), tasks.query[1]))
        return tasks

    return sample


def fixed_tasks(config: FewShotConfig, images: np.ndarray, *, num_tasks: int, seed: int):
    """A fixed set of evaluation tasks (the same for every run with the same episode shape)."""
    sample = task_sampler(config, batch_size=num_tasks, queries=config.test_queries)
    return jax.jit(sample)(jax.random.PRNGKey(seed), jnp.asarray(images))


@functools.lru_cache(maxsize=None)
def query_score(config: FewShotConfig, probabilities: bool = False):
    """The query scorer of ``config.eval_mode`` (``None``: the whole query set in one batch with the loss).

    With ``probabilities`` its ``aux`` also holds every query example's
    softmax (what :func:`ensemble_score` averages). Cached per configuration,
    so the evaluation programs compiled for it are reused (the scorer is a
    static argument of the compiled evaluation).
    """
    model = DATASETS[config.dataset].model(config.ways, config.conv_impl)
    if config.eval_mode == "transductive":
        return transductive_classification_score(model, probabilities=True) if probabilities else None
    return non_transductive_classification_score(model, probabilities=probabilities)


EVAL_IMAGES = 25_000
"""Images one evaluation chunk may put through the network at once (:func:`eval_chunk`)."""


def eval_chunk(config: FewShotConfig) -> int:
    """Tasks adapted and scored at once: 50, or fewer when a task's scored images are many.

    A non-transductive task scores each query example in a batch with the
    whole support set, so a 20-way 1-shot task with 15 queries per class puts
    300 x 21 images through the network; 50 such tasks at once took more than
    24 GB. Chunking changes no number: every task is adapted and scored alone.
    """
    support = config.ways * config.shots
    queries = config.ways * config.test_queries
    scored = queries * (support + 1) if config.eval_mode == "non-transductive" else queries
    return max(1, min(50, EVAL_IMAGES // (support + scored)))


PARTIAL_DIR = "eval-partial"
"""Where an evaluation in progress keeps its finished slices of tasks: ``RUN/eval-partial/``."""


def partial_dir(run_dir: str, eval_name: str, step: int) -> str:
    """The folder of the finished slices of one evaluation (``eval_name``, a :func:`eval_file`) of
    the checkpoint at ``step``: ``RUN/eval-partial/eval-non-transductive-5shot/step-10000``."""
    return os.path.join(run_dir, PARTIAL_DIR, eval_name.removesuffix(".json"), f"step-{step}")


def _saved_slices(folder: str, identity: dict) -> set[int]:
    """The first tasks of the slices saved in ``folder`` for an evaluation of this ``identity``; a folder
    of another one (other settings or slice size) is emptied, and this identity written into it."""
    path = os.path.join(folder, "identity.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) == json.loads(to_json(identity)):
                return {int(name[len("tasks-"):-len(".npz")]) for name in os.listdir(folder)
                        if name.startswith("tasks-") and name.endswith(".npz")}
        print(f"evaluate: {folder} holds part of an evaluation with other settings; starting over",
              file=sys.stderr)
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    write_json(path, identity)
    return set()


def per_task_results(config: FewShotConfig, loss_fn, meta_params, tasks, steps: int, *,
                     probabilities: bool = False, save_in: str | None = None,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """Every test task's query accuracy and loss after 0..steps inner steps, ``[tasks, steps + 1]``
    (non-transductive: after ``steps`` alone, ``[tasks, 1]``).

    With ``probabilities`` also the softmax of each query example after the
    last step, ``[tasks, queries, ways]`` (what :func:`ensemble_score` averages).
    The tasks go a slice of :func:`eval_chunk` tasks at a time; every task is
    adapted and scored alone, with its own key, so slicing changes no number.
    With ``save_in`` (a folder, :func:`partial_dir`) each finished slice is
    saved there and a later call picks up after the saved slices: one
    600-task evaluation can span processes and sessions, and its numbers are
    those of an uninterrupted one.

    A non-transductive evaluation scores only the last step: its score puts
    the support set through the network with every query example, so scoring
    after each of Reptile's 50 test steps was most of the time (20-way 5-shot:
    8.7 s per task; scored once, 0.9 s, though beside the test suite).
    """
    from tqdm.auto import tqdm

    num_tasks = int(tasks.query[1].shape[0])
    score_fn, size = query_score(config, probabilities), min(eval_chunk(config), num_tasks)
    every_step = config.eval_mode == "transductive"
    identity = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("data_dir", "cache_dir")},
                "inner_steps": steps, "every_step": every_step, "slice": size, "probabilities": probabilities}
    saved = _saved_slices(save_in, identity) if save_in else set()
    if saved:
        print(f"evaluate: {len(saved)} of {-(-num_tasks // size)} slices of tasks already scored in {save_in}; "
              "going on from there", file=sys.stderr)
    parts = []
    bar = tqdm(total=num_tasks, desc=f"evaluate ({config.eval_mode}, {steps} steps)", unit="task",
               disable=not progress, dynamic_ncols=True)
    for first in range(0, num_tasks, size):
        path = os.path.join(save_in or "", f"tasks-{first:05d}.npz")
        if first in saved:
            with np.load(path) as part:
                parts.append(dict(part))
        else:
            # The last slice is padded with copies of the last task (then dropped): one compiled program.
            indices = np.minimum(np.arange(first, first + size), num_tasks - 1)
            result = evaluate(learner_of(config), meta_params, jax.tree.map(lambda a, i=indices: a[i], tasks),
                              steps=steps, loss_fn=None if score_fn else loss_fn, has_aux=True,
                              query_score=score_fn, key=jax.random.PRNGKey(config.seed), chunk_size=None,
                              first_task=first, every_step=every_step)
            kept = min(size, num_tasks - first)
            values = {k: np.asarray(v)[:kept] for k, v in result.per_task.items()}
            if probabilities:
                values["probabilities"] = values["probabilities"][:, -1]
            if save_in:
                buffer = io.BytesIO()
                np.savez(buffer, **values)
                atomic_write_bytes(path, buffer.getvalue())
            parts.append(values)
        bar.update(len(parts[-1]["accuracy"]))
    bar.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def ensemble_score(config: FewShotConfig, loss_fn, members: Sequence, tasks, steps: int, *,
                   save_in: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Accuracy of a checkpoint ensemble: each member adapts to every task on its own, the
    members' softmax outputs on each query example are averaged, and the arg-max is the prediction.

    ``members`` are meta-parameters (e.g. the K best checkpoints by validation,
    MAML++'s reported protocol). Returns the ensemble's accuracy and 95% CI
    over tasks after ``steps`` inner steps, and each member's own accuracy.
    ``save_in``: each member's folder of finished slices (:func:`per_task_results`).
    """
    probabilities, alone = [], []
    for i, params in enumerate(members):
        result = per_task_results(config, loss_fn, params, tasks, steps, probabilities=True,
                                  save_in=save_in[i] if save_in else None, progress=progress)
        probabilities.append(result["probabilities"].astype(np.float64))  # [tasks, Q, C]
        alone.append(float(result["accuracy"][:, -1].mean()))
    predicted = np.mean(probabilities, axis=0).argmax(-1)
    per_task = (predicted == np.asarray(tasks.query[1])).mean(-1)
    return {
        "accuracy": float(per_task.mean()),
        "ci95": float(ci95(jnp.asarray(per_task))),
        "tasks": int(per_task.shape[0]),
        "inner_steps": int(steps),
        "queries_per_class": int(config.test_queries),
        "eval_mode": config.eval_mode,
        "ensemble": len(members),
        "member_accuracy": alone,
    }


def score(config: FewShotConfig, loss_fn, meta_params, tasks, steps: int, *, save_in: str | None = None,
          progress: bool = False) -> dict:
    """Accuracy (and loss) after 0..steps inner steps, mean and 95% CI over tasks.

    ``save_in``: a folder of finished slices, to resume from (:func:`per_task_results`).
    """
    per_task = per_task_results(config, loss_fn, meta_params, tasks, steps, save_in=save_in, progress=progress)
    acc, ci = np.mean(per_task["accuracy"], axis=0), np.asarray(ci95(jnp.asarray(per_task["accuracy"])))
    return {
        "accuracy": float(acc[-1]),
        "ci95": float(ci[-1]),
        "tasks": int(per_task["accuracy"].shape[0]),
        "inner_steps": int(steps),
        "queries_per_class": int(config.test_queries),
        "eval_mode": config.eval_mode,
        "accuracy_per_step": acc.tolist(),
        "ci95_per_step": ci.tolist(),
        "loss_per_step": np.mean(per_task["loss"], axis=0).tolist(),
    }


def _read_config_file(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not os.path.exists(path):
        raise CheckpointError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise TypeError("expected a JSON object")
        return raw
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None


def read_config(run_dir: str) -> FewShotConfig:
    """The configuration saved in a run directory."""
    raw = _read_config_file(run_dir)
    raw.pop("data", None)
    try:
        return FewShotConfig(**raw)
    except TypeError as e:
        raise CheckpointError(f"{os.path.join(run_dir, CONFIG_FILE)} is corrupt: {e}") from None


def read_data_identity(run_dir: str) -> dict | None:
    """The identity of the data a run was trained on (``None`` for runs older than the record)."""
    return _read_config_file(run_dir).get("data")


def warn_if_data_differs(run_dir: str, config: FewShotConfig, *, what: str = "evaluating") -> dict | None:
    """Warns (:class:`~jaxmeta.errors.JaxmetaWarning`) when the data at hand are not the run's.

    Returns the identity of the data at hand (``None`` when there are none to compare).
    """
    try:
        current = DATASETS[config.dataset].identity(config)
    except DataError:
        return None  # no data at hand (an episode needs none): nothing to compare
    _warn_if_differs(run_dir, config.dataset, current, what)
    return current


def _warn_if_differs(run_dir: str, dataset: str, current: dict, what: str) -> None:
    differs = provenance.describe_differences(read_data_identity(run_dir), current)
    if differs:
        warnings.warn(f"{what} {run_dir} with {dataset} data other than it was trained on: {differs}",
                      JaxmetaWarning, stacklevel=3)


def load_params(run_dir: str, config: FewShotConfig, model, example_shape, *, step: int | None = None):
    """A checkpoint's step and meta-parameters (for Meta-SGD and MAML++ with their rates).

    ``step``: which checkpoint (default: the newest intact one).
    """
    _, _, learner = build(config)
    abstract = jax.eval_shape(lambda: init_train_state(learner, init_params(config, model, example_shape),
                                                       jax.random.PRNGKey(0)))
    if ckpt.latest_step(run_dir) is None:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    step, state = ckpt.restore(run_dir, abstract, config.identity(), step=step)
    return step, state.meta.params


def ensemble_members(run_dir: str, k: int, metric: str = "val/accuracy") -> list[int]:
    """The steps of the ``k`` checkpoints of a run with the best validation ``metric``, best first.

    Raises:
      ConfigError: the run holds fewer than ``k`` validated checkpoints.
    """
    candidates = best_steps(read_jsonl(os.path.join(run_dir, METRICS_FILE)), metric, k, among=ckpt.steps(run_dir))
    if len(candidates) < k:
        raise ConfigError(f"{run_dir} holds {len(candidates)} validated checkpoint(s), fewer than the ensemble's "
                          f"{k} (train with --keep-best {k})")
    return candidates


def write_training(run_dir: str, *, resume: bool, meta_steps: int, seconds: float, step_ms: Sequence[float],
                   skipped_steps: int | None = None) -> dict:
    """Writes ``RUN/train.json`` after a training call (finished or interrupted): the meta-steps reached,
    this call's and all calls' wall time, the steady ms per meta-step, machine and code commit."""
    before = read_training(run_dir) if resume else {}
    training = {"meta_steps": meta_steps, "skipped_steps": skipped_steps, "train_seconds_this_call": seconds,
                "train_seconds_total": before.get("train_seconds_total", before.get("train_seconds_this_call", 0.0))
                + seconds,
                "calls": before.get("calls", 1 if before else 0) + 1, "resumed": resume,
                "device": str(jax.devices()[0]), "machine": machine_name(), "commit": provenance.code_commit(),
                "ms_per_meta_step": steady_step_ms(step_ms), "dispatches_timed": max(len(step_ms) - 1, 0)}
    write_json(os.path.join(run_dir, TRAIN_FILE), training)
    return training


def read_training(run_dir: str) -> dict:
    """``RUN/train.json`` (the training calls' wall time, machine and speed); empty when absent or unreadable."""
    try:
        with open(os.path.join(run_dir, TRAIN_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def load_data(config: FewShotConfig):
    train_images, val_images, test_images = DATASETS[config.dataset].load(config)
    return train_images, val_images, test_images


# --------------------------------------------------------------------------------------
# train / evaluate / episode.
# --------------------------------------------------------------------------------------


def train_and_evaluate(config: FewShotConfig, run_dir: str, *, resume: bool = False, progress: bool = True) -> dict:
    """Meta-trains, validates, checkpoints, then evaluates on the fixed test tasks.

    Writes ``RUN/config.json``, ``RUN/metrics.jsonl``, ``RUN/checkpoints/``,
    ``RUN/curve.png`` and ``RUN/eval.json``; returns the evaluation.
    """
    config.validate()
    mesh = task_mesh(config.devices)
    check_meta_batch(config.meta_batch, mesh)
    existing = ckpt.latest_step(run_dir)
    if resume:
        if existing is None:
            raise CheckpointError(f"nothing to resume: no checkpoint in {run_dir}")
        differ = ckpt.identity_differences(ckpt.read_identity(run_dir), config.identity())
        if differ:
            raise CheckpointError(f"checkpoint in {run_dir} is from a different configuration ({', '.join(differ)})")
        good = ckpt.latest_good_step(run_dir)  # a damaged newest step falls back to the one before
        if good is not None and good >= config.meta_steps:
            raise ConfigError(f"{run_dir} already ran {good} meta-steps: ask for more with --meta-steps, "
                              f"or score it with evaluate --run {run_dir}")
    elif existing is not None:
        raise CheckpointError(
            f"{run_dir} already holds a run (checkpoint at step {existing}): pass --resume or choose another --out"
        )
    data = DATASETS[config.dataset].identity(config)  # missing or unreadable data: the error load_data gives
    if resume:
        _warn_if_differs(run_dir, config.dataset, data, "resuming")
    train_images, val_images, test_images = load_data(config)
    config.validate_data(train_images, test_images)
    write_json(os.path.join(run_dir, CONFIG_FILE), {**dataclasses.asdict(config), "data": data})

    model, loss_fn, learner = build(config)
    params = init_params(config, model, train_images.shape[2:])
    sample = task_sampler(config, batch_size=config.meta_batch, queries=config.queries, shots=config.support_shots)
    validate = None
    if val_images is not None:
        config.validate_test(val_images)
        val_tasks = fixed_tasks(config, val_images, num_tasks=config.val_tasks, seed=VAL_SEED)

        def validate(p):
            result = score(config, loss_fn, p, val_tasks, config.test_inner_steps)
            return {"accuracy": result["accuracy"], "loss": result["loss_per_step"][-1]}

    try:
        result = train(
            learner,
            params,
            sample,
            data=jnp.asarray(train_images),
            key=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
            meta_steps=config.meta_steps,
            log_every=config.log_every,
            validate=validate,
            validate_every=config.val_every,
            out_dir=run_dir,
            checkpoint_every=config.checkpoint_every,
            keep_best=config.keep_best,
            resume=resume,
            identity=config.identity(),
            max_bad_steps=config.max_bad_steps,
            progress=progress,
            mesh=mesh,
            desc=f"{config.dataset} {config.ways}-way {config.shots}-shot {config.algo}",
        )
    except Interrupted as stopped:  # the checkpoint is written; so is the call's time, for the result record
        if stopped.complete:  # in the final dispatch: training is done, only the test evaluation is left
            finish_training(config, run_dir, stopped.result, resume=resume)
            stopped.then = ["evaluate", "--run", run_dir]
        else:
            write_training(run_dir, resume=resume, meta_steps=stopped.step, seconds=stopped.seconds,
                           step_ms=stopped.step_ms)
        raise
    finish_training(config, run_dir, result, resume=resume)
    test_tasks = fixed_tasks(config, test_images, num_tasks=config.test_tasks, seed=TEST_SEED)
    name, step = eval_file(config.eval_mode), int(result.state.step)
    evaluation = score(config, loss_fn, result.state.meta.params, test_tasks, config.test_inner_steps,
                       save_in=partial_dir(run_dir, name, step), progress=progress)
    evaluation.update(meta_steps=step, device=str(jax.devices()[0]), algo=config.algo,
                      ways=config.ways, shots=config.shots, dataset=config.dataset, split=config.split)
    return write_evaluation(run_dir, name, evaluation)


def finish_training(config: FewShotConfig, run_dir: str, result, *, resume: bool) -> None:
    """After the last meta-step: ``RUN/curve.png`` and ``RUN/train.json`` (:func:`write_training`)."""
    plot_curve(read_jsonl(os.path.join(run_dir, METRICS_FILE)), os.path.join(run_dir, "curve.png"),
               title=f"{config.dataset} {config.ways}-way {config.shots}-shot {config.algo}")
    write_training(run_dir, resume=resume, meta_steps=int(result.state.step), seconds=result.seconds,
                   step_ms=result.step_ms, skipped_steps=int(result.state.skipped))


def write_evaluation(run_dir: str, name: str, evaluation: dict) -> dict:
    """Writes a finished evaluation to ``RUN/name`` and removes its finished slices (:data:`PARTIAL_DIR`)."""
    write_json(os.path.join(run_dir, name), evaluation)
    partial = os.path.join(run_dir, PARTIAL_DIR)
    shutil.rmtree(os.path.join(partial, name.removesuffix(".json")), ignore_errors=True)
    if os.path.isdir(partial) and not os.listdir(partial):
        os.rmdir(partial)
    return evaluation


def evaluate_run(run_dir: str, *, tasks: int | None = None, inner_steps: int | None = None,
                 eval_queries: int | None = None, data_dir: str | None = None,
                 cache_dir: str | None = None, eval_mode: str | None = None, ensemble: int = 0,
                 shots: int | None = None, progress: bool = False) -> dict:
    """Evaluates a run's newest checkpoint on the fixed test tasks; writes ``RUN/eval.json``.

    Resumable: finished slices of tasks are kept in ``RUN/eval-partial/`` until
    the evaluation ends, and a rerun of the same evaluation goes on from them.

    ``ensemble=K`` evaluates the mean prediction of the run's K best checkpoints
    by validation accuracy instead (:func:`ensemble_score`; the run must have
    kept them, ``train --keep-best K``) and writes ``RUN/eval-ensembleK.json``.
    ``shots=K`` tests on K-shot tasks instead of the run's (:func:`evaluation_shots`).
    """
    config = read_config(run_dir)
    trained_shots, other_shots = config.shots, evaluation_shots(config, shots, run_dir)
    if other_shots is not None:
        config = dataclasses.replace(config, shots=other_shots)
    config = dataclasses.replace(config, data_dir=data_dir or config.data_dir, cache_dir=cache_dir or config.cache_dir)
    if tasks is not None:
        config = dataclasses.replace(config, test_tasks=tasks)
    if eval_queries is not None:
        config = dataclasses.replace(config, eval_queries=eval_queries)
    if eval_mode is not None:
        config = dataclasses.replace(config, eval_mode=eval_mode)
    steps = config.test_inner_steps if inner_steps is None else inner_steps
    config.validate()
    warn_if_data_differs(run_dir, config)
    _, _, test_images = load_data(config)
    config.validate_test(test_images)
    model, loss_fn, _ = build(config)
    members = ensemble_members(run_dir, ensemble) if ensemble else [None]
    trained = dataclasses.replace(config, shots=trained_shots)  # the checkpoints' identity
    loaded = [load_params(run_dir, trained, model, test_images.shape[2:], step=m) for m in members]
    test_tasks = fixed_tasks(config, test_images, num_tasks=config.test_tasks, seed=TEST_SEED)
    name = eval_file(config.eval_mode, ensemble, other_shots)
    save_in = [partial_dir(run_dir, name, s) for s, _ in loaded]
    if ensemble:
        evaluation = ensemble_score(config, loss_fn, [p for _, p in loaded], test_tasks, steps, save_in=save_in,
                                    progress=progress)
        evaluation["member_steps"] = [s for s, _ in loaded]
    else:
        evaluation = score(config, loss_fn, loaded[0][1], test_tasks, steps, save_in=save_in[0], progress=progress)
    evaluation.update(meta_steps=max(s for s, _ in loaded), device=str(jax.devices()[0]), algo=config.algo,
                      ways=config.ways, shots=config.shots, dataset=config.dataset, split=config.split)
    return write_evaluation(run_dir, name, evaluation)


def evaluation_shots(config: FewShotConfig, shots: int | None, run_dir: str) -> int | None:
    """The test shots ``evaluate --shots K`` asks of the run in ``run_dir``: ``None`` for the run's own.

    Only a run whose training tasks did not depend on its test shots may be
    tested at others: one trained with ``--train-shots`` (Reptile's protocol,
    whose 1-shot and 5-shot commands train alike on 10-shot tasks and differ
    only in the test tasks). Such a run's training, checkpoints and
    initialisation are the same at any ``shots``; only validation differed.
    """
    if shots is None or shots == config.shots:
        return None
    if config.train_shots is None:
        raise ConfigError(f"--shots {shots}: {run_dir} trained on its own {config.shots}-shot tasks; only a run "
                          "trained with --train-shots (Reptile's protocol) may be tested at other shots")
    return shots


def episode(run_dir: str, support_dir: str, query_dir: str, *, inner_steps: int | None = None) -> dict:
    """Adapts a run's initialisation to a user's own episode of image folders.

    ``SDIR/<class>/*.png`` are the labelled support images and
    ``QDIR/<class>/*.png`` the query images (their folder names only score
    the predictions).  Images of any size get the data set's preprocessing.
    """
    from jaxmeta.data.folders import load_folder_episode

    config = read_config(run_dir)
    spec = DATASETS[config.dataset]
    warn_if_data_differs(run_dir, config, what="adapting")
    task, class_names, query_paths = load_folder_episode(support_dir, query_dir, spec.preprocess)
    if len(class_names) > config.ways:
        raise DataError(f"the episode has {len(class_names)} classes but {run_dir} was meta-trained for "
                        f"{config.ways}-way tasks")
    if len(class_names) < 2:
        raise DataError(f"the episode needs at least 2 classes, found {len(class_names)} in {support_dir}")
    steps = config.test_inner_steps if inner_steps is None else inner_steps
    model, loss_fn, _ = build(config)
    example_shape = task.support[0].shape[1:]
    _, meta_params = load_params(run_dir, config, model, example_shape)
    support = tuple(jnp.asarray(a) for a in task.support)
    query_x = jnp.asarray(task.query[0])
    if spec.normalize is not None:  # the folder loader returns floats holding the data set's uint8 values
        support = (spec.normalize(support[0].astype(jnp.uint8)), support[1])
        query_x = spec.normalize(query_x.astype(jnp.uint8))
    adapted = learner_of(config).adapt(meta_params, support, steps=steps, key=jax.random.PRNGKey(config.seed))
    logits = model.apply({"params": adapted}, query_x)
    predicted = np.asarray(jnp.argmax(logits[:, : len(class_names)], axis=-1))
    accuracy = float(np.mean(predicted == np.asarray(task.query[1])))
    return {"accuracy": accuracy,
            "predictions": {path: class_names[int(p)] for path, p in zip(query_paths, predicted)}}


@figure
def plot_curve(history: list[dict], path: str, *, title: str = "") -> None:
    """Training (query, after adaptation) and validation accuracy against meta-steps."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    for key, label in (("train/query_accuracy_post", "train query, after adaptation"),
                       ("train/query_accuracy_pre", "train query, before adaptation")):
        if history and key in history[0]:
            ax1.plot(steps, [r[key] for r in history], label=label)
    val = [(r["step"], r["val/accuracy"]) for r in history if "val/accuracy" in r]
    if val:
        ax1.plot(*zip(*val), "o-", label="validation (fixed tasks)")
    ax1.set(xlabel="meta-step", ylabel="accuracy", title=title)
    ax1.legend()
    ax2.plot(steps, [r["train/loss"] for r in history], label="meta-loss")
    ax2.set(xlabel="meta-step", ylabel="loss", yscale="log")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, path)



@figure
def plot_comparison(run_dirs: list[str], path: str) -> None:
    """Learning curves of several runs (e.g. the four algorithms) in one figure.

    Left: training query accuracy after adaptation (before it, for
    pre-training, which has no adaptation in its objective); right:
    validation accuracy on the fixed validation tasks.
    """
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        config = read_config(run_dir)
        history = read_jsonl(os.path.join(run_dir, METRICS_FILE))
        if not history:
            raise DataError(f"{run_dir} has no {METRICS_FILE} yet")
        label = f"{config.algo} ({config.ways}-way {config.shots}-shot)"
        key = "train/query_accuracy_post" if "train/query_accuracy_post" in history[0] else "train/query_accuracy_pre"
        ax1.plot([r["step"] for r in history], [r[key] for r in history], label=label)
        val = [(r["step"], r["val/accuracy"]) for r in history if "val/accuracy" in r]
        if val:
            ax2.plot(*zip(*val), "o-", label=label)
    ax1.set(xlabel="meta-step", ylabel="training query accuracy", title="meta-training")
    ax2.set(xlabel="meta-step", ylabel="accuracy", title="validation (fixed tasks)")
    for ax in (ax1, ax2):
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
