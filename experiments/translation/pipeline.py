"""MAML for low-resource translation (Gu et al. 2018, MetaNMT) on real Tatoeba text.

Tasks are source languages (→ English).  A meta-training run learns an
initialisation of a small byte-level Transformer with the project's shared
training loop (first-order MAML or Reptile = MetaNMT, the pre-training
baseline = MultiNMT, or no training = from scratch); validation languages,
never trained on, pick its checkpoint.  Each initialisation is then
fine-tuned on each held-out language with 0, 100, 400, 1,600 or all of its
training pairs (several seeds), and scored with sacreBLEU's BLEU and chrF on
that language's held-out Tatoeba pairs and on FLORES-200 devtest.

The experiment's commands live in :mod:`experiments.translation`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmeta import checkpoint as ckpt
from jaxmeta import tokens
from jaxmeta.algorithms.pretrain import pretrain
from jaxmeta.algorithms.registry import config_options, make_learner, spec
from jaxmeta.config import NONNEGATIVE, POSITIVE, Config, option
from jaxmeta.data import provenance
from jaxmeta.data import translation as tdata
from jaxmeta.errors import CheckpointError, ConfigError, DataError, JaxmetaWarning, missing_extra
from jaxmeta.evaluation import evaluate
from jaxmeta.io import atomic_write_text, figure, pyplot, read_jsonl, save_figure, write_json, write_jsonl
from jaxmeta.models.transformer import (
    Transformer,
    TransformerConfig,
    greedy_decode,
    init_params,
    translation_loss,
)
from jaxmeta.training import init_train_state, make_train_chunk, train
from jaxmeta.types import Task

META_ALGORITHMS = ("fomaml", "reptile", "maml", "pretrain", "scratch")
METHOD_NAMES = {"fomaml": "MetaNMT (FOMAML)", "reptile": "MetaNMT (Reptile)", "maml": "MetaNMT (MAML)",
                "pretrain": "MultiNMT", "scratch": "scratch"}
SCRATCH = "scratch"
"""The method that trains nothing: the random initialisation, fine-tuned like the others."""


def registered(method: str) -> str:
    """The registered algorithm a method's checkpoint belongs to (scratch is pre-training after 0 steps)."""
    return "pretrain" if method == SCRATCH else method
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.jsonl"
SELECTION_FILE = "selection.json"
CHECKPOINT_SELECTIONS = ("validation", "finetuned")
ALL = "all"
# Fields every initialisation in one comparison must share (model, tokenised lengths, splits).
SHARED_FIELDS = ("d_model", "heads", "encoder_layers", "decoder_layers", "d_ff", "max_len", "val_langs",
                 "test_pairs", "dev_pairs", "split_seed")


# --------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TranslationConfig(Config):
    """A meta-training run and the fine-tuning protocol used to evaluate it.

    Model: a byte-level Transformer (``d_model``, ``heads``, layers, ``d_ff``).
    Pairs with more than ``max_len`` bytes on either side are left out of
    training (about 20% of Tatoeba); test sources are truncated at
    ``eval_len`` bytes and outputs at ``eval_len`` tokens (FLORES: ``flores_len``).

    Meta-training: ``meta_batch`` languages per meta-step, each a task with
    ``support`` and ``query`` pairs; ``inner_steps`` Adam steps (lr
    ``inner_lr``) adapt to the support set: the same optimiser as fine-tuning,
    so the meta-objective is the quantity fine-tuning then improves.
    Reptile moves by ``reptile_epsilon`` (annealed) toward the adapted weights.

    Fine-tuning: Adam on batches of ``finetune_batch`` pairs, at most
    ``finetune_steps`` steps, early-stopped on the language's ``dev_pairs``
    development pairs every ``finetune_eval_every`` steps (patience
    ``finetune_patience``); the best development loss wins.  Its learning rate
    is chosen per initialisation from ``finetune_lrs`` on the validation
    languages (``finetune_val_pairs`` pairs each), never on a target language:
    a pre-trained model and a meta-learned one need not like the same rate.

    Checkpoint: ``checkpoint_selection="validation"`` evaluates the checkpoint
    each run recorded (its own validation objective, :func:`selection_metric`);
    ``"finetuned"`` chooses checkpoint and rate together by the same
    fine-tuned validation loss, over ``selection_candidates`` evenly spaced
    kept checkpoints (0: all), the same rule for every method
    (:func:`select_by_finetuning`).
    """

    algo: str = option("fomaml", flag=False)
    meta_langs: tuple[str, ...] = option((), flag=False)
    val_langs: tuple[str, ...] = option(tdata.VALIDATION_LANGUAGES, flag=False)
    target_langs: tuple[str, ...] = option((), flag=False)
    d_model: int = option(128, check=POSITIVE, flag=False)
    heads: int = option(4, check=POSITIVE, flag=False)
    encoder_layers: int = option(2, check=POSITIVE, flag=False)
    decoder_layers: int = option(2, check=POSITIVE, flag=False)
    d_ff: int = option(256, check=POSITIVE, flag=False)
    max_len: int = option(48, check=POSITIVE, flag=False)
    meta_batch: int = option(4, check=POSITIVE)
    support: int = option(16, check=POSITIVE, flag=False)
    query: int = option(16, check=POSITIVE, flag=False)
    inner_steps: int = option(3, check=POSITIVE)
    inner_lr: float = option(1e-3, check=POSITIVE)
    outer_lr: float = option(1e-3, check=POSITIVE)
    reptile_epsilon: float = option(1.0, check=POSITIVE, flag=False)
    meta_steps: int = option(2_000, check=NONNEGATIVE)
    seed: int = option(0, check=NONNEGATIVE)
    log_every: int = option(25, check=POSITIVE)
    val_every: int = option(250, check=POSITIVE)
    val_tasks: int = option(4, check=POSITIVE, flag=False)
    val_steps: int = option(10, check=NONNEGATIVE, flag=False)
    test_pairs: int = option(500, check=POSITIVE, flag=False)
    dev_pairs: int = option(200, check=POSITIVE, flag=False)
    split_seed: int = option(0, flag=False)
    finetune_lr: float = option(1e-3, check=POSITIVE, flag=False)
    finetune_lrs: tuple[float, ...] = option((1e-3, 3e-4, 1e-4, 3e-5), check=POSITIVE, flag=False)
    finetune_val_pairs: int = option(400, check=POSITIVE, flag=False)
    finetune_batch: int = option(32, check=POSITIVE, flag=False)
    finetune_steps: int = option(200, check=POSITIVE)
    finetune_eval_every: int = option(20, check=POSITIVE, flag=False)
    finetune_patience: int = option(3, check=POSITIVE, flag=False)
    eval_len: int = option(96, check=POSITIVE, flag=False)
    flores_sentences: int = option(100, check=NONNEGATIVE)
    flores_len: int = option(256, check=POSITIVE, flag=False)
    sizes: tuple[str, ...] = option(("0", "100", "400", "1600", ALL), flag=False)
    seeds: tuple[int, ...] = option((0, 1, 2), flag=False)
    checkpoint_selection: str = option("validation", choices=CHECKPOINT_SELECTIONS, flag=False)
    selection_candidates: int = option(0, check=NONNEGATIVE, flag=False)
    data_dir: str | None = option(None, flag=False)

    IDENTITY_EXCLUDE = ("meta_steps", "log_every", "val_every", "val_tasks", "val_steps", "data_dir",
                        "target_langs", "sizes", "seeds", "flores_sentences", "flores_len", "eval_len",
                        "finetune_lr", "finetune_lrs", "finetune_val_pairs", "finetune_batch", "finetune_steps",
                        "finetune_eval_every", "finetune_patience", "checkpoint_selection", "selection_candidates")

    @property
    def model_config(self) -> TransformerConfig:
        return TransformerConfig(self.d_model, self.heads, self.encoder_layers, self.decoder_layers, self.d_ff)

    def resolved(self) -> TranslationConfig:
        """Fills the data directory and the manifest's languages; checks every code."""
        data_dir = self.data_dir or tdata.default_data_dir()
        meta = self.meta_langs or tdata.languages_with_role(data_dir, tdata.ROLE_META_TRAIN)
        target = self.target_langs or tdata.languages_with_role(data_dir, tdata.ROLE_TARGET)
        config = dataclasses.replace(self, data_dir=data_dir, meta_langs=tuple(meta), target_langs=tuple(target))
        tdata.check_languages(data_dir, config.meta_langs + config.val_langs + config.target_langs)
        overlap = set(config.meta_langs) & (set(config.val_langs) | set(config.target_langs))
        if overlap:
            raise ConfigError(f"language(s) {', '.join(sorted(overlap))} both meta-trained on and held out")
        return config

    def validate(self) -> None:
        """Checks everything that needs no data; raises :class:`ConfigError`."""
        if self.algo not in META_ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algo!r}; choose from {', '.join(META_ALGORITHMS)}")
        super().validate()
        if self.d_model % self.heads or self.d_model % 2:
            raise ConfigError(f"d-model {self.d_model} must be even and divisible by heads {self.heads}")
        for size in self.sizes:
            parse_size(size)
        if not self.seeds:
            raise ConfigError("give at least one fine-tuning seed")
        if not self.finetune_lrs:
            raise ConfigError("give at least one fine-tuning learning rate (finetune-lrs)")
        if self.finetune_val_pairs < self.finetune_batch:
            raise ConfigError("finetune-val-pairs must be at least finetune-batch")


def parse_size(size: str) -> int | None:
    """A data size: a non-negative integer, or ``all`` (``None``)."""
    if str(size) == ALL:
        return None
    try:
        value = int(size)
    except ValueError:
        raise ConfigError(f"data size must be a non-negative integer or 'all', got {size!r}") from None
    if value < 0:
        raise ConfigError(f"data size must be a non-negative integer or 'all', got {size!r}")
    return value


PRESETS = {
    # Minutes on a 2-core CPU: six Romance/Germanic languages, a tiny model; Romanian (a Romance
    # language) and Korean (a script never seen in meta-training) as targets.
    "quick": dict(meta_langs=("fra", "spa", "ita", "por", "deu", "nld"), target_langs=("ron", "kor"),
                  d_model=64, heads=4, encoder_layers=1, decoder_layers=1, d_ff=256, max_len=40,
                  meta_batch=4, support=16, query=16, inner_steps=2, outer_lr=2e-3, meta_steps=400,
                  log_every=50, val_every=200, val_tasks=2, val_steps=5, test_pairs=200, dev_pairs=100,
                  finetune_steps=100, finetune_eval_every=25, finetune_patience=2, eval_len=64,
                  flores_sentences=0, sizes=("0", "400"), seeds=(0,), finetune_lrs=(1e-3, 1e-4)),
    # About two hours in all on a 2-core CPU: the 17 meta-training languages, the 5 targets.
    "cpu": dict(meta_steps=1_500, outer_lr=2e-3, finetune_steps=300, finetune_eval_every=25),
    # The cpu preset with ten times the meta-steps (about 5.5 minutes of meta-training on one H200),
    # and fine-tuning to convergence: capped at 300 steps on the H200 run, 44 of the 48 1,600-pair and
    # full-data fine-tunings and 7 of MultiNMT's 15 400-pair ones were best at the last step, still
    # improving; early stopping (patience) ends the others as before.  Checkpoints are chosen by the
    # fine-tuned validation loss (6 candidates a run): two H200 MultiNMT checkpoints with equal
    # validation losses fine-tuned to 1.056 and 1.003 on the validation languages.
    "gpu": dict(meta_steps=15_000, outer_lr=2e-3, finetune_steps=2_000, finetune_eval_every=25,
                val_every=1_000, log_every=250, checkpoint_selection="finetuned", selection_candidates=6),
}


def preset(name: str, **overrides) -> TranslationConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return TranslationConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------
# Model, learner, data.
# --------------------------------------------------------------------------------------


def build(config: TranslationConfig):
    """``(model, loss_fn)``; ``loss_fn(params, (source, target)) -> (loss, {"accuracy"})``."""
    model = Transformer(config.model_config)
    return model, translation_loss(model)


def learner(config: TranslationConfig, loss_fn):
    """The meta-learner of ``config.algo`` (MAML variants and Reptile adapt with Adam)."""
    algo = spec(config.algo)  # a differentiated Adam needs eps_root > 0 (its sqrt has no derivative at 0)
    inner = optax.adam(config.inner_lr, eps_root=1e-8 if algo.second_order else 0.0) if algo.inner_loop else None
    return make_learner(config.algo, loss_fn, **{**config_options(config), "meta_steps": max(config.meta_steps, 1)},
                        has_aux=True, inner_optimizer=inner)


def load_corpus(config: TranslationConfig, codes: Sequence[str] | None = None) -> tdata.Corpus:
    """The splits of ``codes`` (default: every meta-training, validation and target language)."""
    if codes is None:
        codes = config.meta_langs + config.val_langs + config.target_langs
    return tdata.load_corpus(config.data_dir, codes, test=config.test_pairs, dev=config.dev_pairs,
                             seed=config.split_seed)


def held_out_corpus(config: TranslationConfig) -> tdata.Corpus:
    """Only what fine-tuning reads: the validation (rate choice) and target languages."""
    return load_corpus(config, config.val_langs + config.target_langs)


def validation_tasks(config: TranslationConfig, corpus: tdata.Corpus) -> Task:
    """Fixed tasks of the validation languages (support from train, query from dev)."""
    rng = np.random.default_rng(config.seed)
    tasks = []
    for code in config.val_langs:
        train_pairs = [p for p in corpus.train(code) if tdata.fits(p, config.max_len)]
        dev_pairs = dev_subset(config, corpus, code)
        for _ in range(config.val_tasks):
            s = rng.choice(len(train_pairs), config.finetune_batch, replace=False)
            q = rng.choice(len(dev_pairs), min(len(dev_pairs), 2 * config.query), replace=False)
            support = tdata.pair_arrays([train_pairs[i] for i in s], config.max_len)
            query = tdata.pair_arrays([dev_pairs[i] for i in q], config.max_len)
            tasks.append(Task(support, query))
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs).astype(np.int32)), *tasks)


# --------------------------------------------------------------------------------------
# Meta-training (and the MultiNMT / scratch initialisations).
# --------------------------------------------------------------------------------------


def read_config(run_dir: str) -> TranslationConfig:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} is not a translation run (no {CONFIG_FILE})")
    with open(path) as f:
        raw = json.load(f)
    fields = {f.name for f in dataclasses.fields(TranslationConfig)}
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    return TranslationConfig(**raw)


def warn_if_data_differs(run_dir: str, config: TranslationConfig, codes: Sequence[str]) -> None:
    """Warns (:class:`~jaxmeta.errors.JaxmetaWarning`) when the files of ``codes`` at hand are not
    those the run read (runs older than the record, or languages it never read, pass silently)."""
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        recorded = json.load(f).get("data")
    if not recorded:
        return
    seen = [c for c in codes if f"tatoeba/{c}.tsv.gz" in recorded["files"]]
    current = tdata.corpus_identity(config.data_dir or tdata.default_data_dir(), seen)
    recorded = {**recorded, "files": {k: v for k, v in recorded["files"].items() if k in current["files"]}}
    differs = provenance.describe_differences(recorded, current)
    if differs:
        warnings.warn(f"{run_dir} was trained on other translation data: {differs}", JaxmetaWarning, stacklevel=2)


def meta_train(config: TranslationConfig, run_dir: str, *, resume: bool = False, progress: bool = True) -> dict:
    """Meta-trains (or pre-trains) an initialisation; validation languages pick the checkpoint.

    Every validation is checkpointed (all kept), and each method's checkpoint
    is chosen by its own objective on the validation languages (see
    :func:`selection_metric`).  ``scratch`` writes the random initialisation
    as step 0.

    Returns:
      The run's summary (also in ``RUN/summary.json``).
    """
    config.validate()
    config = config.resolved()
    existing = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(existing) and not resume:
        raise ConfigError(f"{run_dir} already holds a run: pass --resume or choose another --out")
    if os.path.isfile(existing) and read_config(run_dir).identity() != config.identity():
        raise ConfigError(f"{run_dir} holds a run with another configuration; choose another --out")
    codes = config.meta_langs + config.val_langs + config.target_langs
    if os.path.isfile(existing):
        warn_if_data_differs(run_dir, config, codes)
    corpus = load_corpus(config)
    model, loss_fn = build(config)
    params = init_params(model, jax.random.PRNGKey(config.seed))
    os.makedirs(run_dir, exist_ok=True)
    write_json(existing, {**dataclasses.asdict(config), "data": tdata.corpus_identity(config.data_dir, codes)})
    meta_steps = 0 if config.algo == SCRATCH else config.meta_steps
    data = jax.device_put(tdata.language_arrays([corpus.train(c) for c in config.meta_langs], config.max_len))
    _check_task_sizes(config, data["count"], config.meta_langs)
    val = validation_tasks(config, corpus)
    adam = optax.adam(config.inner_lr)
    finetuning = pretrain(loss_fn, optimizer=adam, has_aux=True, finetune_optimizer=adam)  # every method's

    def validate(p):
        result = evaluate(finetuning, p, val, steps=config.val_steps, loss_fn=loss_fn, has_aux=True, chunk_size=None)
        return {"loss_before": result.mean["loss"][0], "loss": result.mean["loss"][-1],
                "accuracy": result.mean["accuracy"][-1]}

    algo = registered(config.algo)
    meta_learner = learner(dataclasses.replace(config, algo=algo), loss_fn)
    sampler = tdata.language_task_sampler(config.meta_batch, config.support, config.query)
    if meta_steps == 0:
        state = init_train_state(meta_learner, params, jax.random.PRNGKey(config.seed + 1))
        mngr = ckpt.manager(run_dir, keep=1)
        ckpt.save(mngr, 0, state, config.identity())
        mngr.close()
        history = [{"step": 0, **{f"val/{k}": float(v) for k, v in validate(params).items()}}]
        write_jsonl(os.path.join(run_dir, "metrics.jsonl"), history)
        seconds = 0.0
    else:
        result = train(meta_learner, params, sampler, key=jax.random.PRNGKey(config.seed + 1),
                       meta_steps=meta_steps, data=data, log_every=config.log_every, validate=validate,
                       validate_every=config.val_every, out_dir=run_dir, checkpoint_every=config.val_every,
                       keep_checkpoints=10_000, resume=resume, identity=config.identity(), progress=progress,
                       desc=f"{config.algo} meta-train")
        history, seconds = result.history, result.seconds
    validated = [row for row in history if "val/loss" in row]
    metric = selection_metric(config.algo)
    best = best_validation(validated, config.algo) if validated else {"step": meta_steps}
    summary = {"algo": config.algo, "method": METHOD_NAMES[config.algo], "best_step": int(best["step"]),
               "selected_by": metric, "best_val_loss": best.get(metric), "meta_steps": meta_steps,
               "train_seconds": seconds,
               "validation": [{k: row[k] for k in row if k == "step" or k.startswith("val/")} for row in validated]}
    previous = _read_summary(run_dir)
    if previous and resume:  # a resumed run that had finished before: its time so far counts too
        summary["train_seconds"] += previous.get("train_seconds", 0.0)
    write_json(os.path.join(run_dir, SUMMARY_FILE), summary)
    return summary


def selection_metric(algo: str) -> str:
    """The validation metric that picks a run's checkpoint: each method's own objective.

    A meta-learner is chosen by the validation loss after ``val_steps`` Adam
    steps of adaptation at ``inner_lr`` (``val/loss``), what it was trained to
    make small.  MultiNMT (and scratch) is chosen by its unadapted validation
    loss (``val/loss_before``), the quantity pre-training minimises: the
    adapted loss at the meta-learners' inner rate judges a pre-trained model by
    a rate it is never fine-tuned with (on the H200 run those steps raised its
    loss from 1.17 to 1.61), and would pick its checkpoint by robustness to
    that rate rather than by quality.  Neither predicts fine-tuning well: two
    MultiNMT checkpoints with equal unadapted loss fine-tuned to 1.056 and
    1.003 on the validation languages (docs/translation.md, "On an H200: 15,000
    meta-steps"); ``evaluate --runs RUN@STEP`` compares stated checkpoints,
    and ``evaluate --checkpoint-selection finetuned`` chooses every method's
    by the fine-tuned validation loss (:func:`select_by_finetuning`).
    """
    return "val/loss" if spec(registered(algo)).inner_loop else "val/loss_before"


def best_validation(rows: Sequence[dict], algo: str) -> dict:
    """The validation row whose checkpoint ``algo`` is chosen by (the first of ties)."""
    metric = selection_metric(algo)
    return min(rows, key=lambda row: row[metric])


def _note_old_selection(run_dir: str, algo: str, summary: dict) -> None:
    """Says so when a run's checkpoint was chosen before :func:`selection_metric` existed and by another metric.

    Such a run (no ``selected_by`` in its summary) keeps the checkpoint it
    recorded; the note names the one the current rule would choose.
    """
    metric = selection_metric(algo)
    rows = summary.get("validation") or []
    if "selected_by" in summary or metric == "val/loss" or not rows:
        return
    best = best_validation(rows, algo)
    if int(best["step"]) != int(summary["best_step"]):
        print(f"note: {run_dir} uses its recorded checkpoint {summary['best_step']}, chosen by val/loss before "
              f"per-method selection; by {metric} it would be step {best['step']} ({best[metric]:.4f})",
              file=sys.stderr)


def _read_summary(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_task_sizes(config: TranslationConfig, counts, codes) -> None:
    need = config.support + config.query
    for code, count in zip(codes, np.asarray(counts)):
        if count < need:
            raise DataError(f"{code} has {count} training pairs of at most {config.max_len} bytes; "
                            f"a task needs support + query = {need}")


def split_run(run: str) -> tuple[str, int | None]:
    """``"RUN"`` or ``"RUN@STEP"`` (a run directory and, optionally, one of its checkpoints) as ``(dir, step)``."""
    head, sep, tail = run.rpartition("@")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return run, None


def run_key(run: str) -> str:
    """How a grid names an initialisation: the absolute run directory, with ``@STEP`` if one was given."""
    run_dir, step = split_run(run)
    return os.path.abspath(run_dir) + ("" if step is None else f"@{step}")


def checkpoint_of(run: str) -> int:
    """The step whose parameters ``RUN`` (its recorded checkpoint) or ``RUN@STEP`` stands for."""
    run_dir, step = split_run(run)
    return int(step if step is not None else (_read_summary(run_dir) or {})["best_step"])


def load_initialisation(run: str, *, note: bool = True):
    """``(config, params)``: the run's chosen (best-validation) parameters, or those of ``RUN@STEP``.

    ``note``: say so on stderr when the recorded checkpoint was chosen by an
    older rule (:func:`_note_old_selection`).
    """
    run_dir, step = split_run(run)
    config = read_config(run_dir)
    summary = _read_summary(run_dir)
    if summary is None:
        raise CheckpointError(f"{run_dir} has no {SUMMARY_FILE}: its training did not finish (resume it)")
    if step is None:
        if note:
            _note_old_selection(run_dir, config.algo, summary)
        step = summary["best_step"]
    else:
        steps = sorted(ckpt.manager(run_dir, create=False).all_steps())
        if step not in steps:
            raise CheckpointError(f"{run_dir} has no checkpoint at step {step} "
                                  f"(it has {', '.join(map(str, steps)) or 'none'})")
    model, loss_fn = build(config)
    params = init_params(model, jax.random.PRNGKey(0))
    algo = registered(config.algo)
    abstract = jax.eval_shape(lambda: init_train_state(learner(dataclasses.replace(config, algo=algo), loss_fn),
                                                       params, jax.random.PRNGKey(0)))
    _, state = ckpt.restore(run_dir, abstract, config.identity(), step=step)
    return config, state.meta.params


# --------------------------------------------------------------------------------------
# Fine-tuning on a held-out language, decoding, scoring.
# --------------------------------------------------------------------------------------


def training_subset(config: TranslationConfig, corpus: tdata.Corpus, code: str, size: int | None,
                    seed: int) -> list[tuple[str, str]]:
    """The first ``size`` of the language's usable training pairs in seed ``seed``'s order.

    Nested across sizes for one seed.  ``size=None`` takes them all.

    Raises:
      ConfigError: ``size`` exceeds what the language has.
    """
    usable = [p for p in corpus.train(code) if tdata.fits(p, config.max_len)]
    if size is not None and size > len(usable):
        raise ConfigError(f"{code} has {len(usable)} training pairs of at most {config.max_len} bytes; "
                          f"cannot fine-tune on {size}")
    order = np.random.default_rng([seed, 7]).permutation(len(usable))
    return [usable[i] for i in order[: len(usable) if size is None else size]]


def dev_subset(config: TranslationConfig, corpus: tdata.Corpus, code: str) -> list[tuple[str, str]]:
    """The language's development pairs that fit ``max_len`` (early stopping and rate choice)."""
    return [p for p in corpus.splits[code].dev if tdata.fits(p, config.max_len)]


class Finetuner:
    """Compiled fine-tuning, dev loss and decoding for one configuration (compiled once)."""

    def __init__(self, config: TranslationConfig, capacity: int):
        self.config = config
        self.capacity = capacity
        self.model, self.loss_fn = build(config)
        half = config.finetune_batch // 2
        # The learning rate lives in the optimiser state: one compiled program for every rate tried.
        adam = optax.inject_hyperparams(optax.adam)(learning_rate=config.finetune_lr)
        self.learner = pretrain(self.loss_fn, optimizer=adam, has_aux=True)
        self.sampler = tdata.language_task_sampler(1, half, config.finetune_batch - half)
        self.chunk = make_train_chunk(self.learner, self.sampler)
        self.dev_loss = jax.jit(lambda p, batch: self.loss_fn(p, batch)[0])
        self.decode = jax.jit(lambda p, src, n: greedy_decode(self.model, p, src, n), static_argnums=2)

    def finetune(self, params, pairs, dev_pairs, seed: int, lr: float | None = None):
        """``(params, info)``: Adam at ``lr`` (default ``finetune_lr``), early-stopped on the dev loss."""
        c = self.config
        lr = c.finetune_lr if lr is None else lr
        dev = tuple(jnp.asarray(a.astype(np.int32)) for a in tdata.pair_arrays(dev_pairs, c.max_len))
        best_loss = float(self.dev_loss(params, dev))
        info = {"dev_loss_before": best_loss, "steps": 0}
        if not pairs:
            return params, {**info, "dev_loss": best_loss}
        if len(pairs) < c.finetune_batch:
            raise ConfigError(f"fine-tuning needs at least finetune-batch = {c.finetune_batch} pairs, "
                              f"got {len(pairs)}")
        arrays = tdata.language_arrays([pairs], c.max_len)
        data = {"source": _pad_to(arrays["source"], self.capacity), "target": _pad_to(arrays["target"], self.capacity),
                "count": arrays["count"]}
        data = jax.device_put(data)
        state = init_train_state(self.learner, params, jax.random.PRNGKey(seed))
        opt_state = state.meta.opt_state
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": jnp.asarray(lr)})
        state = state._replace(meta=state.meta._replace(opt_state=opt_state))
        best, best_step, waited = params, 0, 0
        while int(state.step) < c.finetune_steps and waited < c.finetune_patience:
            n = min(c.finetune_eval_every, c.finetune_steps - int(state.step))
            state, _ = self.chunk(state, data, n)
            loss = float(self.dev_loss(state.meta.params, dev))
            if loss < best_loss:
                best, best_loss, best_step, waited = state.meta.params, loss, int(state.step), 0
            else:
                waited += 1
        return best, {**info, "dev_loss": best_loss, "steps": best_step, "steps_run": int(state.step),
                      "finetune_lr": lr}

    def choose_lr(self, params, corpus: tdata.Corpus) -> tuple[float, dict]:
        """The fine-tuning rate (of ``finetune_lrs``) with the lowest mean dev loss on the validation languages.

        Each validation language is fine-tuned on ``finetune_val_pairs`` of its
        training pairs; target languages play no part in the choice.
        """
        c = self.config
        data = [(training_subset(c, corpus, code, min(c.finetune_val_pairs, self.capacity), 0),
                 dev_subset(c, corpus, code)) for code in c.val_langs]
        losses = {lr: float(np.mean([self.finetune(params, pairs, dev, 0, lr)[1]["dev_loss"] for pairs, dev in data]))
                  for lr in c.finetune_lrs}
        return min(losses, key=losses.get), losses

    def translate(self, params, sources: Sequence[str], *, max_len: int, batch: int = 100) -> list[str]:
        """Greedy translations (sources truncated to ``max_len`` bytes), in fixed-size batches."""
        out = []
        for start in range(0, len(sources), batch):
            chunk = list(sources[start : start + batch])
            src = tokens.encode_batch(chunk + [""] * (batch - len(chunk)), max_len).astype(np.int32)
            src[len(chunk):, 0] = tokens.EOS  # padding rows: a non-empty dummy source
            ids = np.asarray(self.decode(params, jnp.asarray(src), max_len))
            out.extend(tokens.decode(row) for row in ids[: len(chunk)])
        return out


def _pad_to(array: np.ndarray, capacity: int) -> np.ndarray:
    if array.shape[1] > capacity:
        raise ValueError(f"{array.shape[1]} pairs exceed the fine-tuning capacity {capacity}")
    pad = [(0, 0)] * array.ndim
    pad[1] = (0, capacity - array.shape[1])
    return np.pad(array, pad)


def scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus-level sacreBLEU BLEU and chrF (default settings: 13a tokenisation, chrF β=2, n=6)."""
    try:
        import sacrebleu
    except ImportError as e:
        raise missing_extra(e, "translation", "BLEU and chrF scores") from None

    return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
            "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score}


def copy_baseline(config: TranslationConfig, corpus: tdata.Corpus, code: str) -> dict[str, float]:
    """The scores of copying the source sentence (the "chance" floor for chrF)."""
    test = corpus.splits[code].test
    return scores([p[0] for p in test], [p[1] for p in test])


# --------------------------------------------------------------------------------------
# The grid: initialisations × languages × data sizes × seeds.
# --------------------------------------------------------------------------------------


def feasible_sizes(config: TranslationConfig, corpus: tdata.Corpus, *, quiet: bool = False) -> dict[str, tuple[str, ...]]:
    """The requested data sizes each target language has enough pairs for.

    A size larger than one language's training pairs is skipped for that
    language (its ``all`` row covers it), with a note on stderr.

    Raises:
      ConfigError: a size that no target language has enough pairs for.
    """
    import sys

    available = {code: len(training_subset(config, corpus, code, None, 0)) for code in config.target_langs}
    out = {}
    for size in config.sizes:
        n = parse_size(size)
        if n is not None and all(n > a for a in available.values()):
            best = max(available, key=available.get)
            raise ConfigError(f"{best} has {available[best]} training pairs of at most {config.max_len} bytes "
                              f"(the most of {', '.join(config.target_langs)}); cannot fine-tune on {n}")
    for code, a in available.items():
        out[code] = tuple(size for size in config.sizes if parse_size(size) is None or parse_size(size) <= a)
        skipped = [size for size in config.sizes if size not in out[code]]
        if skipped and not quiet:
            print(f"note: {code} has {a} training pairs of at most {config.max_len} bytes: size(s) "
                  f"{', '.join(skipped)} skipped (its 'all' row uses {a})", file=sys.stderr)
    return out


def check_sizes(config: TranslationConfig) -> None:
    """Refuses (before any training) a data size that no target language has enough pairs for."""
    feasible_sizes(config, load_corpus(config, config.target_langs), quiet=True)


def candidate_steps(steps: Sequence[int], candidates: int, recorded: int | None = None) -> list[int]:
    """``candidates`` evenly spaced of a run's checkpoint ``steps``, back from the last (0: all), plus ``recorded``.

    Of 30 checkpoints every 1,000 steps, 6 candidates are steps 5,000, 10,000, ..., 30,000.
    """
    steps = sorted(steps)
    n = len(steps)
    if candidates and n > candidates:
        steps = sorted({steps[n - 1 - round(k * n / candidates)] for k in range(candidates)})
    if recorded is not None and recorded not in steps:
        steps = sorted([*steps, recorded])
    return steps


def select_by_finetuning(run_dir: str, tuner: Finetuner, corpus: tdata.Corpus, out_dir: str, *,
                         progress: bool = True) -> tuple[int, float, dict]:
    """Chooses a run's checkpoint and fine-tuning rate together by the fine-tuned validation loss.

    Every candidate checkpoint (:func:`candidate_steps`: ``selection_candidates``
    of the kept ones, and the one the run recorded) is fine-tuned on each
    validation language at each of ``finetune_lrs``, exactly as
    :meth:`Finetuner.choose_lr` does for one checkpoint; the (checkpoint, rate)
    with the lowest mean development loss wins.  This judges every method by
    what the grid then does with it, instead of by its own training objective
    (:func:`selection_metric`), which cannot tell apart checkpoints that
    fine-tune differently.  Costs ``candidates × rates × validation
    languages`` fine-tunings; each checkpoint's losses go to
    ``OUT/selection.json`` as soon as they are measured, so an interrupted
    selection resumes.

    Returns:
      ``(step, lr, losses)``: the chosen checkpoint, its rate, and the chosen
      checkpoint's mean validation loss for every rate.
    """
    from tqdm.auto import tqdm

    config = tuner.config
    summary = _read_summary(run_dir) or {}
    steps = candidate_steps(ckpt.manager(run_dir, create=False).all_steps(), config.selection_candidates,
                            summary.get("best_step"))
    path = os.path.join(out_dir, SELECTION_FILE)
    record = {}
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
    measured = record.setdefault(os.path.abspath(run_dir), {})
    lrs = [str(lr) for lr in config.finetune_lrs]
    todo = [s for s in steps if not all(lr in measured.get(str(s), {}) for lr in lrs)]
    for step in tqdm(todo, desc=f"select checkpoint ({os.path.basename(os.path.abspath(run_dir))})",
                     disable=not progress or not todo, dynamic_ncols=True):
        _, params = load_initialisation(f"{run_dir}@{step}")
        _, losses = tuner.choose_lr(params, corpus)
        measured[str(step)] = {**measured.get(str(step), {}), **{str(k): v for k, v in losses.items()}}
        write_json(path, record)
    _, step, lr = min((measured[str(s)][lr], s, float(lr)) for s in steps for lr in lrs)
    return step, lr, {k: measured[str(step)][str(k)] for k in config.finetune_lrs}


def grid_capacity(config: TranslationConfig, corpus: tdata.Corpus) -> int:
    """How many pairs a grid's fine-tuning holds: the validation languages' or the largest target's."""
    return max([config.finetune_val_pairs] +
               [len(training_subset(config, corpus, code, None, 0)) for code in config.target_langs])


def _rate_record(lr: float, losses: dict) -> dict:
    """``finetune_lrs.json``'s entry for one initialisation: its rate and every rate's validation loss."""
    return {"lr": lr, "val_dev_loss": {str(k): v for k, v in losses.items()}}


def evaluate_grid(run_dirs: Sequence[str], out_dir: str, *, langs: Sequence[str] | None = None,
                  sizes: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                  selection: str | None = None, candidates: int | None = None, progress: bool = True) -> list[dict]:
    """Fine-tunes every run's initialisation on every (language, size, seed) and scores it.

    Each run is evaluated at the checkpoint it recorded, or at ``RUN@STEP``;
    with ``selection="finetuned"`` (default: the first run's
    ``checkpoint_selection``) a plain ``RUN`` is evaluated at the checkpoint
    :func:`select_by_finetuning` chooses, keyed ``RUN@STEP`` where that is not
    the recorded one.  Results go to ``OUT/results.jsonl`` one row per cell as
    soon as it is done; cells already there are skipped, so an interrupted
    grid resumes.  Then ``OUT/results.md`` (table) and ``OUT/scores.png`` (the
    seed's figure).
    """
    from tqdm.auto import tqdm

    if not run_dirs:
        raise ConfigError("give at least one run to evaluate")
    selection = selection or read_config(split_run(run_dirs[0])[0]).checkpoint_selection
    inits = {}
    for run_dir in run_dirs:  # the recorded checkpoints: also checks that every run finished
        recorded = selection != "finetuned" or split_run(run_dir)[1] is not None
        inits[run_dir] = load_initialisation(run_dir, note=recorded)
    shared = {json.dumps({k: getattr(c, k) for k in SHARED_FIELDS}) for c, _ in inits.values()}
    if len(shared) > 1:
        raise ConfigError(f"the runs differ in one of {', '.join(SHARED_FIELDS)}; evaluate them separately")
    config = next(iter(inits.values()))[0]
    config = dataclasses.replace(config, target_langs=tuple(langs) if langs else config.target_langs,
                                 sizes=tuple(sizes) if sizes else config.sizes,
                                 seeds=tuple(seeds) if seeds is not None else config.seeds,
                                 checkpoint_selection=selection,
                                 selection_candidates=(config.selection_candidates if candidates is None
                                                       else candidates))
    config.validate()
    config = config.resolved()
    corpus = held_out_corpus(config)
    os.makedirs(out_dir, exist_ok=True)
    tuner = Finetuner(config, grid_capacity(config, corpus))
    rates_path = os.path.join(out_dir, "finetune_lrs.json")
    rates = {}
    if os.path.isfile(rates_path):
        with open(rates_path) as f:
            rates = json.load(f)
    chosen = []
    for run_dir in run_dirs:
        run = run_dir
        if config.checkpoint_selection == "finetuned" and split_run(run_dir)[1] is None:
            step, lr, losses = select_by_finetuning(run_dir, tuner, corpus, out_dir, progress=progress)
            if step != checkpoint_of(run_dir):
                run = f"{run_dir}@{step}"
                inits[run] = load_initialisation(run)
            else:
                inits[run] = inits[run_dir]
            if run_key(run) not in rates:  # the choice above measured this checkpoint at every rate
                rates[run_key(run)] = _rate_record(lr, losses)
            rates[run_key(run)]["selected_by"] = "finetuned"
            write_json(rates_path, rates)
            used = rates[run_key(run)]["lr"]  # measured before for this checkpoint: the same choice
            print(f"{run_dir}: checkpoint {step} and fine-tuning rate {used:g} chosen by the fine-tuned validation "
                  f"loss ({losses.get(used, min(losses.values())):.4f})", file=sys.stderr)
        chosen.append(run)
    run_dirs = chosen
    cells = []
    sizes = feasible_sizes(config, corpus)
    for code in config.target_langs:
        for size in sizes[code]:
            n = parse_size(size)
            for seed in (config.seeds[:1] if n == 0 else config.seeds):
                for run_dir in run_dirs:
                    cells.append((code, size, seed, run_dir))
    results_path = os.path.join(out_dir, RESULTS_FILE)
    rows = read_jsonl(results_path) if os.path.isfile(results_path) else []
    done = {(r["lang"], r["size"], r["seed"], r["run"]) for r in rows}
    todo = [cell for cell in cells if (cell[0], cell[1], cell[2], run_key(cell[3])) not in done]
    for run_dir in run_dirs:
        key = run_key(run_dir)
        if key not in rates:
            lr, losses = tuner.choose_lr(inits[run_dir][1], corpus)
            rates[key] = _rate_record(lr, losses)
            write_json(rates_path, rates)
    floors = {code: copy_baseline(config, corpus, code) for code in config.target_langs}
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="fine-tune grid", disable=not progress,
               dynamic_ncols=True)
    try:
        for code, size, seed, run_dir in todo:
            started = time.perf_counter()
            pairs = training_subset(config, corpus, code, parse_size(size), seed)
            dev = dev_subset(config, corpus, code)
            run_config, init = inits[run_dir]
            params, info = tuner.finetune(init, pairs, dev, seed, rates[run_key(run_dir)]["lr"])
            test = corpus.splits[code].test
            hyps = tuner.translate(params, [p[0] for p in test], max_len=config.eval_len)
            row = {"lang": code, "size": size, "pairs": len(pairs), "seed": seed, "run": run_key(run_dir),
                   "checkpoint": checkpoint_of(run_dir), "method": METHOD_NAMES[run_config.algo],
                   "algo": run_config.algo,
                   **{f"tatoeba_{k}": v for k, v in scores(hyps, [p[1] for p in test]).items()},
                   **{f"copy_{k}": v for k, v in floors[code].items()}, **info}
            flores = corpus.flores(code)
            if flores and config.flores_sentences:
                flores = flores[: config.flores_sentences]
                fh = tuner.translate(params, [p[0] for p in flores], max_len=config.flores_len)
                row.update({f"flores_{k}": v for k, v in scores(fh, [p[1] for p in flores]).items()})
            row["seconds"] = time.perf_counter() - started
            row["examples"] = [{"source": s, "reference": r, "output": h}
                               for (s, r), h in list(zip(test, hyps))[:3]]
            rows.append(row)
            write_jsonl(results_path, rows)
            bar.update(1)
            bar.set_postfix({"lang": code, "size": size, "chrF": f"{row['tatoeba_chrf']:.1f}"}, refresh=False)
    finally:
        bar.close()
    wanted = {(c[0], c[1], c[2], run_key(c[3])) for c in cells}
    rows = [r for r in rows if (r["lang"], r["size"], r["seed"], r["run"]) in wanted]
    write_report(rows, out_dir)
    return rows


def write_report(rows: Sequence[dict], out_dir: str) -> str:
    """``OUT/results.md`` (the table), ``OUT/scores.png`` (chrF) and ``OUT/dev_loss.png``; returns the table."""
    table = results_table(rows)
    atomic_write_text(os.path.join(out_dir, "results.md"), table + selection_table(out_dir))
    plot_scores(rows, os.path.join(out_dir, "scores.png"))
    plot_scores(rows, os.path.join(out_dir, "dev_loss.png"), metric="dev_loss")
    return table


def selection_table(out_dir: str) -> str:
    """Markdown: each run's candidate checkpoints by fine-tuned validation loss and rate (``selection.json``)."""
    path = os.path.join(out_dir, SELECTION_FILE)
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        record = json.load(f)
    title = ("### Checkpoint selection: mean development loss of the validation languages after fine-tuning, "
             "per checkpoint and rate (* = chosen)")
    lines = ["", title, ""]
    for run, measured in record.items():
        lrs = sorted({lr for losses in measured.values() for lr in losses}, key=float, reverse=True)
        best = min((v, step, lr) for step, losses in measured.items() for lr, v in losses.items())
        lines += [f"{run}:", "", "| checkpoint | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for step in sorted(measured, key=int):
            cells = [f"{measured[step][lr]:.4f}" + (" *" if (step, lr) == best[1:] else "") if lr in measured[step]
                     else "–" for lr in lrs]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def report(grid_dir: str) -> str:
    """The table and figure of the cells finished so far in ``grid_dir`` (no training)."""
    path = os.path.join(grid_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{grid_dir} holds no {RESULTS_FILE}: run `evaluate` first")
    return write_report(read_jsonl(path), grid_dir)


# Two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom: with a handful of
# seeds the normal approximation would make intervals several times too narrow.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seed_ci95(values: Sequence[float]) -> float:
    """Half-width of the Student-t 95% confidence interval of the mean over seeds (0 for one seed)."""
    values = np.asarray(values, np.float64)
    n = len(values)
    if n < 2:
        return 0.0
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return float(t * values.std(ddof=1) / np.sqrt(n))


def summarize(rows: Sequence[dict], metric: str = "tatoeba_chrf") -> dict:
    """``{(lang, size, method): (mean, ci95, n)}`` over seeds."""
    groups: dict = {}
    for r in rows:
        if metric in r:
            groups.setdefault((r["lang"], r["size"], r["method"]), []).append(r[metric])
    return {k: (float(np.mean(v)), seed_ci95(v), len(v)) for k, v in groups.items()}


def paired_gaps(rows: Sequence[dict], algo: str, baseline: str, metric: str = "tatoeba_chrf") -> dict:
    """``{(lang, size): (mean, ci95, n)}`` of ``algo − baseline`` over the seeds both have."""
    by = {(r["lang"], r["size"], r["seed"], r["algo"]): r[metric] for r in rows if metric in r}
    diffs: dict = {}
    for (lang, size, seed, a), value in by.items():
        if a == algo and (lang, size, seed, baseline) in by:
            diffs.setdefault((lang, size), []).append(value - by[(lang, size, seed, baseline)])
    return {k: (float(np.mean(v)), seed_ci95(v), len(v)) for k, v in diffs.items()}


def _size_key(size: str) -> float:
    return math.inf if size == ALL else int(size)


def results_table(rows: Sequence[dict]) -> str:
    """A Markdown table: language × data size × method, chrF and BLEU (mean ± 95% CI over seeds)."""
    if not rows:
        return "(no results)\n"
    methods = sorted({r["method"] for r in rows})
    lines = []
    for metric, title in (("tatoeba_chrf", "Tatoeba test chrF"), ("tatoeba_bleu", "Tatoeba test BLEU"),
                          ("flores_chrf", "FLORES devtest chrF"), ("flores_bleu", "FLORES devtest BLEU"),
                          ("dev_loss", "Development loss after fine-tuning, nats per byte (lower is better)")):
        digits = 3 if metric == "dev_loss" else 1
        stats = summarize(rows, metric)
        if not stats:
            continue
        lines += [f"### {title} (mean ± Student-t 95% CI over seeds; n = seeds)", "",
                  "| lang | pairs | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        keys = sorted({(k[0], k[1]) for k in stats}, key=lambda k: (k[0], _size_key(k[1])))
        for lang, size in keys:
            pairs = next(r["pairs"] for r in rows if r["lang"] == lang and r["size"] == size)
            cells = []
            for m in methods:
                if (lang, size, m) in stats:
                    mean, ci, n = stats[(lang, size, m)]
                    cells.append(f"{mean:.{digits}f} ± {ci:.{digits}f} (n={n})" if n > 1 else f"{mean:.{digits}f}")
                else:
                    cells.append("–")
            label = f"{size} ({pairs})" if size == ALL else size
            lines.append(f"| {lang} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    for metric, name, digits in (("tatoeba_chrf", "Tatoeba chrF", 1),
                                 ("dev_loss", "development loss (negative: lower than MultiNMT's)", 3)):
        for algo in ("fomaml", "reptile", "maml"):
            gaps = paired_gaps(rows, algo, "pretrain", metric)
            if not gaps:
                continue
            title = (f"### {METHOD_NAMES[algo]} − MultiNMT, {name} (paired by seed: same pairs, same "
                     "fine-tuning; mean ± Student-t 95% CI; * = CI excludes 0)")
            lines += [title, "", "| lang | pairs | gap |", "|---|---|---|"]
            for (lang, size), (mean, ci, n) in sorted(gaps.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][1]))):
                star = " *" if n > 1 and abs(mean) > ci else ""
                lines.append(f"| {lang} | {size} | {mean:+.{digits}f} ± {ci:.{digits}f} (n={n}){star} |")
            lines.append("")
    copies = {r["lang"]: r.get("copy_chrf") for r in rows}
    lines.append("Copying the source: chrF " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(copies.items())))
    return "\n".join(lines) + "\n"


@figure
def plot_scores(rows: Sequence[dict], path: str, metric: str = "tatoeba_chrf") -> None:
    """The seed's figure: score against training-set size, one panel per held-out language."""
    plt = pyplot()

    stats = summarize(rows, metric)
    langs = sorted({k[0] for k in stats})
    methods = sorted({k[2] for k in stats})
    if not langs:
        return
    fig, axes = plt.subplots(1, len(langs), figsize=(3.4 * len(langs), 3.2), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for method in methods:
            pts = sorted(((next(r["pairs"] for r in rows if r["lang"] == lang and r["size"] == k[1]), *v[:2])
                          for k, v in stats.items() if k[0] == lang and k[2] == method))
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar([max(v, 10) for v in x], y, yerr=e, marker="o", ms=3, capsize=2, label=method)
        copy = next((r["copy_chrf"] for r in rows if r["lang"] == lang), None)
        if copy is not None and metric == "tatoeba_chrf":
            ax.axhline(copy, color="grey", ls=":", lw=1, label="copy source")
        ax.set_xscale("log")
        ax.set_title(lang)
        ax.set_xlabel("training pairs (0 plotted at 10)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("development loss (nats per byte)" if metric == "dev_loss" else metric.replace("_", " "))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# One fine-tuning, kept for `translate`.
# --------------------------------------------------------------------------------------


def _whole_run(run: str) -> None:
    if split_run(run)[1] is not None:
        raise ConfigError(f"{run}: RUN@STEP picks a checkpoint for evaluate; finetune and translate take a run "
                          "directory (its chosen checkpoint)")


def finetuned_dir(run_dir: str, lang: str, size: str, seed: int) -> str:
    return os.path.join(run_dir, "finetuned", f"{lang}-{size}-s{seed}")


def finetune_one(run_dir: str, lang: str, size: str, *, seed: int = 0, lr: float | None = None) -> dict:
    """Fine-tunes the run's initialisation on ``size`` pairs of ``lang``, keeps it, scores it.

    The rate is ``lr``, or (default) the one the validation languages choose
    (:meth:`Finetuner.choose_lr`), as in the grid.

    The fine-tuned parameters go to ``RUN/finetuned/<lang>-<size>-s<seed>/``
    (an Orbax checkpoint), where ``translate`` finds them.
    """
    _whole_run(run_dir)
    config, init = load_initialisation(run_dir)
    config = dataclasses.replace(config, target_langs=(lang,))
    config = config.resolved()
    n = parse_size(size)
    warn_if_data_differs(run_dir, config, config.val_langs + (lang,))
    corpus = held_out_corpus(config)
    pairs = training_subset(config, corpus, lang, n, seed)
    dev = dev_subset(config, corpus, lang)
    tuner = Finetuner(config, max(len(pairs), config.finetune_val_pairs))
    if lr is None:
        lr, _ = tuner.choose_lr(init, corpus)
    params, info = tuner.finetune(init, pairs, dev, seed, lr)
    test = corpus.splits[lang].test
    hyps = tuner.translate(params, [p[0] for p in test], max_len=config.eval_len)
    out = finetuned_dir(run_dir, lang, size, seed)
    identity = {**config.identity(), "finetuned": f"{lang}-{size}-s{seed}"}
    if ckpt.latest_step(out) is not None:
        import shutil

        shutil.rmtree(out)  # a re-run replaces the previous fine-tuning of this cell
    mngr = ckpt.manager(out, keep=1)
    ckpt.save(mngr, info["steps"], params, identity)
    mngr.close()
    result = {"lang": lang, "size": size, "pairs": len(pairs), "seed": seed, **info,
              **{f"tatoeba_{k}": v for k, v in scores(hyps, [p[1] for p in test]).items()},
              **{f"copy_{k}": v for k, v in copy_baseline(config, corpus, lang).items()}}
    write_json(os.path.join(out, "scores.json"), result)
    return result


def translate(run_dir: str, lang: str, texts: Sequence[str]) -> list[str]:
    """Translates ``texts`` (in ``lang``) to English.

    Uses the run's largest fine-tuning on ``lang`` (seed 0 first) when there
    is one, else the initialisation itself (zero-shot).
    """
    _whole_run(run_dir)
    config, params = load_initialisation(run_dir)
    tdata.check_languages(config.data_dir or tdata.default_data_dir(), [lang])
    warn_if_data_differs(run_dir, config, (lang,))
    folder = os.path.join(run_dir, "finetuned")
    candidates = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            code, size, seed = name.rsplit("-", 2)
            if code == lang and ckpt.latest_step(os.path.join(folder, name)) is not None:
                candidates.append((_size_key(size), -int(seed[1:]), name))
    if candidates:
        name = max(candidates)[2]
        path = os.path.join(folder, name)
        identity = {**config.identity(), "finetuned": name}
        _, params = ckpt.restore(path, jax.eval_shape(lambda: params), identity)
    if not any(t.strip() for t in texts):
        raise ConfigError("nothing to translate: give a non-empty sentence")
    tuner = Finetuner(config, 1)
    return tuner.translate(params, list(texts), max_len=config.eval_len, batch=max(1, len(texts)))
