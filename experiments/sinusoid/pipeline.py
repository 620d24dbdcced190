"""The sinusoid pipeline: configuration, presets, training, evaluation, table and figures.

The launcher is :mod:`experiments.sinusoid`; it parses the flags and calls
:func:`run_experiment`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmeta import evaluate
from jaxmeta.algorithms.registry import (
    config_options,
    make_learner,
    spec,
)
from jaxmeta.config import NONNEGATIVE, POSITIVE, Config, option
from jaxmeta.data import sinusoid
from jaxmeta.errors import ConfigError
from jaxmeta.io import figure, pyplot, save_figure, write_json
from jaxmeta.models import MLP, regression_loss
from jaxmeta.training import train


@dataclasses.dataclass(frozen=True)
class SinusoidConfig(Config):
    """One sinusoid experiment (hashable, frozen: presets are instances)."""

    meta_steps: int = option(70_000, check=POSITIVE)
    meta_batch: int = option(25, check=POSITIVE)
    shots: int = option(10, check=POSITIVE, help="K support (and query) points in training")
    inner_steps: int = option(1, check=POSITIVE)
    inner_lr: float = option(0.01, check=POSITIVE)
    outer_lr: float = option(1e-3, check=POSITIVE)
    reptile_inner_steps: int = option(5, check=POSITIVE, help="Reptile's inner steps (default 5)")
    reptile_inner_lr: float = option(0.01, check=POSITIVE, help="Reptile's inner learning rate (default 0.01)")
    reptile_epsilon: float = option(0.1, check=POSITIVE, help="Reptile's outer step size (default 0.1)")
    imaml_lam: float = option(1.0, check=POSITIVE, help="iMAML's proximal strength lambda (default 1)")
    imaml_cg_steps: int = option(5, check=POSITIVE, help="iMAML's conjugate-gradient steps (default 5)")
    imaml_cg_damping: float = option(
        0.0, check=NONNEGATIVE,
        help="iMAML: solve (I + H/(lambda + D)) g = grad instead of the exact D = 0 (default 0)")
    eval_shots: tuple[int, ...] = option((5, 10, 20), help="comma-separated K values for testing")
    eval_steps: tuple[int, ...] = option((1, 5, 10), help="comma-separated inner steps reported")
    test_tasks: int = option(600, check=POSITIVE)
    query_points: int = option(100, check=POSITIVE, help="held-out points scored per test task")
    test_points: int = option(120, check=POSITIVE, help="points drawn per test task (K + query)")
    log_every: int = option(1_000, check=POSITIVE, help="meta-steps per logged line (and per dispatch)")
    seed: int = option(0)
    pretrain_lr_grid: tuple[float, ...] = option((0.0005, 0.001, 0.002, 0.005, 0.01, 0.02), check=POSITIVE,
                                                  flag=False)
    train_shots: tuple[int, ...] = option(
        (), help="comma-separated K values: train one model per K and score each test K with "
                 "the model trained at that K (instead of one model at --shots)")

    IDENTITY_EXCLUDE = ("meta_steps", "log_every", "eval_shots", "eval_steps", "test_tasks", "query_points",
                        "test_points", "pretrain_lr_grid", "train_shots")
    IDENTITY_LATER = ("imaml_lam", "imaml_cg_steps", "imaml_cg_damping")

    def validate(self) -> None:
        """Raises :class:`ConfigError` for impossible settings."""
        super().validate()
        if not self.eval_shots or not self.eval_steps:
            raise ConfigError("eval-shots and eval-steps must not be empty")
        if self.test_tasks < 2:
            raise ConfigError("test-tasks must be at least 2 for a confidence interval")
        untrained = sorted(set(self.eval_shots) - set(self.train_shots))
        if self.train_shots and untrained:
            raise ConfigError(
                f"no model is trained for test K={untrained[0]}: add it to --train-shots "
                f"({','.join(map(str, self.train_shots))})"
            )
        if max(self.eval_shots) + self.query_points > self.test_points:
            raise ConfigError(
                f"K={max(self.eval_shots)} support points plus {self.query_points} query points are more "
                f"than the {self.test_points} points of a test task (--test-points)"
            )


ANIL_HEAD = "Dense_2"  # the MLP's output layer


def training_shots(config: SinusoidConfig) -> dict[int, int]:
    """Which training K scores each test K: ``{test K: training K}``.

    Without ``train_shots`` one model, trained at ``shots``, scores every test
    K (the paper's protocol); with it, each test K uses the model trained at
    that same K.
    """
    return {k: (k if config.train_shots else config.shots) for k in config.eval_shots}


def model_config(config: SinusoidConfig, shots: int) -> SinusoidConfig:
    """The configuration of the one model trained with ``shots`` support points."""
    return dataclasses.replace(config, shots=shots, train_shots=())


PRESETS = {
    "paper": SinusoidConfig(),
    # The MAML reference code's sinusoid command (cbfinn/maml README) leaves --update_lr at its default
    # 1e-3, not the paper's 0.01: the same preset with that inner step size.
    "reference": SinusoidConfig(inner_lr=0.001),
    "quick": SinusoidConfig(meta_steps=8_000, log_every=500),
}


def algo_inner(config: SinusoidConfig, algo: str) -> tuple[int, float]:
    """The inner steps and learning rate an algorithm trains (and is evaluated) with.

    A field named ``{algo}_inner_steps`` or ``{algo}_inner_lr`` (Reptile's)
    replaces the shared ``inner_steps`` or ``inner_lr`` for that algorithm.
    """
    return (getattr(config, f"{algo}_inner_steps", config.inner_steps),
            getattr(config, f"{algo}_inner_lr", config.inner_lr))


@functools.lru_cache(maxsize=None)
def build_learner(config: SinusoidConfig, algo: str, inner_lr: float | None = None):
    """The learner of ``algo``; ``inner_lr`` replaces its inner (test-time) rate, e.g. pre-training's tuned one.

    One object per arguments, so the evaluations compiled for it are reused.
    """
    model = MLP()
    inner_steps, trained_lr = algo_inner(config, algo)
    options = {**config_options(config), "inner_steps": inner_steps,
               "inner_lr": trained_lr if inner_lr is None else inner_lr}
    return make_learner(
        algo,
        regression_loss(model),
        **options,
        model=model,
        make_loss=regression_loss,
        anil_head=ANIL_HEAD,
    )


def train_algorithm(
    config: SinusoidConfig, algo: str, out_dir: str | None, *, progress: bool = True, resume: bool = False
):
    """Meta-trains one algorithm; returns ``(params, history, seconds)``."""
    model = MLP()
    key = jax.random.PRNGKey(config.seed)
    init_key, task_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, 1)))["params"]
    learner = build_learner(config, algo)

    def sample(key, _data):
        return sinusoid.sample_tasks(key, batch_size=config.meta_batch, shots=config.shots, queries=config.shots)

    result = train(
        learner,
        params,
        sample,
        key=task_key,
        meta_steps=config.meta_steps,
        log_every=config.log_every,
        out_dir=out_dir,
        checkpoint_every=10 * config.log_every,
        resume=resume,
        identity={"experiment": "sinusoid", "algo": algo, **config.identity()},
        progress=progress,
        desc=f"sinusoid {algo}",
    )
    return result.state.meta.params, result.history, result.seconds


def tuned_lr(config: SinusoidConfig, algo: str, params, shots: int) -> float:
    """The inner learning rate used at test time for ``algo`` with ``shots`` points.

    Meta-learned initialisations are adapted with the rate they were trained
    for.  The pre-trained model has none, so, as in the MAML paper ("an
    automatically tuned step size"), its rate is picked from
    ``pretrain_lr_grid`` by the MSE after the most inner steps on 200
    validation tasks that are disjoint from the test tasks.
    """
    if spec(algo).inner_loop:
        return algo_inner(config, algo)[1]
    _, x, y = sinusoid.test_pool(jax.random.PRNGKey(2_000 + config.seed), num_tasks=200,
                                 points=config.test_points)
    tasks = sinusoid.pool_tasks(x, y, shots=shots, queries=config.query_points)
    loss_fn = regression_loss(MLP())
    scores = []
    for lr in config.pretrain_lr_grid:
        learner = build_learner(config, algo, lr)
        final = float(evaluate(learner, params, tasks, steps=max(config.eval_steps), loss_fn=loss_fn).mean["loss"][-1])
        scores.append(final if np.isfinite(final) else np.inf)
    return config.pretrain_lr_grid[int(np.argmin(scores))]


def evaluate_algorithm(
    config: SinusoidConfig, algo: str, meta_params, pool, *, eval_shots: Sequence[int] | None = None
) -> dict:
    """MSE on the fixed test tasks: ``{K: {steps: {"mean", "ci95"}}}``, full curves and rates used.

    Args:
      config: the experiment.
      algo: the algorithm that produced ``meta_params``.
      meta_params: the trained model.
      pool: the fixed test tasks of :func:`sinusoid.test_pool`.
      eval_shots: the test K values to score (default: all of ``config.eval_shots``).

    Returns:
      ``{"mse", "median_mse", "curves", "test_lr", "nonfinite"}``, each keyed by
      test K; ``nonfinite`` counts, per reported step, the test tasks whose
      query MSE overflowed (their mean is then infinite).
    """
    _, x, y = pool
    loss_fn = regression_loss(MLP())
    out, medians, curves, rates, nonfinite = {}, {}, {}, {}, {}
    for shots in config.eval_shots if eval_shots is None else eval_shots:
        inner_lr = rates[str(shots)] = tuned_lr(config, algo, meta_params, shots)
        tasks = sinusoid.pool_tasks(x, y, shots=shots, queries=config.query_points)
        result = evaluate(build_learner(config, algo, inner_lr), meta_params, tasks, steps=max(config.eval_steps),
                          loss_fn=loss_fn)
        mean, ci = np.asarray(result.mean["loss"]), np.asarray(result.ci95["loss"])
        per_task = np.asarray(result.per_task["loss"])
        median = np.median(per_task, axis=0)
        out[str(shots)] = {str(s): {"mean": float(mean[s]), "ci95": float(ci[s])} for s in config.eval_steps}
        medians[str(shots)] = {str(s): float(median[s]) for s in config.eval_steps}
        curves[str(shots)] = {"mean": mean.tolist(), "ci95": ci.tolist()}
        nonfinite[str(shots)] = {str(s): int(np.sum(~np.isfinite(per_task[:, s]))) for s in config.eval_steps}
    return {"mse": out, "median_mse": medians, "curves": curves, "test_lr": rates, "nonfinite": nonfinite}


def run_experiment(
    config: SinusoidConfig, algos: Sequence[str], out_dir: str, *, progress: bool = True, resume: bool = False
) -> dict:
    """Trains and evaluates every algorithm; writes results and figures to ``out_dir``.

    Each algorithm trains one model per distinct training K of
    :func:`training_shots` (in ``out_dir/ALGO``, or ``out_dir/ALGO-kK`` when
    there are several), and each test K is scored with its model.  The
    ``config`` of the results records that mapping as ``trained_with_shots``;
    ``train_seconds`` sums an algorithm's models, and ``history`` is that of
    the model scoring the smallest test K.
    """
    config.validate()
    started = time.perf_counter()
    pool = sinusoid.test_pool(jax.random.PRNGKey(1_000 + config.seed), num_tasks=config.test_tasks,
                              points=config.test_points)
    keys = ("mse", "median_mse", "curves", "test_lr", "nonfinite")
    results = {k: {} for k in keys + ("train_seconds", "history")}
    by_model = training_shots(config)
    models = sorted(set(by_model.values()))
    smallest = min(config.eval_shots)
    trained = {}
    for algo in algos:
        for k in keys:
            results[k][algo] = {}
        results["train_seconds"][algo] = 0.0
        for train_k in models:
            run_dir = f"{out_dir}/{algo}" if len(models) == 1 else f"{out_dir}/{algo}-k{train_k}"
            params, history, seconds = train_algorithm(
                model_config(config, train_k), algo, run_dir, progress=progress, resume=resume
            )
            eval_shots = [k for k in config.eval_shots if by_model[k] == train_k]
            scores = evaluate_algorithm(config, algo, params, pool, eval_shots=eval_shots)
            for k in keys:
                results[k][algo].update(scores[k])
            results["train_seconds"][algo] += seconds
            if by_model[smallest] == train_k:
                trained[algo] = params
                results["history"][algo] = history
        for k in keys:  # test K in the configured order
            results[k][algo] = {str(s): results[k][algo][str(s)] for s in config.eval_shots}
    results["config"] = dataclasses.asdict(config)
    results["config"]["trained_with_shots"] = {str(k): v for k, v in by_model.items()}
    results["algos"] = list(algos)
    results["wall_seconds"] = time.perf_counter() - started
    results["machine"] = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    write_json(f"{out_dir}/results.json", results)
    plot_learning_curves(results, f"{out_dir}/learning_curves.png")
    shots = str(min(config.eval_shots))
    plot_toy_fit(config, trained, pool, f"{out_dir}/toy_fit.png",
                 results_lr={a: results["test_lr"][a][shots] for a in algos})
    return results


def format_table(results: dict) -> str:
    """The MSE table (mean ± 95% CI, and the median over tasks) as text.

    ``K (train)`` is the K the scoring model was trained with; a mean made
    infinite by overflowing tasks reads ``inf (N of T tasks)``.
    """
    config = results["config"]
    trained_with = config.get("trained_with_shots", {})
    header = (["algo", "K", "K (train)"] + [f"{s} step{'s' * (s > 1)}" for s in config["eval_steps"]]
              + ["median (same steps)"])
    rows = [header]
    for algo, by_shots in results["mse"].items():
        for shots, by_steps in by_shots.items():
            medians = " / ".join(f"{v:.3f}" for v in results["median_mse"][algo][shots].values())
            bad = results.get("nonfinite", {}).get(algo, {}).get(shots, {})
            cells = [f"{v['mean']:.3f} ± {v['ci95']:.3f}" if np.isfinite(v["mean"])
                     else f"inf ({bad.get(s, '?')} of {config['test_tasks']} tasks)"
                     for s, v in by_steps.items()]
            rows.append([algo, shots, str(trained_with.get(shots, config["shots"]))] + cells + [medians])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


@figure
def plot_learning_curves(results: dict, path: str) -> None:
    """Meta-training curves and test MSE against inner steps, one line per algorithm."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for algo, history in results["history"].items():
        key = "train/query_loss_post" if "train/query_loss_post" in history[0] else "train/query_loss_pre"
        ax1.plot([r["step"] for r in history], [r[key] for r in history], label=algo)
    ax1.set(xlabel="meta-step", ylabel="query MSE (training tasks)", yscale="log",
            title="meta-training (after adaptation; pretrain: no adaptation)")
    ax1.legend()
    shots = str(min(results["config"]["eval_shots"]))
    for algo, curves in results["curves"].items():
        mean, ci = np.array(curves[shots]["mean"]), np.array(curves[shots]["ci95"])
        steps = np.arange(len(mean))
        ax2.plot(steps, mean, marker="o", label=algo)
        ax2.fill_between(steps, mean - ci, mean + ci, alpha=0.2)
    ax2.set(xlabel="inner gradient steps at test time", ylabel="query MSE",
            title=f"{shots}-shot test tasks (mean ± 95% CI)")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


@figure
def plot_toy_fit(
    config: SinusoidConfig, trained: dict, pool, path: str, *, task: int = 0, results_lr: dict | None = None
) -> None:
    """The seed's picture: a test sinusoid, its K points, and fits after 0, 1 and 10 steps."""
    plt = pyplot()

    functions, x, y = pool
    shots = min(config.eval_shots)
    model = MLP()
    grid = jnp.linspace(*sinusoid.INPUT_RANGE, 200)[:, None]
    truth = functions.amplitude[task] * jnp.sin(grid + functions.phase[task])
    support = (x[task, :shots], y[task, :shots])
    shown = [a for a in ("maml", "pretrain") if a in trained] or list(trained)[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    for ax, algo in zip(axes[0], shown):
        inner_lr = results_lr[algo] if results_lr else algo_inner(config, algo)[1]
        ax.plot(grid, truth, "k-", label="ground truth")
        for s, style in ((0, ":"), (1, "--"), (10, "-")):
            adapted = build_learner(config, algo, inner_lr).adapt(trained[algo], support, steps=s)  # as the test tasks
            ax.plot(grid, model.apply({"params": adapted}, grid), style, label=f"after {s} step{'s' * (s != 1)}")
        ax.plot(support[0], support[1], "^", color="tab:purple", markersize=9, label=f"{shots} points used")
        ax.set(title=f"{algo}", xlabel="x", ylabel="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
