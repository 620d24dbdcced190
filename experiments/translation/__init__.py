"""MAML for low-resource translation (MetaNMT vs MultiNMT vs scratch) on Tatoeba text.

    python -m experiments.translation all --preset cpu --out runs/translation
    python -m experiments.translation meta-train --algo fomaml --preset cpu --out runs/translation/fomaml
    python -m experiments.translation pretrain --preset cpu --out runs/translation/pretrain
    python -m experiments.translation evaluate --runs runs/translation/fomaml,runs/translation/pretrain \\
        --out runs/translation/grid [--langs ron,lav] [--sizes 0,100,400] [--seeds 0,1,2] \\
        [--checkpoint-selection finetuned [--selection-candidates 6]]
    python -m experiments.translation finetune --run runs/translation/fomaml --lang ron --size 400 [--lr 1e-4]
    python -m experiments.translation report --grid runs/translation/grid
    python -m experiments.translation translate --run runs/translation/fomaml --lang ron "Bună dimineața!"

Presets: ``quick`` (minutes, CI), ``cpu`` (about two hours on a 2-core CPU), ``gpu`` (the ``cpu``
preset with ten times the meta-steps, about 5.5 minutes of meta-training on one H200, and fine-tuning
for up to 2,000 steps instead of 300, and each run's checkpoint chosen by the fine-tuned validation loss).

Data: ``--data-dir`` or ``JAXMETA_TRANSLATION_DIR`` (default ``../shared/data/translation``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from experiments.translation import pipeline as tr
from jaxmeta.cli import (
    ArgumentParser,
    choice_list,
    nonnegative_int,
    positive_float,
    writable_dir,
)
from jaxmeta.errors import ConfigError

def _codes(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _size(text: str) -> str:
    try:
        tr.parse_size(text.strip())
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _sizes(text: str) -> tuple[str, ...]:
    return tuple(_size(s) for s in _codes(text))


def _config_args(p: ArgumentParser, *, algo: bool) -> None:
    p.add_argument("--preset", default="cpu", choices=sorted(tr.PRESETS))
    if algo:
        p.add_argument("--algo", default="fomaml", type=choice_list(tr.META_ALGORITHMS))
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--meta-langs", type=_codes, help="comma-separated Tatoeba codes (default: the manifest's)")
    p.add_argument("--langs", type=_codes, help="held-out target languages (default: the manifest's 5)")
    p.add_argument("--sizes", type=_sizes, help="fine-tuning data sizes, e.g. 0,100,400,1600,all")
    p.add_argument("--seeds", type=lambda t: tuple(nonnegative_int(s) for s in _codes(t)))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    _selection_args(p)
    tr.TranslationConfig.add_flags(p)


def _selection_args(p: ArgumentParser) -> None:
    p.add_argument("--checkpoint-selection", choices=tr.CHECKPOINT_SELECTIONS,
                   help="which checkpoint of each run the grid evaluates: 'validation', the one the run "
                        "recorded by its own objective, or 'finetuned', checkpoint and rate chosen together "
                        "by the validation languages' loss after fine-tuning (default: the preset's)")
    p.add_argument("--selection-candidates", type=nonnegative_int,
                   help="with --checkpoint-selection finetuned: evenly spaced checkpoints tried per run, "
                        "plus the recorded one (0: all kept)")


def _config(args, algo: str) -> tr.TranslationConfig:
    overrides = tr.TranslationConfig.flag_values(args)
    for field, arg in (("meta_langs", "meta_langs"), ("target_langs", "langs"), ("sizes", "sizes"),
                       ("seeds", "seeds"), ("data_dir", "data_dir"), ("checkpoint_selection", "checkpoint_selection"),
                       ("selection_candidates", "selection_candidates")):
        if getattr(args, arg) is not None and getattr(args, arg) != ():
            overrides[field] = getattr(args, arg)
    config = tr.preset(args.preset, algo=algo, **overrides)
    config.validate()
    return config.resolved()


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m experiments.translation", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("meta-train", help="MetaNMT: meta-train an initialisation"), algo=True)
    _config_args(sub.add_parser("pretrain", help="MultiNMT: pre-train on the union of languages"), algo=False)
    _config_args(sub.add_parser("all", help="meta-train, pre-train, scratch, then the fine-tuning grid"), algo=True)
    e = sub.add_parser("evaluate", help="fine-tune every run on each held-out language, size and seed; score")
    e.add_argument("--runs", required=True, type=_codes,
                   help="comma-separated run directories, each at its chosen checkpoint or as RUN@STEP")
    e.add_argument("--out", required=True)
    e.add_argument("--langs", type=_codes)
    e.add_argument("--sizes", type=_sizes)
    e.add_argument("--seeds", type=lambda t: tuple(nonnegative_int(s) for s in _codes(t)))
    e.add_argument("--no-progress", action="store_true")
    _selection_args(e)
    f = sub.add_parser("finetune", help="fine-tune one run on one language and keep the model")
    f.add_argument("--run", required=True)
    f.add_argument("--lang", required=True)
    f.add_argument("--size", required=True, type=_size)
    f.add_argument("--seed", type=nonnegative_int, default=0)
    f.add_argument("--lr", type=positive_float, help="fine-tuning rate (default: chosen on the validation languages)")
    r = sub.add_parser("report", help="table and figure of a grid's finished cells (no training)")
    r.add_argument("--grid", required=True)
    t = sub.add_parser("translate", help="translate sentences to English")
    t.add_argument("--run", required=True)
    t.add_argument("--lang", required=True)
    t.add_argument("text", nargs="+")
    return p


def _check_run(path: str) -> str:
    run_dir, _ = tr.split_run(path)
    if not os.path.isfile(os.path.join(run_dir, tr.CONFIG_FILE)):
        raise ConfigError(f"{run_dir} is not a translation run (no {tr.CONFIG_FILE})")
    return path


def main(argv: Sequence[str] | None = None):
    args = parser().parse_args(argv)
    progress = not getattr(args, "no_progress", False)
    if args.command in ("meta-train", "pretrain"):
        algo = "pretrain" if args.command == "pretrain" else args.algo
        if isinstance(algo, tuple):
            if len(algo) != 1:
                raise ConfigError("meta-train takes one --algo")
            algo = algo[0]
        config = _config(args, algo)
        summary = tr.meta_train(config, writable_dir(args.out), resume=args.resume, progress=progress)
        print(f"{summary['method']}: best {summary['selected_by']} {summary['best_val_loss']:.4f} at step "
              f"{summary['best_step']} ({summary['train_seconds']:.0f} s); run in {args.out}")
        return summary
    if args.command == "all":
        algos = tuple(dict.fromkeys(args.algo + ("pretrain", "scratch")))
        base = _config(args, algos[0])
        tr.check_sizes(base)
        writable_dir(args.out)
        runs = []
        for algo in algos:
            run_dir = os.path.join(args.out, algo)
            config = dataclasses.replace(base, algo=algo)
            done = os.path.isfile(os.path.join(run_dir, tr.SUMMARY_FILE))
            if not done:
                tr.meta_train(config, run_dir, resume=os.path.isdir(run_dir), progress=progress)
            runs.append(run_dir)
        rows = tr.evaluate_grid(runs, os.path.join(args.out, "grid"), langs=base.target_langs, sizes=base.sizes,
                                seeds=base.seeds, selection=base.checkpoint_selection,
                                candidates=base.selection_candidates, progress=progress)
        print(tr.results_table(rows))
        return rows
    if args.command == "evaluate":
        runs = [_check_run(r) for r in args.runs]
        rows = tr.evaluate_grid(runs, writable_dir(args.out), langs=args.langs, sizes=args.sizes, seeds=args.seeds,
                                selection=args.checkpoint_selection, candidates=args.selection_candidates,
                                progress=not args.no_progress)
        print(tr.results_table(rows))
        return rows
    if args.command == "finetune":
        result = tr.finetune_one(_check_run(args.run), args.lang, args.size, seed=args.seed, lr=args.lr)
        print(f"{args.lang} {args.size} pairs (seed {args.seed}): chrF {result['tatoeba_chrf']:.1f}, "
              f"BLEU {result['tatoeba_bleu']:.1f} (copying the source: chrF {result['copy_chrf']:.1f}); "
              f"{result['steps']} steps")
        return result
    if args.command == "report":
        table = tr.report(args.grid)
        print(table)
        return table
    if args.command == "translate":
        outputs = tr.translate(_check_run(args.run), args.lang, args.text)
        for line in outputs:
            print(line)
        return outputs
    raise ConfigError(f"unknown command {args.command}")

