"""The ``train | evaluate | episode`` command line shared by the image experiments."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

from experiments.fewshot import pipeline as fewshot
from experiments.fewshot.records import PaperResults, make_record, read_records, results_table, write_record
from jaxmeta.algorithms.registry import ALGORITHMS
from jaxmeta.cli import (
    ArgumentParser,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    writable_dir,
)
from jaxmeta.distributed import initialize as initialize_distributed
from jaxmeta.errors import ConfigError
from jaxmeta.io import atomic_write_text
from jaxmeta.models.conv4 import CONV_IMPLS

PresetFn = Callable[[str, int, int, str], dict]
"""``preset(name, ways, shots, algo) -> field overrides`` of :class:`~experiments.fewshot.pipeline.FewShotConfig`."""

# CLI flag → FewShotConfig field, for the flags that override a preset.
OVERRIDES = ("meta_steps", "meta_batch", "queries", "inner_steps", "inner_lr", "test_inner_steps", "outer_lr",
             "seed", "split", "data_dir", "cache_dir", "conv_impl", "chunk_size", "log_every", "val_every",
             "checkpoint_every", "max_bad_steps", "val_tasks", "test_tasks", "eval_queries", "eval_mode", "remat",
             "devices", "imaml_lam", "imaml_cg_steps", "imaml_cg_damping", "per_step_bn", "train_shots",
             "inner_optimizer", "inner_beta1", "inner_batch", "test_inner_batch", "persistent_inner_state",
             "keep_best")


def build_parser(dataset: str, presets: Sequence[str], data_env: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m experiments.{dataset}",
                            description=f"{dataset}: N-way K-shot meta-learning (MAML, first-order MAML, Reptile, "
                                        "pre-training)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    t = commands.add_parser("train", help="meta-train, validate, checkpoint, then evaluate on the test tasks")
    t.add_argument("--ways", type=positive_int, help="N classes per task (default 5)")
    t.add_argument("--shots", type=positive_int, help="K support examples per class (default 1)")
    t.add_argument("--algo", choices=ALGORITHMS, help="default maml")
    t.add_argument("--preset", choices=presets, default="cpu")
    t.add_argument("--meta-steps", type=positive_int, help="meta-iterations in total (also when resuming)")
    t.add_argument("--meta-batch", type=positive_int, help="tasks per meta-step")
    t.add_argument("--queries", type=positive_int, help="query examples per class in training")
    t.add_argument("--inner-steps", type=positive_int, help="inner SGD steps in training")
    t.add_argument("--inner-lr", type=positive_float, help="inner learning rate (mean-reduced loss)")
    t.add_argument("--test-inner-steps", type=nonnegative_int, help="inner steps at validation/test time")
    t.add_argument("--outer-lr", type=positive_float, help="outer (Adam) learning rate")
    t.add_argument("--imaml-lam", type=positive_float, help="iMAML's proximal strength lambda (default 1)")
    t.add_argument("--imaml-cg-steps", type=positive_int, help="iMAML's conjugate-gradient steps (default 5)")
    t.add_argument("--imaml-cg-damping", type=nonnegative_float,
                   help="iMAML: solve (I + H/(lambda + D)) g = grad instead of the exact D = 0 (default 0)")
    t.add_argument("--per-step-bn", action="store_true", default=None,
                   help="MAML++: per-step batch-norm weights and biases (BNWB)")
    t.add_argument("--train-shots", type=positive_int,
                   help="support examples per class in training tasks (default: --shots; Reptile's paper: 10)")
    t.add_argument("--inner-optimizer", choices=fewshot.INNER_OPTIMIZERS, help="Reptile: inner sgd (default) or adam")
    t.add_argument("--inner-beta1", type=nonnegative_float, help="the inner Adam's beta1 (default 0.9; Reptile's 0)")
    t.add_argument("--inner-batch", type=positive_int, help="Reptile: support examples per inner step (default all)")
    t.add_argument("--test-inner-batch", type=positive_int,
                   help="Reptile: support examples per inner step at validation/test time (default all)")
    t.add_argument("--persistent-inner-state", action="store_true", default=None,
                   help="Reptile: carry the inner Adam state from task to task (the reference code)")
    t.add_argument("--seed", type=int)
    t.add_argument("--split", choices=("maml", "lake"))
    t.add_argument("--data-dir", help=f"directory of the original data (else ${data_env})")
    t.add_argument("--cache-dir", help="preprocessed-data cache (else $JAXMETA_CACHE_DIR or ~/.cache/jaxmeta)")
    t.add_argument("--conv-impl", choices=CONV_IMPLS, help="convolution: auto (patches on CPU), patches, native")
    t.add_argument("--chunk-size", type=positive_int, help="tasks per chunk (default: vmap all tasks)")
    t.add_argument("--remat", action="store_true", default=None, help="rematerialise inner steps (saves memory)")
    t.add_argument("--log-every", type=positive_int, help="meta-steps per logged line (and per dispatch)")
    t.add_argument("--val-every", type=positive_int)
    t.add_argument("--val-tasks", type=positive_int, help="fixed validation tasks")
    t.add_argument("--eval-queries", type=positive_int,
                   help="query examples per class in validation/test tasks (default: as in training)")
    t.add_argument("--eval-mode", choices=fewshot.EVAL_MODES,
                   help="score validation/test query sets in one batch (transductive, the default: MAML's) or "
                        "each query example with the support set alone (non-transductive: Reptile's)")
    t.add_argument("--test-tasks", type=positive_int, help="fixed test tasks of the final evaluation (600)")
    t.add_argument("--checkpoint-every", type=positive_int)
    t.add_argument("--keep-best", type=nonnegative_int,
                   help="also keep the K checkpoints with the best validation accuracy (for evaluate --ensemble K)")
    t.add_argument("--max-bad-steps", type=positive_int,
                   help="stop after this many consecutive non-finite meta-steps")
    t.add_argument("--devices", type=positive_int,
                   help="devices to shard the task batch over (default: all local devices)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out up to --meta-steps")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--no-progress", action="store_true")

    e = commands.add_parser("evaluate", help="evaluate a run on the fixed test tasks")
    e.add_argument("--run", required=True)
    e.add_argument("--tasks", type=positive_int, default=600)
    e.add_argument("--inner-steps", type=nonnegative_int)
    e.add_argument("--eval-queries", type=positive_int, help="query examples per class (default: as in training)")
    e.add_argument("--eval-mode", choices=fewshot.EVAL_MODES,
                   help="transductive (the whole query set in one batch; default: the run's) or non-transductive "
                        "(each query example with the support set alone); writes eval.json or "
                        "eval-non-transductive.json")
    e.add_argument("--ensemble", type=positive_int, metavar="K",
                   help="score the mean prediction of the K checkpoints with the best validation accuracy "
                        "(trained with --keep-best K); writes eval[-non-transductive]-ensembleK.json")
    e.add_argument("--results", metavar="DIR",
                   help="folder for the result record (default: the run directory; results/omniglot/ is "
                        "the committed one)")
    e.add_argument("--note", help="one line on the result, kept in its record and shown under the table")
    e.add_argument("--data-dir")
    e.add_argument("--cache-dir")

    p = commands.add_parser("episode", help="adapt a run to your own episode of image folders")
    p.add_argument("--run", required=True)
    p.add_argument("--support", required=True, help="SDIR/<class>/*.png: labelled support images")
    p.add_argument("--query", required=True, help="QDIR/<class>/*.png: query images (folder names only score)")
    p.add_argument("--inner-steps", type=nonnegative_int)

    c = commands.add_parser("compare", help="one learning-curve figure for several runs (e.g. the four algorithms)")
    c.add_argument("--runs", nargs="+", required=True, help="run directories")
    c.add_argument("--out", required=True, help="PNG file to write")

    r = commands.add_parser("table", help="the results table (Markdown) generated from result records")
    r.add_argument("--results", required=True, metavar="DIR", help="folder of result records (evaluate --results)")
    r.add_argument("--out", help="Markdown file to write (default: print only)")
    return parser


def config_from_args(dataset: str, preset: PresetFn, args) -> fewshot.FewShotConfig:
    """The preset for (ways, shots), overridden by the flags given explicitly."""
    explicit = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    ways, shots = args.ways or 5, args.shots or 1
    base = dict(dataset=dataset, algo=args.algo or "maml", ways=ways, shots=shots)
    fields = {**base, **preset(args.preset, ways, shots, base["algo"]), **explicit}
    try:
        config = fewshot.FewShotConfig(**fields)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return fewshot.algo_defaults(config, set(explicit))


def preset_of(config: fewshot.FewShotConfig, preset: PresetFn, presets: Sequence[str]) -> str:
    """The name of the preset whose run identity ``config`` has (its budget and evaluation may differ);
    ``"custom"`` when none has."""
    base = dict(dataset=config.dataset, algo=config.algo, ways=config.ways, shots=config.shots)
    for name in presets:
        candidate = fewshot.algo_defaults(fewshot.FewShotConfig(**{**base, **preset(name, config.ways, config.shots,
                                                                                      config.algo)}), set())
        if candidate.identity() == config.identity():
            return name
    return "custom"


def evaluation_record(run_dir: str, evaluation: dict, preset: PresetFn, presets: Sequence[str],
                      paper_results: PaperResults | None, note: str | None) -> dict:
    """The result record of ``evaluation`` of the run in ``run_dir``."""
    config = fewshot.read_config(run_dir)
    paper = (paper_results or {}).get((config.algo, config.ways, config.shots), {})
    return make_record(config, evaluation, fewshot.read_training(run_dir), preset=preset_of(config, preset, presets),
                       data=fewshot.read_data_identity(run_dir), paper_meta_steps=paper.get("meta_steps"), note=note)


def resumed_config(run_dir: str, args) -> fewshot.FewShotConfig:
    """A resumed run keeps its stored configuration; only the budget and bookkeeping may change."""
    config = fewshot.read_config(run_dir)
    changeable = ("meta_steps", "log_every", "val_every", "checkpoint_every", "max_bad_steps", "data_dir",
                  "cache_dir", "chunk_size", "test_tasks", "val_tasks", "test_inner_steps", "eval_queries",
                  "eval_mode", "test_inner_batch", "devices", "keep_best")
    updates = {k: getattr(args, k) for k in changeable if getattr(args, k, None) is not None}
    fixed = [k for k in OVERRIDES if k not in changeable and getattr(args, k, None) is not None
             and getattr(args, k) != getattr(config, k)]
    if fixed:
        raise ConfigError(f"--resume continues {run_dir} as configured; cannot change "
                          f"{', '.join('--' + k.replace('_', '-') for k in fixed)}")
    for name in ("ways", "shots", "algo"):
        if getattr(args, name) is not None and getattr(args, name) != getattr(config, name):
            raise ConfigError(f"--resume: {run_dir} is a {config.ways}-way {config.shots}-shot {config.algo} run")
    return dataclasses.replace(config, **updates)


def main(dataset: str, preset: PresetFn, presets: Sequence[str], data_env: str,
         argv: Sequence[str] | None = None, paper_results: PaperResults | None = None) -> dict:
    """Parses ``argv`` and runs one command; returns its result.

    ``paper_results``: the papers' budgets and figures, the ``table`` command's last column.
    """
    parser = build_parser(dataset, presets, data_env)
    args = parser.parse_args(argv)
    initialize_distributed()
    if args.command == "train":
        out = writable_dir(args.out)
        config = resumed_config(out, args) if args.resume else config_from_args(dataset, preset, args)
        config.validate()
        result = fewshot.train_and_evaluate(config, out, resume=args.resume, progress=not args.no_progress)
        write_record(evaluation_record(out, result, preset, presets, paper_results, None), out)
        print(json.dumps({k: result[k] for k in ("accuracy", "ci95", "tasks", "inner_steps")}))
        print(f"run written to {os.path.abspath(out)} ({fewshot.eval_file(config.eval_mode)}, its result record, "
              "metrics.jsonl, curve.png, checkpoints/)")
        return result
    if args.command == "evaluate":
        result = fewshot.evaluate_run(args.run, tasks=args.tasks, inner_steps=args.inner_steps,
                                      eval_queries=args.eval_queries, data_dir=args.data_dir,
                                      cache_dir=args.cache_dir, eval_mode=args.eval_mode,
                                      ensemble=args.ensemble or 0)
        record = evaluation_record(args.run, result, preset, presets, paper_results, args.note)
        print(f"result record written to {write_record(record, args.results or args.run)}")
        print(json.dumps({k: result[k] for k in ("accuracy", "ci95", "tasks", "inner_steps", "eval_mode", "ensemble")
                          if k in result}))
        return result
    if args.command == "table":
        table = results_table(read_records(args.results), paper_results)
        if args.out:
            atomic_write_text(args.out, table)
        print(table, end="")
        return {"table": table}
    if args.command == "compare":
        fewshot.plot_comparison(args.runs, args.out)
        print(f"wrote {args.out}")
        return {"figure": args.out}
    result = fewshot.episode(args.run, args.support, args.query, inner_steps=args.inner_steps)
    print(json.dumps(result, indent=1))
    return result
