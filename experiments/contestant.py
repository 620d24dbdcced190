"""One contestant of ``benchmark --torch``, alone in its own process.

    python -m experiments.contestant --contestant jax|jax_loop|autograd_loop|torch_func_plain_bn|torch_func
        --episode FILE [--threads N]
    python -m experiments.contestant --check --episode FILE [--threads N]

The benchmark starts one such process per contestant and drives them in turn
over their standard input, so no two contestants share a process or a
runtime (a PyTorch loop timed inside a JAX process ran 33x slower than
alone) and only one of them computes at a time.  Every process is pinned to
the same ``N`` cores and sets its thread count to ``N``.

``FILE`` (written by the benchmark) holds the setting, the initial
parameters, one task batch and JAX's meta-gradient of it.  Each contestant
builds its full meta-step (exact second-order meta-gradient, then Adam) on
that fixed task batch; JAX's is :func:`jaxmeta.make_learner`'s step, jitted:
``jax`` dispatches one meta-step per call, as PyTorch runs one step per call;
``jax_loop`` runs a turn's meta-steps in one dispatch (a ``lax.scan``), as
jaxmeta's training loop does.

Protocol: one JSON line ``{"ready": ..., "pid": ..., "threads": ...}`` on
start; then per input line ``run K`` it runs K meta-steps and answers
``{"times": [seconds of each]}``; ``quit`` (or end of input) ends it.  With
``--check`` it prints the PyTorch styles' gradient checks against JAX's
meta-gradient and a float64 finite difference, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Sequence

JAX = "jax"
JAX_LOOP = "jax_loop"


def pin(threads: int) -> int:
    """Pins this process to its first ``threads`` allowed cores (before any runtime starts its pool)."""
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if threads > len(cores):
            raise SystemExit(f"error: --threads {threads} exceeds the {len(cores)} cores this process may use")
        os.sched_setaffinity(0, cores[:threads])
    return threads


def jax_step(episode: str, *, per_dispatch: bool = False) -> Callable[[int], list[float]]:
    """JAX's meta-steps on the episode's task batch: ``make_learner``'s MAML step, jitted.

    ``run(k)`` returns the seconds of each of ``k`` meta-steps: one dispatch
    each, or with ``per_dispatch`` all ``k`` in one dispatch (a ``lax.scan``,
    as the training loop runs them), each credited ``1/k`` of its time.
    """
    import jax
    import numpy as np

    from jaxmeta.algorithms.registry import make_learner
    from jaxmeta.models import classification_loss, conv4_omniglot
    from jaxmeta.types import Task

    with np.load(episode) as f:
        meta = json.loads(str(f["meta"]))
        params = {}
        for key in f.files:
            if key.startswith("param/"):
                _, layer, leaf = key.split("/")
                params.setdefault(layer, {})[leaf] = jax.numpy.asarray(f[key])
        tasks = Task((f["support_x"], f["support_y"]), (f["query_x"], f["query_y"]))
    model = conv4_omniglot(meta["ways"])
    learner = make_learner("maml", classification_loss(model), inner_steps=meta["inner_steps"],
                           inner_lr=meta["inner_lr"], outer_lr=meta["outer_lr"], meta_steps=1_000_000,
                           has_aux=True)
    step = jax.jit(learner.step)
    scan = jax.jit(lambda st, t, k: jax.lax.scan(lambda c, _: step(c, t), st, None, length=k), static_argnums=2)
    tasks = jax.device_put(tasks)
    state = [learner.init(params)]

    def run(k: int) -> list[float]:
        if per_dispatch:
            t = time.perf_counter()
            state[0], metrics = scan(state[0], tasks, k)
            jax.block_until_ready((state[0], metrics))
            return [(time.perf_counter() - t) / k] * k
        times = []
        for _ in range(k):
            t = time.perf_counter()
            state[0], metrics = step(state[0], tasks)
            jax.block_until_ready((state[0], metrics))
            times.append(time.perf_counter() - t)
        return times

    return run


def torch_step(style: str, episode: str, threads: int) -> Callable[[int], list[float]]:
    """PyTorch's meta-steps of ``style``: ``run(k)`` returns the seconds of each of ``k`` calls."""
    import torch

    from experiments import torch_reference as tr

    torch.set_num_threads(threads)
    meta, params, data, _ = tr.load_episode(episode)
    step = tr.make_step(style, meta, params, data)

    def run(k: int) -> list[float]:
        times = []
        for _ in range(k):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return times

    return run


def serve(run: Callable[[int], list[float]], name: str, threads: int) -> None:
    """Answers ``run K`` lines with the K meta-steps' times until ``quit`` or end of input."""
    print(json.dumps({"ready": name, "pid": os.getpid(), "threads": threads}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] != "run" or len(words) != 2 or not words[1].isdigit():
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
            continue
        print(json.dumps({"times": run(int(words[1]))}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.contestant", description=__doc__.split("\n")[0])
    parser.add_argument("--contestant", choices=(JAX, JAX_LOOP, "autograd_loop", "torch_func_plain_bn", "torch_func"))
    parser.add_argument("--check", action="store_true", help="print the PyTorch gradient checks and exit")
    parser.add_argument("--episode", required=True)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1))
    args = parser.parse_args(argv)
    threads = pin(args.threads)
    if args.check:
        import torch

        from experiments import torch_reference as tr

        torch.set_num_threads(threads)
        meta, params, data, jax_grads = tr.load_episode(args.episode)
        print(json.dumps(tr.gradient_checks(meta, params, data, jax_grads)), flush=True)
        return
    if args.contestant is None:
        parser.error("give --contestant or --check")
    if args.contestant in (JAX, JAX_LOOP):
        run = jax_step(args.episode, per_dispatch=args.contestant == JAX_LOOP)
    else:
        run = torch_step(args.contestant, args.episode, threads)
    serve(run, args.contestant, threads)


if __name__ == "__main__":
    main()
