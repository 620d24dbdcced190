"""The sinusoid toy of the MAML paper: MAML vs first-order MAML, Reptile and pre-training.

    python -m experiments.sinusoid [--preset quick|paper|reference] [--algos maml,fomaml,reptile,pretrain] [--out DIR]
                                   [--train-shots 5,10,20]

Each algorithm meta-trains on the same budget (a 1-40-40-1 ReLU MLP, K = 10
support and query points per task, meta-batch 25, one inner SGD step at lr
0.01, Adam 1e-3 outside), then adapts on 600 fixed test tasks with K = 5, 10,
20 points, scoring the mean squared error on 100 held-out points of each task
after every inner step.  As in the MAML paper (§5.1: "we fine-tune a single
meta-learned model on varying numbers of K examples"; Appendix B: trained on
10-shot, evaluated on 5-, 10- and 20-shot), one model per algorithm scores
every test K.  ``--train-shots`` instead trains one model per K in its list
and scores each test K with the model trained at that K.  Writes
``DIR/results.json``, ``DIR/toy_fit.png``, ``DIR/learning_curves.png`` and
prints a table with 95% confidence intervals.

Presets: ``paper`` (70,000 meta-steps, the paper's inner step size 0.01),
``reference`` (the same with inner step size 0.001, the value the MAML
reference code's sinusoid command runs with: its ``--update_lr`` default) and
``quick`` (8,000 meta-steps).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from experiments.sinusoid.pipeline import (
    PRESETS,
    SinusoidConfig,
    format_table,
    model_config,
    run_experiment,
    training_shots,
)
from jaxmeta.algorithms.registry import ALGORITHMS, BASE_ALGORITHMS, spec
from jaxmeta.cli import ArgumentParser, choice_list, writable_dir
from jaxmeta.errors import ConfigError

__all__ = ["PRESETS", "SinusoidConfig", "build_parser", "main", "model_config", "training_shots"]


REGRESSION = tuple(algo for algo in ALGORITHMS if not spec(algo).classification_only)
"""The algorithms that learn a regression task (not Prototypical Networks: they need classes)."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m experiments.sinusoid", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--algos", type=choice_list(REGRESSION), default=BASE_ALGORITHMS,
                        help="comma-separated subset of " + ",".join(REGRESSION) + " (default: the first four)")
    parser.add_argument("--out", default="runs/sinusoid", help="output directory")
    SinusoidConfig.add_flags(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in --out (finished ones are only re-evaluated)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    overrides = SinusoidConfig.flag_values(args)
    if args.shots is not None and args.train_shots:
        raise ConfigError("give --shots (one model for every test K) or --train-shots (one model per K), not both")
    config = dataclasses.replace(PRESETS[args.preset], **overrides)
    config.validate()
    out_dir = writable_dir(args.out)
    results = run_experiment(config, args.algos, out_dir, progress=not args.no_progress, resume=args.resume)
    print(format_table(results))
    print(f"wall time {results['wall_seconds']:.1f} s; results in {out_dir}/results.json")
    return results


