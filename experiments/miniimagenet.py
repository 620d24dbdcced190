"""Mini-ImageNet N-way K-shot meta-learning, on the user's own copy of the data.

    python -m experiments.miniimagenet train --ways 5 --shots 1 --algo maml --preset cpu --data-dir D --out RUN
    python -m experiments.miniimagenet evaluate --run RUN [--tasks 600] [--inner-steps 10]
    python -m experiments.miniimagenet episode --run RUN --support SDIR --query QDIR

``--data-dir D`` (or ``JAXMETA_MINIIMAGENET_DIR``) holds either the Ravi &
Larochelle split (``train.csv``, ``val.csv``, ``test.csv`` + ``images/``) or
the pickled caches ``mini-imagenet-cache-{train,val,test}.pkl`` (read with a
restricted unpickler). Same flags and outputs as ``experiments.omniglot``.
"""

from __future__ import annotations

from typing import Sequence

from experiments.fewshot import cli as fewshot_cli
from experiments.fewshot.pipeline import reptile_protocol
from jaxmeta.cli import run

PRESETS = ("paper", "cpu", "quick")


def reptile_paper(ways: int, shots: int) -> dict:
    """The Reptile paper's Mini-ImageNet protocol (openai/supervised-reptile's commands)."""
    return {**reptile_protocol(inner_batch=10, inner_steps=8, inner_lr=0.001, train_shots=15,
                               test_inner_batch=5 if shots == 1 else 15, meta_steps=100_000),
            "split": "maml", "val_every": 5_000, "checkpoint_every": 5_000}


OWN_PRESETS = {"reptile": {"paper": reptile_paper}}
"""Presets an algorithm has of its own: Reptile's paper has its own Mini-ImageNet protocol (``paper``)."""


def preset(name: str, ways: int, shots: int, algo: str = "maml") -> dict:
    """Preset hyper-parameters for ``ways``-way ``shots``-shot Mini-ImageNet.

    ``paper`` is the protocol of the algorithm's own paper.  Reptile's
    (openai/supervised-reptile's Mini-ImageNet commands): inner mini-batches
    of 10 from 15 shots per class, 8 inner iterations at 0.001, 100,000
    meta-iterations, test mini-batches of 5 (1-shot) or 15 (5-shot); see
    :func:`~experiments.fewshot.pipeline.reptile_protocol`.  The others follow the MAML paper's setting: meta-batch 4, five inner steps in
    training and ten at test time, 15 query images per class, 60,000
    meta-iterations, Conv4 with 32 filters and max-pooling. The reference
    step size 0.01 was applied to a loss summed over the ``ways × shots``
    support images; our loss is a mean, so the same step is ``0.01 · ways ·
    shots``. ``cpu`` scales the budget down (meta-batch 2, 2,000
    meta-iterations) to a few hours of a 2-core CPU; ``quick`` is a smoke run.
    """
    base = dict(meta_batch=4, inner_steps=5, inner_lr=0.01 * ways * shots, test_inner_steps=10, queries=15,
                split="maml")
    own = OWN_PRESETS.get(algo, {}).get(name)
    if own is not None:
        return own(ways, shots)
    if name == "paper":
        return {**base, "meta_steps": 60_000, "val_every": 2_000, "checkpoint_every": 2_000}
    if name == "cpu":
        return {**base, "meta_batch": 2, "meta_steps": 2_000, "val_every": 500, "checkpoint_every": 250,
                "log_every": 50}
    if name == "quick":
        return {**base, "meta_batch": 2, "inner_steps": 1, "queries": 2, "test_inner_steps": 3, "meta_steps": 40,
                "log_every": 10, "val_every": 20, "checkpoint_every": 20, "val_tasks": 20}
    raise ValueError(name)


def main(argv: Sequence[str] | None = None) -> dict:
    return fewshot_cli.main("miniimagenet", preset, PRESETS, "JAXMETA_MINIIMAGENET_DIR", argv)


if __name__ == "__main__":
    run(main)
