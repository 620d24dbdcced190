"""The ``train | evaluate | episode`` command line shared by the image experiments."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

from experiments.fewshot import pipeline as fewshot
from experiments.fewshot.records import PaperResults, make_record, read_records, results_table, write_record
from jaxmeta.cli import (
    ArgumentParser,
    nonnegative_int,
    positive_int,
    writable_dir,
)
from jaxmeta.distributed import initialize as initialize_distributed
from jaxmeta.errors import ConfigError
from jaxmeta.io import atomic_write_text

PresetFn = Callable[[str, int, int, str], dict]
"""``preset(name, ways, shots, algo) -> field overrides`` of :class:`~experiments.fewshot.pipeline.FewShotConfig`."""

OVERRIDES = tuple(f.name for f in dataclasses.fields(fewshot.FewShotConfig) if f.name != "dataset")
"""The FewShotConfig fields a train flag may set over the preset."""


def build_parser(dataset: str, presets: Sequence[str], data_env: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m experiments.{dataset}",
                            description=f"{dataset}: N-way K-shot meta-learning (MAML, first-order MAML, Reptile, "
                                        "pre-training)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    t = commands.add_parser("train", help="meta-train, validate, checkpoint, then evaluate on the test tasks")
    t.add_argument("--preset", choices=presets, default="cpu")
    fewshot.FewShotConfig.add_flags(t, helps={"data_dir": f"directory of the original data (else ${data_env})"})
    t.add_argument("--resume", action="store_true", help="continue the run in --out up to --meta-steps")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--no-progress", action="store_true")

    e = commands.add_parser("evaluate", help="evaluate a run on the fixed test tasks (after an interruption, "
                                             "the same command goes on from the tasks already scored)")
    e.add_argument("--run", required=True)
    e.add_argument("--tasks", type=positive_int, help="fixed test tasks (default: the run's --test-tasks, 600)")
    e.add_argument("--inner-steps", type=nonnegative_int)
    e.add_argument("--eval-queries", type=positive_int, help="query examples per class (default: as in training)")
    e.add_argument("--eval-mode", choices=fewshot.EVAL_MODES,
                   help="transductive (the whole query set in one batch; default: the run's) or non-transductive "
                        "(each query example with the support set alone); writes eval.json or "
                        "eval-non-transductive.json")
    e.add_argument("--ensemble", type=positive_int, metavar="K",
                   help="score the mean prediction of the K checkpoints with the best validation accuracy "
                        "(trained with --keep-best K); writes eval[-non-transductive]-ensembleK.json")
    e.add_argument("--shots", type=positive_int, metavar="K",
                   help="test on K-shot tasks instead of the run's (a run trained with --train-shots: Reptile's "
                        "protocol trains its 1-shot and 5-shot models alike); writes eval[...]-Kshot.json")
    e.add_argument("--results", metavar="DIR",
                   help="folder for the result record (default: the run directory; results/omniglot/ is "
                        "the committed one)")
    e.add_argument("--note", help="one line on the result, kept in its record and shown under the table")
    e.add_argument("--data-dir")
    e.add_argument("--cache-dir")
    e.add_argument("--no-progress", action="store_true")

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
    explicit = {k: v for k, v in fewshot.FewShotConfig.flag_values(args).items() if k in OVERRIDES}
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
    ``"custom"`` when none has. Where several have it (at 5-way 1-shot, ``paper`` and ``cpu`` differ in
    their budgets alone), the one whose meta-steps the run trained toward."""
    base = dict(dataset=config.dataset, algo=config.algo, ways=config.ways, shots=config.shots)
    matches = []
    for order, name in enumerate(presets):
        fields = preset(name, config.ways, config.shots, config.algo)
        candidate = fewshot.algo_defaults(fewshot.FewShotConfig(**{**base, **fields}), set())
        if candidate.identity() == config.identity():
            matches.append((fields.get("meta_steps") != config.meta_steps, order, name))
    return min(matches)[2] if matches else "custom"


def evaluation_record(run_dir: str, evaluation: dict, preset: PresetFn, presets: Sequence[str],
                      paper_results: PaperResults | None, note: str | None) -> dict:
    """The result record of ``evaluation`` of the run in ``run_dir``."""
    config = dataclasses.replace(fewshot.read_config(run_dir), shots=evaluation["shots"])
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
                                      ensemble=args.ensemble or 0, shots=args.shots,
                                      progress=not args.no_progress)
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
