"""Omniglot N-way K-shot meta-learning (through TFDS).

    python -m experiments.omniglot train --ways 5 --shots 1 --algo maml --preset cpu --out runs/omniglot-5w1s
    python -m experiments.omniglot evaluate --run runs/omniglot-5w1s [--tasks 600] [--inner-steps 3]
    python -m experiments.omniglot episode --run runs/omniglot-5w1s --support SDIR --query QDIR

Offline, point ``--data-dir`` (or ``JAXMETA_OMNIGLOT_DIR``) at a directory of
the original archives (``images_background.zip``, ``images_evaluation.zip``, ...).
"""

from __future__ import annotations

from typing import Sequence

from experiments.fewshot import cli as fewshot_cli
from experiments.fewshot.pipeline import reptile_protocol
from jaxmeta.cli import run

PRESETS = ("paper", "cpu", "quick")


def reptile_paper(ways: int, shots: int) -> dict:
    """The Reptile paper's Omniglot protocol (openai/supervised-reptile's commands) for ``ways``-way."""
    protocol = (reptile_protocol(inner_batch=10, inner_steps=5, inner_lr=0.001, train_shots=10,
                                 test_inner_batch=5, meta_steps=100_000) if ways <= 5 else
                reptile_protocol(inner_batch=20, inner_steps=10, inner_lr=0.0005, train_shots=10,
                                 test_inner_batch=10, meta_steps=200_000))
    return {**protocol, "val_every": 5_000, "checkpoint_every": 5_000}


def amortized_cpu(ways: int, shots: int) -> dict:
    """Learners without an inner loop (Prototypical Networks, the in-context learner) on the CPU: 5 query
    examples per class (Snell et al.'s training episodes) and 480 images per meta-step at 5-way and 20-way
    alike (16 or 4 tasks), 10,000 meta-steps.

    No test inner steps: computing the prototypes, or reading the support set, is the adaptation.
    """
    return dict(meta_batch=16 if ways <= 5 else 4, queries=5, inner_steps=1, inner_lr=0.4, test_inner_steps=0,
                meta_steps=10_000, val_every=1_000, checkpoint_every=500)


OWN_PRESETS = {"reptile": {"paper": reptile_paper}, "protonet": {"cpu": amortized_cpu},
               "blackbox": {"cpu": amortized_cpu}}
"""Presets an algorithm has of its own: Reptile's paper has its own Omniglot protocol (``paper`` follows
it); the learners without an inner loop train on more query examples (``cpu``)."""


def preset(name: str, ways: int, shots: int, algo: str = "maml") -> dict:
    """Preset hyper-parameters for ``ways``-way ``shots``-shot Omniglot.

    ``paper`` is the protocol of the algorithm's own paper.  For Reptile it is
    the Reptile paper's (openai/supervised-reptile's Omniglot commands,
    :func:`~experiments.fewshot.pipeline.reptile_protocol`): 5-way, inner mini-batches of
    10 from 10 shots per class, 5 inner iterations at 0.001, 100,000
    meta-iterations, test mini-batches of 5; 20-way, mini-batches of 20, 10
    iterations at 0.0005, 200,000 meta-iterations, test mini-batches of 10.
    For the others it follows the MAML paper and its reference code (5-way: meta-batch
    32, one inner step; 20-way: meta-batch 16, five inner steps; 60,000
    meta-iterations; as many query examples per class as support examples in
    training). The reference code's step sizes (0.4 for 5-way, 0.1 for
    20-way) are kept, applied to a mean-reduced cross-entropy as in the
    learn2learn and MAML++ reproductions. ``cpu`` is the paper's protocol at
    a tenth of its budget for 5-way (6,000 meta-steps) and a twentieth for
    20-way (3,000, two inner steps), one query example per class in
    training; the amortised learners have their own (:func:`amortized_cpu`).
    What a ``cpu`` cell costs on the project's 2-core CPU: the preset's
    meta-steps at the ms per meta-step of the cell's record in
    ``results/omniglot/`` (5-way 1-shot MAML: docs/omniglot.md; the 5-way
    1-shot records were measured beside the test suite):

    ==============  ==================  ==================  ==================
    setting         MAML                first-order MAML    pre-training
    ==============  ==================  ==================  ==================
    5-way 1-shot    41 min (docs)       26 min (257 ms)     27 min (267 ms)
    5-way 5-shot    31 min (313 ms)     15 min (152 ms)     14 min (142 ms)
    20-way 1-shot   16 min (324 ms)     7 min (130 ms)      5 min (102 ms)
    20-way 5-shot   76 min (1530 ms)    22 min (440 ms)     14 min (289 ms)
    ==============  ==================  ==================  ==================

    ``quick`` is a minutes-long smoke run.
    """
    five_way = ways <= 5
    base = (dict(meta_batch=32, inner_steps=1, inner_lr=0.4, test_inner_steps=3) if five_way
            else dict(meta_batch=16, inner_steps=5, inner_lr=0.1, test_inner_steps=10))
    own = OWN_PRESETS.get(algo, {}).get(name)
    if own is not None:
        return own(ways, shots)
    if name == "paper":
        return {**base, "meta_steps": 60_000, "queries": shots, "val_every": 2_000, "checkpoint_every": 2_000}
    if name == "cpu":
        cpu = dict(meta_steps=6_000, queries=1, val_every=1_000, checkpoint_every=500)
        if not five_way:
            cpu.update(inner_steps=2, meta_steps=3_000)
        return {**base, **cpu}
    if name == "quick":
        return {**base, "meta_batch": 8, "meta_steps": 300, "queries": 1, "inner_steps": 1, "test_inner_steps": 3,
                "log_every": 50, "val_every": 150, "checkpoint_every": 150, "val_tasks": 50}
    raise ValueError(name)


def _paper_results() -> dict:
    """The published Omniglot figures (``table``'s last column) with each paper's meta-step budget.

    MAML and first-order MAML: the MAML paper's Table 1 (Finn et al. 2017; transductive batch norm).
    Reptile: the Reptile paper's Table 1 (Nichol et al. 2018, arXiv 1803.02999 v3), without and with
    transduction. Meta-SGD (Li et al. 2017), MAML++ (Antoniou et al. 2019; top-5 checkpoint
    ensembles), iMAML (Rajeswaran et al. 2019), ANIL (Raghu et al. 2020, 20-way only), Prototypical
    Networks (Snell et al. 2017, no interval published) and, for the in-context learner, SNAIL (Mishra et
    al. 2018, a black-box learner of another design): their papers' figures, budgets not stated here.
    Pre-training has no published figure.
    """
    maml = {(5, 1): "98.7 ± 0.4", (5, 5): "99.9 ± 0.1", (20, 1): "95.8 ± 0.3", (20, 5): "98.9 ± 0.2"}
    fomaml = {(5, 1): "98.3 ± 0.5", (5, 5): "99.2 ± 0.2", (20, 1): "89.4 ± 0.5", (20, 5): "97.9 ± 0.1"}
    reptile = {(5, 1): ("95.39 ± 0.09", "97.68 ± 0.04"), (5, 5): ("98.90 ± 0.10", "99.48 ± 0.06"),
               (20, 1): ("88.14 ± 0.15", "89.43 ± 0.14"), (20, 5): ("96.65 ± 0.33", "97.12 ± 0.32")}
    out: dict = {}
    for (ways, shots), figure in maml.items():
        out["maml", ways, shots] = {"meta_steps": 60_000, "transductive": figure}
        out["fomaml", ways, shots] = {"meta_steps": 60_000, "transductive": fomaml[ways, shots]}
        out["pretrain", ways, shots] = {"meta_steps": 60_000}
        non_transductive, transductive = reptile[ways, shots]
        out["reptile", ways, shots] = {"meta_steps": 100_000 if ways == 5 else 200_000,
                                       "non-transductive": non_transductive, "transductive": transductive}
    others = {("meta_sgd", 5, 1): "99.53 ± 0.26", ("meta_sgd", 20, 1): "95.93 ± 0.38",
              ("mamlpp", 5, 1): "99.47 ± 0.05", ("mamlpp", 20, 1): "97.65 ± 0.05",
              ("imaml", 5, 1): "99.50 ± 0.26", ("imaml", 20, 1): "96.18 ± 0.36", ("anil", 20, 1): "96.2 ± 0.5",
              ("protonet", 5, 1): "98.8", ("protonet", 20, 1): "96.0",
              ("blackbox", 5, 1): "99.07 ± 0.16", ("blackbox", 20, 1): "97.64 ± 0.30"}
    for cell, figure in others.items():
        out[cell] = {"transductive": figure}
    return out


PAPER_RESULTS = _paper_results()


def main(argv: Sequence[str] | None = None) -> dict:
    return fewshot_cli.main("omniglot", preset, PRESETS, "JAXMETA_OMNIGLOT_DIR", argv, PAPER_RESULTS)


if __name__ == "__main__":
    run(main)
