"""The benchmark's pipeline: meta-step compile time, step time, memory and FLOPs, sweeps and reports.

Everything :mod:`experiments.benchmark` reports is computed here, in one
process per call of :func:`benchmark`, with the measurements of
:mod:`jaxmeta.profiling`:

* **compile time** of one meta-step (trace + lower + XLA compile, ahead of
  time, so no step time is mixed in);
* **step time**, median and spread, for one meta-step per dispatch and for many
  meta-steps per dispatch (the ``lax.scan`` of :func:`jaxmeta.training.make_train_chunk`),
  tasks sampled on the device inside the timed program, every call blocked on
  with :func:`jax.block_until_ready`, the two kinds of calls interleaved so
  that both see the same load on a shared machine;
* **peak memory** of the compiled step from XLA's memory analysis (temp +
  arguments + outputs − aliased), plus ``peak_bytes_in_use`` on devices whose
  allocator reports it (GPU);
* **FLOPs** of one step, counted on the step's jaxpr with every ``scan``
  multiplied by its length (XLA's ``cost_analysis`` counts a loop body once,
  whatever its trip count, so it under-reports multi-step inner loops; it is
  kept alongside as ``xla_flops``);
* the **fp32 matmul peak** of the same machine in the same process, so every
  throughput is also a fraction of what the hardware reaches on a large GEMM.

The Omniglot image pool is a random ``[classes, 20, 28, 28, 1]`` array (timing
does not depend on pixel values); it is an *argument* of the compiled step,
never a constant baked into it.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmeta.algorithms.registry import ALGORITHMS, learner_model, make_learner, spec
from jaxmeta.config import NONNEGATIVE, POSITIVE, Config, option
from jaxmeta.models.conv4 import CONV_IMPLS
from jaxmeta.distributed import device_description
from jaxmeta.errors import ConfigError
from jaxmeta.io import figure, pyplot, save_figure
from jaxmeta.profiling import (
    compile_ahead,
    count_flops,
    device_peak_bytes,
    matmul_ceiling,
    matmul_peak_gflops,
    memory_summary,
    profile_step,
    spread,
    timed_calls,
    xla_flops,
)
from jaxmeta.training import guarded_step, init_train_state, make_train_chunk

TASKS = ("sinusoid", "omniglot", "translation")

SWEEP_ALGOS = ("maml", "fomaml", "reptile", "pretrain")
"""The algorithms the sweep runs by default (any of the registry's can be named)."""

RESULT_KEYS = (
    "ms_per_step",
    "ms_per_step_spread",
    "compile_s",
    "peak_bytes",
    "flops_per_step",
    "gflops_per_s",
    "matmul_peak_gflops",
    "fraction_of_peak",
    "config",
    "device",
)
"""The keys every result (and ``--json`` file) has; more detail sits beside them."""


@dataclasses.dataclass(frozen=True)
class BenchConfig(Config):
    """One benchmarked configuration.

    ``ways`` and ``conv_impl`` only apply to Omniglot; ``remat`` only changes
    the algorithms that differentiate through their inner loop
    (``AlgorithmSpec.remat``).
    """

    task: str = option("omniglot", choices=TASKS)
    algo: str = option("maml", choices=ALGORITHMS)
    ways: int = option(5, check=POSITIVE, help="classes per task (Omniglot; default 5)")
    shots: int = option(1, check=POSITIVE, help="support examples per class (default 1; sinusoid 10)")
    queries: int = option(15, check=POSITIVE, help="query examples per class (default 15; sinusoid 10 points)")
    meta_batch: int = option(32, check=POSITIVE, help="tasks per meta-step (default 32; sinusoid 25)")
    inner_steps: int = option(1, check=POSITIVE, help="default 1")
    remat: bool = option(False, help="rematerialise inner steps (algorithms that differentiate through them)")
    chunk_size: int | None = option(None, check=POSITIVE,
                                     help="tasks per lax.map chunk (default: vmap over the whole meta-batch)")
    conv_impl: str = option("auto", choices=CONV_IMPLS)
    inner_lr: float | None = option(None, check=POSITIVE, help="default 0.4 (Omniglot), 0.01 (sinusoid)")
    outer_lr: float = option(1e-3, check=POSITIVE)
    classes: int = option(1200, check=POSITIVE, help="classes in the random Omniglot image pool (default 1200; "
                                                      "the named settings: 4400, as many as the real training pool)")
    repeats: int = option(10, check=POSITIVE, help="timed one-step dispatches (default 10)")
    warmup: int = option(2, check=NONNEGATIVE, help="untimed dispatches before timing (default 2)")
    steps_per_dispatch: int = option(10, check=POSITIVE,
                                      help="meta-steps per dispatch in the many-steps timing (default 10; sweep 5)")
    dispatch_repeats: int = option(3, check=POSITIVE, help="timed many-step dispatches (default 3; sweep 2)")
    seed: int = option(0)

    def validate(self) -> None:
        """Raises :class:`ConfigError` (one line) for an impossible configuration."""
        super().validate()
        if self.task != "omniglot" and spec(self.algo).classification_only:
            raise ConfigError(f"{spec(self.algo).title} need classes: --task omniglot, not {self.task}")
        if self.task == "omniglot":
            if self.ways > self.classes:
                raise ConfigError(f"ways={self.ways} exceeds the {self.classes} classes of the image pool")
            if self.shots + self.queries > 20:
                raise ConfigError(
                    f"shots + queries = {self.shots + self.queries} exceeds the 20 examples per Omniglot class"
                )

    @property
    def effective_inner_lr(self) -> float:
        """The inner learning rate: given, or the MAML paper's (0.4 Omniglot, 0.01 sinusoid)."""
        if self.inner_lr is not None:
            return self.inner_lr
        return 0.4 if self.task == "omniglot" else 0.01

    @property
    def effective_remat(self) -> bool:
        """Whether remat changes the program (only algorithms whose meta-gradient keeps the inner steps)."""
        return self.remat and spec(self.algo).remat

    def label(self) -> str:
        """A short human-readable name."""
        if self.task == "omniglot":
            head = f"omniglot {self.ways}w{self.shots}s B{self.meta_batch} Q{self.queries}"
        elif self.task == "translation":
            head = f"translation support{self.shots} query{self.queries} B{self.meta_batch}"
        else:
            head = f"sinusoid K{self.shots} B{self.meta_batch}"
        extra = " remat" if self.remat else ""
        extra += f" chunk={self.chunk_size}" if self.chunk_size else ""
        extra += f" conv={self.conv_impl}" if self.task == "omniglot" and self.conv_impl != "auto" else ""
        return f"{head} {self.algo} steps={self.inner_steps}{extra}"

    def as_dict(self) -> dict:
        """The configuration as JSON, with the resolved learning rate and conv implementation."""
        out = dataclasses.asdict(self)
        out["inner_lr"] = self.effective_inner_lr
        if self.task == "omniglot":
            from jaxmeta.models import resolve_conv_impl

            out["conv_impl_resolved"] = resolve_conv_impl(self.conv_impl)
        return out


# --------------------------------------------------------------------------- problems


@dataclasses.dataclass
class BenchProblem:
    """A learner, its initial parameters, an on-device task sampler and its data.

    ``sample(key, data)`` draws one meta-batch; ``data`` is the image pool for
    Omniglot (an argument of every compiled program) and an empty array for
    the sinusoid.
    """

    learner: Any
    params: Any
    sample: Callable
    data: jax.Array


def build_problem(config: BenchConfig) -> BenchProblem:
    """The model, learner, sampler and data of ``config``."""
    config.validate()
    key = jax.random.PRNGKey(config.seed)
    init_key, data_key = jax.random.split(key)
    if config.task == "sinusoid":
        from jaxmeta.data import sinusoid
        from jaxmeta.models import MLP, regression_loss

        model = MLP()
        make_loss, head = regression_loss, "Dense_2"
        loss_fn, has_aux = regression_loss(model), False
        params = model.init(init_key, jnp.zeros((1, 1)))["params"]
        data = jnp.zeros((0,), jnp.float32)

        def sample(k, _data):
            return sinusoid.sample_tasks(k, batch_size=config.meta_batch, shots=config.shots,
                                         queries=config.queries)
    elif config.task == "translation":
        # The `cpu` preset's byte-level Transformer; random bytes at full length (timing only).
        from experiments.translation import pipeline as translation
        from jaxmeta.data.translation import language_task_sampler
        from jaxmeta.tokens import OFFSET

        tconfig = translation.preset("cpu", algo=config.algo, meta_batch=config.meta_batch,
                                     support=config.shots, query=config.queries,
                                     inner_steps=config.inner_steps)
        model, loss_fn = translation.build(tconfig)
        from jaxmeta.models.transformer import init_params

        params = init_params(model, init_key)
        k1, k2 = jax.random.split(data_key)
        n, length = 256, tconfig.max_len
        data = {"source": jax.random.randint(k1, (4, n, length), OFFSET, 256 + OFFSET).astype(jnp.uint16),
                "target": jax.random.randint(k2, (4, n, length + 1), OFFSET, 256 + OFFSET).astype(jnp.uint16),
                "count": jnp.full((4,), n, jnp.int32)}
        sample = language_task_sampler(config.meta_batch, config.shots, config.queries)
        return BenchProblem(translation.learner(tconfig, loss_fn), params, sample, data)
    else:
        from jaxmeta.data.episodes import sample_tasks
        from jaxmeta.models import classification_loss, conv4_omniglot

        model = learner_model(config.algo, conv4_omniglot(config.ways, conv_impl=config.conv_impl))
        make_loss, head = classification_loss, "head"
        loss_fn, has_aux = classification_loss(model), True
        params = model.init(init_key, jnp.zeros((1, 28, 28, 1)))["params"]
        data = jax.device_put(jax.random.uniform(data_key, (config.classes, 20, 28, 28, 1), jnp.float32))

        def sample(k, images):
            return sample_tasks(k, images, batch_size=config.meta_batch, ways=config.ways,
                                shots=config.shots, queries=config.queries)

    learner = make_learner(
        config.algo,
        loss_fn,
        inner_steps=config.inner_steps,
        inner_lr=config.effective_inner_lr,
        outer_lr=config.outer_lr,
        meta_steps=1_000_000,
        has_aux=has_aux,
        remat=config.remat,
        chunk_size=config.chunk_size,
        model=model,
        make_loss=make_loss,
        anil_head=head,
    )
    return BenchProblem(learner, params, sample, data)



# --------------------------------------------------------------------------- the benchmark


def step_programs(problem: BenchProblem, steps_per_dispatch: int):
    """``(one_step, many_steps)``: jitted ``f(state, data) -> (state, metrics)``.

    ``one_step`` samples a meta-batch on the device and applies one guarded
    meta-step (exactly the body of :func:`jaxmeta.training.make_train_chunk`);
    ``many_steps`` runs ``steps_per_dispatch`` of them in one dispatch through
    :func:`~jaxmeta.training.make_train_chunk` itself.
    """
    run = make_train_chunk(problem.learner, problem.sample)

    def one(state, data):
        return guarded_step(problem.learner, problem.sample, data)(state)

    def many(state, data):
        return run(state, data, steps_per_dispatch)

    return jax.jit(one), jax.jit(many)




def benchmark(
    config: BenchConfig,
    *,
    matmul_peak: dict | None = None,
    many_per_dispatch: bool = True,
    recheck_peak: bool = True,
    ceiling: bool = False,
    profile: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measures one configuration; returns a JSON-ready dict (see :data:`RESULT_KEYS`).

    With ``profile``, :func:`profile_step` times every op of the compiled
    one-step program (``result["profile"]``).

    With ``ceiling``, :func:`matmul_ceiling` also times the step's matrix
    products alone (``result["matmul_ceiling"]``).

    ``ms_per_step`` is the time per meta-step when ``steps_per_dispatch``
    meta-steps run per dispatch (how :func:`jaxmeta.training.train` runs);
    ``timing["one_per_dispatch"]`` holds the one-step-per-call figures.
    ``matmul_peak`` reuses a :func:`matmul_peak_gflops` result (a sweep
    measures it once); by default it is measured here.  With
    ``recheck_peak`` the GEMM rate is sampled again right after the timings
    and ``matmul_peak_gflops`` is the better of the two (the machine may be
    shared: the best rate seen is the best estimate of the hardware's peak).
    """
    log = log or (lambda _msg: None)
    config.validate()
    if matmul_peak is None:
        matmul_peak = matmul_peak_gflops()
    problem = build_problem(config)
    state = init_train_state(problem.learner, problem.params, jax.random.PRNGKey(config.seed + 1))
    one, many = step_programs(problem, config.steps_per_dispatch)

    log("compiling one meta-step")
    compiled_one, jaxpr, compile_phases = compile_ahead(one, state, problem.data)
    flops = count_flops(jaxpr)
    memory = memory_summary(compiled_one)
    xla_count = xla_flops(compiled_one)

    timing = {}
    chunk_compile = None
    compiled_many = None
    if many_per_dispatch:
        log(f"compiling {config.steps_per_dispatch} meta-steps per dispatch")
        compiled_many, _, chunk_compile = compile_ahead(many, state, problem.data)

    # Warm up both programs, then interleave their timed calls, so that both see the same
    # machine load (other processes come and go on a shared machine).
    log(f"timing {config.warmup}+{config.repeats} one-step dispatches"
        + (f", interleaved with 1+{config.dispatch_repeats} dispatches of {config.steps_per_dispatch} steps"
           if compiled_many is not None else ""))
    state, _ = timed_calls(compiled_one, state, problem.data, config.warmup)
    rounds = config.dispatch_repeats if compiled_many is not None else 1
    if compiled_many is not None:
        state, _ = timed_calls(compiled_many, state, problem.data, 1)
    single_times, many_times = [], []
    for r in range(rounds):
        calls = config.repeats * (r + 1) // rounds - config.repeats * r // rounds
        state, times = timed_calls(compiled_one, state, problem.data, calls)
        single_times += times
        if compiled_many is not None:
            state, times = timed_calls(compiled_many, state, problem.data, 1)
            many_times += times
    single = spread([1e3 * t for t in single_times])
    timing["one_per_dispatch"] = single
    if compiled_many is not None:
        per_step = [1e3 * t / config.steps_per_dispatch for t in many_times]
        timing["many_per_dispatch"] = {**spread(per_step), "steps_per_dispatch": config.steps_per_dispatch}
        headline = timing["many_per_dispatch"]
    else:
        headline = single

    ms = headline["median"]
    gflops = flops["total"] / (ms * 1e-3) / 1e9
    # On a shared machine the GEMM rate moves with the load: sample it again right after this
    # configuration's timings and take the best seen as the hardware's peak.
    after = matmul_peak_gflops(repeats=3) if recheck_peak else None
    peak = max(matmul_peak["peak_gflops"], after["peak_gflops"] if after else 0.0)
    data_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(problem.data)))
    result = {
        "ms_per_step": ms,
        "ms_per_step_spread": {k: headline[k] for k in ("iqr", "q25", "q75", "min", "max", "n")},
        "compile_s": compile_phases["total_s"],
        "peak_bytes": memory.get("peak_bytes"),
        "flops_per_step": flops["total"],
        "gflops_per_s": gflops,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": gflops / peak,
        "config": config.as_dict(),
        "device": device_description(),
        "label": config.label(),
        "timing": timing,
        "ms_per_step_one_per_dispatch": single["median"],
        "compile": {"one_step": compile_phases, "many_steps": chunk_compile},
        "memory": {**memory, "data_bytes": data_bytes,
                   "step_bytes": None if memory.get("peak_bytes") is None else memory["peak_bytes"] - data_bytes,
                   "device_peak_bytes_in_use": device_peak_bytes()},
        "flops": {**flops, "xla_cost_analysis_flops": xla_count,
                  "matmul_gflops_per_s": flops["matmul"] / (ms * 1e-3) / 1e9},
        "matmul_peak": {**matmul_peak, "after_gflops": after["peak_gflops"] if after else None},
    }
    if profile:
        log("profiling the compiled step op by op")
        result["profile"] = profile_step(compiled_one, compiled_one.as_text(), state, problem.data)
    if ceiling:
        log("timing the step's matrix products alone")
        found = matmul_ceiling(jaxpr, log=log)
        found["fraction_of_peak"] = found["gflops_per_s"] / peak if found["gflops_per_s"] else None
        found["step_matmul_share_of_time"] = found["seconds"] / (ms * 1e-3)
        result["matmul_ceiling"] = found
    return result


def compare_algorithms(
    config: BenchConfig, algos: tuple[str, ...], *, log: Callable[[str], None] | None = None
) -> dict:
    """Times several algorithms on ``config``'s problem side by side; ratios to the first.

    Each algorithm's many-steps-per-dispatch program (the training loop) is
    compiled ahead of time and warmed up; then ``config.repeats`` rounds each
    time one dispatch of ``config.steps_per_dispatch`` meta-steps per
    algorithm, in turn, so that every algorithm sees the same load on a shared
    machine.

    Args:
      config: the problem, inner steps and timing options (its ``algo`` is ignored).
      algos: two or more algorithm names; the first is the baseline.
      log: progress messages.

    Returns:
      ``{"config", "device", "baseline", "algos": {algo: {"ms_per_step", spread..., "compile_s",
      "ratio_to_baseline", "speedup_vs_baseline", "paired_ratio_median"}}}``, times in ms per
      meta-step (medians); ``ratio_to_baseline`` is the ratio of the medians,
      ``paired_ratio_median`` the median over rounds of the ratio within a
      round (robust to load that changes between rounds).

    Raises:
      ConfigError: fewer than two algorithms, or a repeated one.
    """
    log = log or (lambda _msg: None)
    if len(algos) < 2 or len(set(algos)) != len(algos):
        raise ConfigError(f"compare needs two or more different algorithms, got {', '.join(algos)}")
    runs = {}
    for algo in algos:
        problem = build_problem(dataclasses.replace(config, algo=algo))
        state = init_train_state(problem.learner, problem.params, jax.random.PRNGKey(config.seed + 1))
        log(f"compiling {algo}: {config.steps_per_dispatch} meta-steps per dispatch")
        compiled, _, phases = compile_ahead(step_programs(problem, config.steps_per_dispatch)[1], state, problem.data)
        state, _ = timed_calls(compiled, state, problem.data, max(config.warmup, 1))
        runs[algo] = {"compiled": compiled, "state": state, "data": problem.data, "compile_s": phases["total_s"],
                      "times": []}
    log(f"timing {config.repeats} rounds of {', '.join(algos)} in turn")
    for _ in range(config.repeats):
        for run in runs.values():
            run["state"], times = timed_calls(run["compiled"], run["state"], run["data"], 1)
            run["times"] += [1e3 * t / config.steps_per_dispatch for t in times]
    base_times = runs[algos[0]]["times"]
    base = statistics.median(base_times)
    rows = {}
    for algo, run in runs.items():
        ms = statistics.median(run["times"])
        paired = statistics.median(t / b for t, b in zip(run["times"], base_times))
        rows[algo] = {"ms_per_step": ms, **spread(run["times"]), "compile_s": run["compile_s"],
                      "ratio_to_baseline": ms / base, "speedup_vs_baseline": base / ms,
                      "paired_ratio_median": paired}
    return {"config": {**config.as_dict(), "algo": None}, "device": device_description(), "baseline": algos[0],
            "steps_per_dispatch": config.steps_per_dispatch, "algos": rows}


def comparison_line(report: dict) -> str:
    """The comparison in one line: each algorithm's median and its ratio to the baseline."""
    base = report["baseline"]

    def versus(row) -> str:
        speedup = row["speedup_vs_baseline"]
        pace = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
        return (f" ({row['ratio_to_baseline']:.2f}x {base}'s time, {pace};"
                f" paired per round {row['paired_ratio_median']:.2f}x)")

    parts = [f"{algo} {row['ms_per_step']:.4g} ms/step" + ("" if algo == base else versus(row))
             for algo, row in report["algos"].items()]
    return "; ".join(parts)


# --------------------------------------------------------------------------- the sweep

OMNIGLOT_TRAIN_CLASSES = 4400
"""Classes of the ``maml`` split's training pool: 1,100 characters, each rotated four ways."""

PROTOCOLS = {
    "maml-5w1s": {"task": "omniglot", "algo": "maml", "ways": 5, "shots": 1, "queries": 1, "meta_batch": 32,
                  "inner_steps": 1, "inner_lr": 0.4, "classes": OMNIGLOT_TRAIN_CLASSES},
    "maml-5w5s": {"task": "omniglot", "algo": "maml", "ways": 5, "shots": 5, "queries": 5, "meta_batch": 32,
                  "inner_steps": 1, "inner_lr": 0.4, "classes": OMNIGLOT_TRAIN_CLASSES},
    "maml-20w1s": {"task": "omniglot", "algo": "maml", "ways": 20, "shots": 1, "queries": 1, "meta_batch": 16,
                   "inner_steps": 5, "inner_lr": 0.1, "classes": OMNIGLOT_TRAIN_CLASSES},
    "maml-5w1s-q15": {"task": "omniglot", "algo": "maml", "ways": 5, "shots": 1, "queries": 15, "meta_batch": 32,
                      "inner_steps": 1, "inner_lr": 0.4, "classes": OMNIGLOT_TRAIN_CLASSES},
    "translation": {"task": "translation", "algo": "fomaml", "shots": 16, "queries": 16, "meta_batch": 4,
                    "inner_steps": 3},
}
"""The papers' training steps as named benchmark settings (``--setting NAME``).

``maml-5w1s``, ``maml-5w5s`` and ``maml-20w1s`` are the MAML paper's Omniglot
training steps (what ``--preset paper`` trains: as many queries per class as
shots, one inner step at 0.4 for 5-way, five at 0.1 for 20-way; the ``cpu``
preset runs ``maml-5w1s``); ``maml-5w1s-q15`` is the 15-query step this
benchmark used before; ``translation`` is the ``cpu`` preset's MetaNMT
meta-step (first order, 3 inner Adam steps).  Omniglot settings draw from a
pool as large as the real training pool, so sampling costs what it costs in
``train``.
"""


def protocol_config(name: str, **overrides) -> "BenchConfig":
    """The :class:`BenchConfig` of the named protocol, with ``overrides`` applied."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown setting {name!r}; choose from {', '.join(PROTOCOLS)}")
    return BenchConfig(**{**PROTOCOLS[name], **overrides})


SWEEP_SETTINGS = {
    "omniglot5": {"task": "omniglot", "ways": 5, "shots": 1, "queries": 15, "meta_batch": 32},
    "omniglot20": {"task": "omniglot", "ways": 20, "shots": 1, "queries": 15, "meta_batch": 16},
    "sinusoid": {"task": "sinusoid", "shots": 10, "queries": 10, "meta_batch": 25},
}
SWEEP_SETTINGS.update({name: {k: v for k, v in p.items() if k not in ("algo", "inner_steps")}
                       for name, p in PROTOCOLS.items()})
"""The problem settings of the sweep, by name (the named protocols' problems included)."""

SWEEP_STEPS = (1, 5, 10, 25)
QUICK_STEPS = (1, 5)


def sweep_configs(
    settings=tuple(SWEEP_SETTINGS),
    algos=SWEEP_ALGOS,
    inner_steps=SWEEP_STEPS,
    *,
    quick: bool = False,
    **overrides,
) -> list[BenchConfig]:
    """The sweep's configurations: settings x algorithms x inner steps x remat.

    Grid points that compile to the same program are measured once: remat
    only changes the algorithms whose spec says so (``AlgorithmSpec.remat``), and pre-training has no inner
    loop (one point per setting, at the smallest inner-step count).  With
    ``quick``, inner steps are limited to (1, 5) and fewer steps are timed.
    """
    if quick:
        inner_steps = tuple(s for s in inner_steps if s in QUICK_STEPS) or QUICK_STEPS
        overrides = {"repeats": 3, "warmup": 1, "steps_per_dispatch": 5, "dispatch_repeats": 1, **overrides}
    else:
        overrides = {"steps_per_dispatch": 5, "dispatch_repeats": 2, **overrides}
    configs = []
    for setting in settings:
        for algo in algos:
            steps_list = inner_steps if spec(algo).inner_loop else inner_steps[:1]
            remats = (False, True) if spec(algo).remat else (False,)
            for steps in steps_list:
                for remat in remats:
                    configs.append(BenchConfig(**{**SWEEP_SETTINGS[setting], "algo": algo, "inner_steps": steps,
                                                  "remat": remat, **overrides}))
    return configs


def setting_name(config: dict) -> str:
    """The sweep setting a result's config belongs to (e.g. ``"omniglot 5-way 1-shot B32"``)."""
    if config["task"] == "sinusoid":
        return f"sinusoid K={config['shots']} B{config['meta_batch']}"
    return f"omniglot {config['ways']}-way {config['shots']}-shot B{config['meta_batch']}"


def summary_line(result: dict) -> str:
    """One progress line for a measured configuration."""
    t = result["timing"]
    many = t.get("many_per_dispatch")
    one = t["one_per_dispatch"]
    parts = [f"{result['ms_per_step']:.4g} ms/step"]
    if many:
        parts[0] += f" ({many['steps_per_dispatch']}/dispatch, IQR {many['iqr']:.2g})"
        parts.append(f"{one['median']:.4g} ms 1/dispatch")
    parts.append(f"compile {result['compile_s']:.1f} s")
    if result["peak_bytes"] is not None:
        parts.append(f"peak {result['peak_bytes'] / 2**20:.1f} MiB")
    parts.append(f"{result['flops_per_step'] / 1e9:.3g} GFLOP")
    parts.append(f"{result['gflops_per_s']:.3g} GFLOP/s = {100 * result['fraction_of_peak']:.1f}% of matmul peak")
    if result.get("matmul_ceiling", {}).get("gflops_per_s"):
        c = result["matmul_ceiling"]
        parts.append(f"its matmuls alone {c['gflops_per_s']:.3g} GFLOP/s = {100 * c['fraction_of_peak']:.1f}% of peak, "
                     f"{1e3 * c['seconds']:.4g} ms = {100 * c['step_matmul_share_of_time']:.0f}% of the step")
    return ", ".join(parts)


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def format_table(results: list[dict]) -> str:
    """A markdown table of sweep results."""
    head = ("| setting | algo | inner steps | remat | ms/step (many/dispatch) | IQR | ms/step (1/dispatch) "
            "| compile s | peak MiB | step MiB (excl. images) | GFLOP/step | GFLOP/s | % matmul peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c = r["config"]
        remat = ("on" if c["remat"] else "off") if spec(c["algo"]).remat else "n/a"
        steps = str(c["inner_steps"]) if spec(c["algo"]).inner_loop else "-"
        lines.append(
            f"| {setting_name(c)} | {c['algo']} | {steps} | {remat} | {r['ms_per_step']:.4g} "
            f"| {r['ms_per_step_spread']['iqr']:.2g} | {r['timing']['one_per_dispatch']['median']:.4g} "
            f"| {r['compile_s']:.1f} | {_mib(r['peak_bytes'])} | {_mib(r['memory'].get('step_bytes'))} "
            f"| {r['flops_per_step'] / 1e9:.3g} | {r['gflops_per_s']:.3g} | {100 * r['fraction_of_peak']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _series(results: list[dict], setting: str):
    """``{(algo, remat): (inner steps, results)}`` for one setting, sorted by steps."""
    out: dict = {}
    for r in results:
        c = r["config"]
        if setting_name(c) != setting:
            continue
        out.setdefault((c["algo"], bool(c["remat"]) and spec(c["algo"]).remat), []).append(r)
    return {k: sorted(v, key=lambda r: r["config"]["inner_steps"]) for k, v in out.items()}


_STYLE = {"maml": ("tab:red", "second order (MAML)"), "fomaml": ("tab:blue", "first order (FOMAML)"),
          "reptile": ("tab:green", "Reptile"), "pretrain": ("tab:gray", "pre-training"),
          "meta_sgd": ("tab:purple", "Meta-SGD"), "anil": ("tab:orange", "ANIL"), "mamlpp": ("tab:brown", "MAML++"),
          "imaml": ("tab:olive", "iMAML")}


@figure
def plot_vs_steps(results: list[dict], path: str, *, metric: str) -> None:
    """Time per meta-step (``metric="time"``) or peak memory (``"memory"``) against inner steps.

    One panel per setting; second vs first order, solid without remat and
    dashed with it; pre-training (no inner loop) is a horizontal line.
    """
    plt = pyplot()

    settings = list(dict.fromkeys(setting_name(r["config"]) for r in results))
    fig, axes = plt.subplots(1, max(len(settings), 1), figsize=(5.2 * max(len(settings), 1), 4.2), squeeze=False)
    all_steps = sorted({r["config"]["inner_steps"] for r in results if spec(r["config"]["algo"]).inner_loop}) or [1]
    for ax, setting in zip(axes[0], settings):
        for (algo, remat), rows in sorted(_series(results, setting).items()):
            color, name = _STYLE.get(algo, ("black", algo))
            if metric == "time":
                ys = [r["ms_per_step"] for r in rows]
            else:
                ys = [(r["memory"].get("step_bytes") or r["peak_bytes"] or 0) / 2**20 for r in rows]
            label = name + (" + remat" if remat else "")
            if not spec(algo).inner_loop:
                ax.axhline(ys[0], color=color, linestyle=":", label=label)
                continue
            xs = [r["config"]["inner_steps"] for r in rows]
            ax.plot(xs, ys, marker="o", color=color, linestyle="--" if remat else "-", label=label)
        ax.set_xscale("log")
        ax.set_xticks(all_steps)
        ax.set_xticklabels([str(s) for s in all_steps])
        ax.set_yscale("log")
        ax.set_xlabel("inner steps")
        ax.set_ylabel("ms per meta-step" if metric == "time" else "peak memory of the step (MiB, excl. image pool)")
        ax.set_title(setting)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    device = results[0]["device"] if results else {}
    where = (f"{device.get('backend', '?')} ({device.get('cpu_count', '?')} CPU cores)" if device.get("backend") == "cpu"
             else device.get("device_kind", "?"))
    fig.suptitle(f"{'time per meta-step' if metric == 'time' else 'XLA peak memory'} on {where}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def check_targets(results: list[dict], torch: dict | None = None) -> list[dict]:
    """The performance targets, each ``{"target", "value", "met"}`` (``met`` None: not measured)."""

    def find(setting_prefix, algo, steps, remat=False):
        for r in results:
            c = r["config"]
            if (setting_name(c).startswith(setting_prefix) and c["algo"] == algo
                    and (not spec(algo).inner_loop or c["inner_steps"] == steps)
                    and bool(c["remat"]) == remat and c.get("chunk_size") is None):
                return r
        return None

    out = []
    o5 = "omniglot 5-way 1-shot B32"
    base = find(o5, "maml", 1)
    out.append({"target": "5w1s B32 MAML 1 step >= 50% of matmul peak",
                "value": None if base is None else base["fraction_of_peak"],
                "met": None if base is None else base["fraction_of_peak"] >= 0.5})
    if torch:
        for style, row in torch.get("styles", {}).items():
            ratio = row.get("speedup_jax_vs_torch")
            out.append({"target": f"{torch.get('label', 'MAML')} >= 3x faster than torch ({style})",
                        "value": ratio, "met": None if ratio is None else ratio >= 3.0})
    for prefix in (o5, "omniglot 20-way 1-shot B16"):
        so, fo = find(prefix, "maml", 5), find(prefix, "fomaml", 5)
        ratio = None if so is None or fo is None else fo["ms_per_step"] / so["ms_per_step"]
        out.append({"target": f"{prefix}: FOMAML <= 0.7x MAML time at 5 steps", "value": ratio,
                    "met": None if ratio is None else ratio <= 0.7})
        one, many = find(prefix, "maml", 1, True), find(prefix, "maml", 25, True)
        ratio = None
        if one is not None and many is not None and one["memory"].get("step_bytes"):
            ratio = many["memory"]["step_bytes"] / one["memory"]["step_bytes"]
        out.append({"target": f"{prefix}: MAML+remat step memory at 25 steps <= 3x 1 step", "value": ratio,
                    "met": None if ratio is None else ratio <= 3.0})
    compiles = [r for r in results if r["config"]["algo"] == "maml" and r["config"]["task"] == "omniglot"]
    if compiles:
        worst = max(r["compile_s"] for r in compiles)
        out.append({"target": "Omniglot MAML compile < 10 s (max over the sweep)", "value": worst,
                    "met": worst < 10.0})
        by_steps: dict = {}
        for r in compiles:
            by_steps.setdefault(r["config"]["inner_steps"], []).append(r["compile_s"])
        if len(by_steps) > 1:
            meds = {s: statistics.median(v) for s, v in by_steps.items()}
            ratio = max(meds.values()) / min(meds.values())
            out.append({"target": "compile time independent of inner steps (max/min median over steps <= 1.5)",
                        "value": ratio, "met": ratio <= 1.5})
    return out


def format_targets(targets: list[dict]) -> str:
    """The targets as a markdown list."""
    lines = []
    for t in targets:
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "" if t["value"] is None else f" (measured {t['value']:.3g})"
        lines.append(f"- {t['target']}: **{mark}**{value}")
    return "\n".join(lines) + "\n"
