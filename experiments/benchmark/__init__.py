"""Meta-step performance: compile time, step time, peak memory, FLOPs, fraction of the matmul peak.

    python -m experiments.benchmark --setting maml-5w1s|maml-5w5s|maml-20w1s|maml-5w1s-q15|translation
        [--profile] [--torch] [--json OUT]
    python -m experiments.benchmark --task sinusoid|omniglot|translation [--ways N] [--shots K] [--queries Q]
        [--meta-batch B] [--inner-steps S] [--algo maml|fomaml|reptile|pretrain|...] [--remat]
        [--chunk-size C] [--conv-impl auto|patches|native] [--json OUT] [--torch]
    python -m experiments.benchmark --compare maml,anil [same problem options] [--json OUT]
    python -m experiments.benchmark --sweep [--quick] [--out DIR] [--settings ...] [--algos ...] [--torch]
    python -m experiments.benchmark --merge SWEEP.json [SWEEP.json ...] --out DIR

One configuration: compiles the meta-step ahead of time (trace + lower +
compile), times it one meta-step per dispatch and many per dispatch (the
compiled training loop), tasks sampled on the device inside the timed step,
reads XLA's memory analysis and counts the FLOPs, and measures the fp32 matmul
peak of the machine in the same process.  ``--json OUT`` writes the result.

``--compare A,B,...`` times the algorithms' training loops side by side on one
configuration (round-robin dispatches of ``--steps-per-dispatch`` meta-steps,
``--repeats`` rounds) and reports each median ms/step and its ratio to the
first algorithm, e.g. ANIL against MAML on Omniglot 5-way 1-shot.

The sweep runs algorithms x inner steps {1, 5, 10, 25} x remat {off, on} for
Omniglot 5-way 1-shot (B 32, Q 15), 20-way 1-shot (B 16, Q 15) and the
sinusoid, and writes ``DIR/sweep.json``, ``DIR/sweep.md``,
``DIR/time_vs_steps.png`` and ``DIR/memory_vs_steps.png``.

``--merge`` joins sweeps measured on one device (a sweep cut short and a
second one for the rest) into one report, keeping each configuration's first
measurement.

``--setting NAME`` picks a paper's training step (see
:data:`experiments.benchmark.pipeline.PROTOCOLS`); ``--profile`` times every op of the
compiled step.  ``--torch`` (needs PyTorch) compares the setting's exact
second-order MAML step with PyTorch's, each contestant alone in its own
process (:mod:`experiments.contestant`), alternated, after checking the
PyTorch meta-gradients against JAX's and a finite difference in float64.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from jaxmeta import profiling
from jaxmeta.algorithms.registry import ALGORITHMS
from jaxmeta.cli import ArgumentParser, choice_list, int_list, positive_int, writable_dir
from jaxmeta.distributed import cpu_count
from jaxmeta.errors import ConfigError


CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The checkout holding ``experiments`` (not installed): where ``python -m experiments.contestant`` runs."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> ArgumentParser:
    from experiments.benchmark import pipeline as bm

    parser = ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=tuple(bm.PROTOCOLS),
                        help="a paper's training step by name (" + ", ".join(bm.PROTOCOLS) + "); the problem "
                        "options below override it")
    bm.BenchConfig.add_flags(parser)
    parser.add_argument("--json", metavar="OUT", help="write the result as JSON (atomically)")
    parser.add_argument("--profile", action="store_true",
                        help="also time every op of the compiled step (jax.profiler trace): where the time goes")
    parser.add_argument("--matmul-ceiling", action="store_true",
                        help="also time each of the step's matrix products alone: the rate its matmuls reach here")
    parser.add_argument("--torch", action="store_true",
                        help="add the PyTorch comparison on this setting (exact second-order MAML, Omniglot), each "
                        "contestant in its own process")
    parser.add_argument("--torch-repeats", type=positive_int, default=5,
                        help="rounds of the comparison: each contestant runs one turn per round (default 5)")
    parser.add_argument("--torch-steps", type=positive_int, default=3,
                        help="timed meta-steps per contestant and turn (default 3)")
    parser.add_argument("--torch-warmup", type=positive_int, default=1,
                        help="untimed turns per contestant before the rounds (default 1)")
    parser.add_argument("--torch-threads", type=positive_int,
                        help="cores (and threads) of every contestant (default: all this process may use)")
    parser.add_argument("--compare", type=choice_list(ALGORITHMS), metavar="ALGOS",
                        help="time these algorithms side by side on the configuration (median ms/step and "
                        "ratio to the first), comma-separated, e.g. maml,anil")
    parser.add_argument("--sweep", action="store_true", help="run the sweep instead of one configuration")
    parser.add_argument("--merge", nargs="+", metavar="SWEEP_JSON",
                        help="merge sweep.json files measured on one device into one report in --out")
    parser.add_argument("--quick", action="store_true", help="a small sweep: inner steps 1 and 5, fewer timings")
    parser.add_argument("--out", default="runs/benchmark", help="sweep output directory")
    parser.add_argument("--settings", type=choice_list(tuple(bm.SWEEP_SETTINGS)), default=tuple(bm.SWEEP_SETTINGS),
                        help="sweep settings, comma-separated subset of " + ",".join(bm.SWEEP_SETTINGS))
    parser.add_argument("--algos", type=choice_list(ALGORITHMS), default=bm.SWEEP_ALGOS,
                        help="sweep algorithms (default " + ",".join(bm.SWEEP_ALGOS) + "), comma-separated subset of "
                        + ",".join(ALGORITHMS))
    parser.add_argument("--steps-list", type=int_list, default=bm.SWEEP_STEPS,
                        help="sweep inner steps, comma-separated (default 1,5,10,25)")
    return parser


TIMING_OPTIONS = ("repeats", "warmup", "steps_per_dispatch", "dispatch_repeats")


def _timing_overrides(args) -> dict:
    """The timing options given on the command line (the rest keep their defaults)."""
    return {k: getattr(args, k) for k in TIMING_OPTIONS if getattr(args, k) is not None}


PROBLEM_OPTIONS = ("task", "algo", "ways", "shots", "queries", "meta_batch", "inner_steps", "inner_lr", "classes")


def config_from_args(args):
    """The configuration of ``--setting`` (or the defaults), with the problem options given on the command line."""
    from experiments.benchmark.pipeline import PROTOCOLS, BenchConfig

    flags = BenchConfig.flag_values(args)
    given = {k: v for k, v in flags.items() if k in PROBLEM_OPTIONS}
    base = dict(PROTOCOLS[args.setting]) if args.setting else {}
    task = given.get("task", base.get("task", "omniglot"))
    if args.setting and task != base["task"]:
        base = {}  # another task: nothing of the setting applies
    # Defaults per task: sinusoid K=10 B25; omniglot 1-shot, 15 queries, B32; translation 16+16 pairs, B4.
    shots, queries, meta_batch = {"sinusoid": (10, 10, 25), "translation": (16, 16, 4)}.get(task, (1, 15, 32))
    problem = {"task": task, "algo": "maml", "ways": 5, "shots": shots, "queries": queries,
               "meta_batch": meta_batch, "inner_steps": 1, "classes": 1200, **base, **given}
    config = BenchConfig(**problem, **{k: v for k, v in flags.items() if k not in PROBLEM_OPTIONS})
    config.validate()
    return config


def _torch_module():
    try:
        from experiments import torch_reference
    except ImportError as e:
        raise ConfigError(f"--torch needs PyTorch ({e}); install it with: pip install torch==2.13.0") from None
    return torch_reference


CHECK_TASKS = 2
"""Tasks of the float64 gradient checks."""

CONTESTANTS = ("jax", "jax_loop", "autograd_loop", "torch_func_plain_bn")
"""The contestants of ``--torch``, each timed in its own process (see :mod:`experiments.contestant`).

``torch_func`` (torch.func through ``F.batch_norm``) is checked but not timed: its
second-order gradient is wrong (the check says so on every run)."""


def write_episode(config, path: str) -> dict:
    """Writes the shared episode of a comparison: setting, initial parameters, one task batch, JAX's meta-gradient.

    Every contestant times its meta-step on exactly this task batch, starting
    from exactly these parameters; the PyTorch gradient checks compare with
    this meta-gradient.
    """
    import json

    import jax
    import numpy as np

    from experiments.benchmark import pipeline as bm
    from jaxmeta.algorithms import maml_loss
    from jaxmeta.models import classification_loss, conv4_omniglot

    problem = bm.build_problem(config)
    tasks = jax.jit(problem.sample)(jax.random.PRNGKey(config.seed + 2), problem.data)
    model = conv4_omniglot(config.ways)
    meta_grad = jax.jit(lambda p, t: jax.grad(maml_loss, argnums=1)(
        classification_loss(model), p, t, steps=config.inner_steps, lr=config.effective_inner_lr, has_aux=True))
    grads = meta_grad(problem.params, tasks)
    # JAX's float64 meta-gradient on the first CHECK_TASKS tasks: PyTorch's float64 gradients of the same
    # tasks must match it to rounding, whatever float32 makes of a many-step ReLU meta-loss.
    with jax.enable_x64(True):
        first = jax.tree.map(lambda a: np.asarray(a)[:CHECK_TASKS], tasks)
        first = type(tasks)(*[(np.asarray(x, np.float64), y) for x, y in first])
        params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), problem.params)
        grads64 = jax.tree.map(np.asarray, meta_grad(params64, first))
    meta = {"ways": config.ways, "shots": config.shots, "queries": config.queries, "meta_batch": config.meta_batch,
            "inner_steps": config.inner_steps, "inner_lr": config.effective_inner_lr, "outer_lr": config.outer_lr,
            "second_order": True, "outer": f"adam({config.outer_lr})", "check_tasks": CHECK_TASKS}
    arrays = {"meta": np.array(json.dumps(meta)),
              "support_x": tasks.support[0], "support_y": tasks.support[1],
              "query_x": tasks.query[0], "query_y": tasks.query[1]}
    for prefix, tree in (("param", problem.params), ("grad", grads), ("grad64", grads64)):
        for layer, leaves in tree.items():
            for leaf, value in leaves.items():
                arrays[f"{prefix}/{layer}/{leaf}"] = np.asarray(value)
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return meta


class _Contestant:
    """A contestant's process, driven over its standard input one JSON line at a time."""

    def __init__(self, name: str, episode: str, threads: int, timeout: float):
        import subprocess

        self.name, self.timeout = name, timeout
        self.stderr = open(episode + f".{name}.stderr", "w+", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.contestant", "--contestant", name, "--episode", episode,
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            cwd=CHECKOUT)
        self.ready = self._read()

    def _read(self) -> dict:
        import json
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-1:] or ["no output"]
            self.close()
            raise ConfigError(f"--torch: the {self.name} process stopped or timed out ({tail[0]})")
        return json.loads(line)

    def run(self, steps: int) -> list[float]:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a stuck process is killed
                self.proc.kill()
        self.stderr.close()


TORCH_ALGORITHMS = ("maml",)
"""What the PyTorch references (:mod:`experiments.torch_reference`) implement: exact second-order MAML."""


def check_torch_config(config) -> None:
    """Refuses, in one line, a configuration the PyTorch references do not implement."""
    if config.task != "omniglot" or config.algo not in TORCH_ALGORITHMS or config.remat or config.chunk_size:
        raise ConfigError("--torch compares exact second-order MAML on Omniglot (no --remat, no --chunk-size)")


def torch_comparison(config, args, *, contestants: Sequence[str] = CONTESTANTS) -> dict:
    """Times JAX and the PyTorch styles on one setting, each in its own process, alternated.

    One process per contestant, all pinned to the same ``--torch-threads``
    cores with as many threads; the same initial parameters and task batch
    (:func:`write_episode`); one untimed warm-up turn each, then
    ``--torch-repeats`` rounds in which every contestant runs
    ``--torch-steps`` meta-steps in turn (the order rotates every round) while
    the others wait idle.  Reports each contestant's median (and spread) over
    its timed meta-steps, the JAX speed-up over each PyTorch style (ratio of
    medians, and the median of the per-round ratios), and, before any
    timing, the PyTorch meta-gradients' checks against JAX's and a float64
    finite difference (:mod:`experiments.contestant` ``--check``).
    """
    import json
    import statistics
    import subprocess
    import tempfile

    check_torch_config(config)
    threads = args.torch_threads or cpu_count()
    log = lambda m: _say(f"[torch] {m}")  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="jaxmeta-torch-") as tmp:
        episode = os.path.join(tmp, "episode.npz")
        meta = write_episode(config, episode)
        checks: dict = {}
        if any(not c.startswith("jax") for c in contestants):
            log("checking the PyTorch meta-gradients against JAX's and a float64 finite difference")
            done = subprocess.run([sys.executable, "-m", "experiments.contestant", "--check", "--episode", episode,
                                   "--threads", str(threads)], capture_output=True, text=True, timeout=3600,
                                  cwd=CHECKOUT)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise ConfigError(f"--torch: the gradient check failed ({tail})")
            checks = json.loads(done.stdout.strip().splitlines()[-1])
            for name in contestants:
                if name in checks:
                    log(f"{name}: {checks[name]['verdict']}")
        procs: dict[str, _Contestant] = {}
        try:
            for name in contestants:
                log(f"starting {name} in its own process")
                procs[name] = _Contestant(name, episode, threads, timeout=1800)
                for _ in range(args.torch_warmup):  # untimed turns (JAX: compilation)
                    procs[name].run(args.torch_steps)
            times: dict[str, list[float]] = {name: [] for name in contestants}
            turns: dict[str, list[float]] = {name: [] for name in contestants}
            order = list(contestants)
            for r in range(args.torch_repeats):
                for name in order[r % len(order):] + order[:r % len(order)]:
                    time.sleep(0.3)  # let the previous contestant's worker threads go idle
                    t = procs[name].run(args.torch_steps)
                    times[name] += t
                    turns[name].append(statistics.median(t))
                log(f"round {r + 1}/{args.torch_repeats}: " + ", ".join(
                    f"{n} {1e3 * turns[n][-1]:.4g} ms" for n in contestants))
            pids = {name: p.ready["pid"] for name, p in procs.items()}
        finally:
            for p in procs.values():
                p.close()
    rows = {}
    for name in contestants:
        ms = [1e3 * t for t in times[name]]
        rows[name] = {**profiling.spread(ms), "ms_per_step": statistics.median(ms), "pid": pids[name]}
    jax_rows = {n: r for n, r in rows.items() if n.startswith("jax")}
    # The headline JAX figure is the training loop's form (many meta-steps per dispatch) when it ran.
    headline = "jax_loop" if "jax_loop" in jax_rows else next(iter(jax_rows), None)
    styles = {}
    for name in contestants:
        if name in jax_rows:
            continue
        row = {**rows[name], "grad_check": checks.get(name)}
        row["speedup_by_jax"] = {j: row["ms_per_step"] / r["ms_per_step"] for j, r in jax_rows.items()}
        row["paired_speedup_by_jax"] = {j: statistics.median(b / a for a, b in zip(turns[j], turns[name]))
                                        for j in jax_rows}
        if headline:
            row["speedup_jax_vs_torch"] = row["speedup_by_jax"][headline]
            row["paired_speedup_median"] = row["paired_speedup_by_jax"][headline]
        if checks.get(name) and not checks[name]["ok"]:
            row["note"] = "meta-gradient does not match: timing reported but not trusted"
        styles[name] = row
        log(f"{name}: {row['ms_per_step']:.4g} ms/step; " + ", ".join(
            f"{j} ({r['ms_per_step']:.4g} ms/step) {row['speedup_by_jax'][j]:.2f}x faster "
            f"(per round {row['paired_speedup_by_jax'][j]:.2f}x)" for j, r in jax_rows.items()))
    trusted = [r["ms_per_step"] for r in styles.values() if (r.get("grad_check") or {}).get("ok")]
    report = {
        "setting": args.setting, "label": config.label(), "config": meta,
        "threads": threads, "rounds": args.torch_repeats, "steps_per_turn": args.torch_steps,
        "warmup_turns": args.torch_warmup, "jax": jax_rows, "headline_jax": headline, "styles": styles,
        "float64_checks": checks.get("float64"),
        "speedup_vs_fastest_correct_torch": (min(trusted) / jax_rows[headline]["ms_per_step"])
        if trusted and headline else None,
        "method": "each contestant in its own process, pinned to the same cores with the same thread count; the "
                  "same parameters and task batch; one warm-up turn each; rounds of one turn per contestant, the "
                  "order rotated every round, the others idle; medians over the timed meta-steps",
    }
    try:
        import torch  # noqa: F401 - the version only

        report["torch_version"] = torch.__version__
    except ImportError:
        pass
    return report


def run_single(args) -> dict:
    from experiments.benchmark import pipeline as bm
    from jaxmeta.io import write_json

    config = config_from_args(args)
    if args.torch:  # fail early, before minutes of JAX measurements
        check_torch_config(config)
        _torch_module()
    if args.json:
        writable_dir(os.path.dirname(os.path.abspath(args.json)))
    _say("measuring the fp32 matmul peak")
    peak = profiling.matmul_peak_gflops()
    _say(f"  matmul peak {peak['peak_gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f})")
    _say(config.label())
    result = bm.benchmark(config, matmul_peak=peak, ceiling=args.matmul_ceiling, profile=args.profile,
                          log=lambda m: _say(f"  {m}"))
    _say("  " + bm.summary_line(result))
    if args.profile:
        _say(profiling.format_profile(result["profile"]))
    if args.matmul_ceiling:
        for row in result["matmul_ceiling"]["shapes"][:8]:
            _say(f"    {row['lhs']} x {row['rhs']} x{row['count']:g}: {row['gflops_per_s']:.4g} GFLOP/s, "
                 f"{100 * row['time_share']:.0f}% of the matmul time")
    if args.torch:
        result["torch"] = torch_comparison(config, args)
        result["torch"]["jax_benchmark_ms_per_step"] = result["ms_per_step"]
    if args.json:
        write_json(args.json, result)
        _say(f"wrote {args.json}")
    print(bm.summary_line(result))
    return result


def run_compare(args) -> dict:
    from experiments.benchmark import pipeline as bm
    from jaxmeta.io import write_json

    if args.sweep or args.torch:
        raise ConfigError("--compare runs alone: drop --sweep and --torch")
    if len(args.compare) < 2 or len(set(args.compare)) != len(args.compare):
        raise ConfigError(f"--compare needs two or more different algorithms, got {','.join(args.compare)}")
    config = config_from_args(args)
    if args.json:
        writable_dir(os.path.dirname(os.path.abspath(args.json)))
    _say(f"{config.label().replace(f' {config.algo} ', ' ')}: comparing {', '.join(args.compare)}")
    report = bm.compare_algorithms(config, args.compare, log=lambda m: _say(f"  {m}"))
    if args.json:
        write_json(args.json, report)
        _say(f"wrote {args.json}")
    print(bm.comparison_line(report))
    return report


def run_sweep(args) -> dict:
    from experiments.benchmark import pipeline as bm

    if args.torch:
        _torch_module()
    out_dir = writable_dir(args.out)
    overrides = {k: getattr(args, k) for k in ("conv_impl", "classes", "seed") if getattr(args, k) is not None}
    overrides.update(_timing_overrides(args))
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    configs = bm.sweep_configs(args.settings, args.algos, args.steps_list, quick=args.quick, **overrides)
    for c in configs:
        c.validate()
    started = time.perf_counter()
    _say("measuring the fp32 matmul peak")
    peak = profiling.matmul_peak_gflops()
    _say(f"  matmul peak {peak['peak_gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f})")
    results = []
    sweep = {"results": results, "matmul_peak": peak, "device": bm.device_description(), "quick": args.quick}

    def save(plots=False):
        sweep["wall_s"] = time.perf_counter() - started
        write_sweep(sweep, out_dir, plots=plots)

    for i, config in enumerate(configs, 1):
        _say(f"[{i}/{len(configs)}] {config.label()}")
        result = bm.benchmark(config, matmul_peak=peak, log=lambda m: _say(f"    {m}"))
        # Keep the GEMM rate sampled right after this configuration (a load indicator), not the repeats.
        result["matmul_peak"] = {"after_gflops": result["matmul_peak"].get("after_gflops")}
        results.append(result)
        _say(f"[{i}/{len(configs)}] {bm.summary_line(result)}")
        save()
    if args.torch:
        sweep["torch"] = torch_comparison(config_from_args(args), args)
    save(plots=True)
    print(bm.format_table(results))
    print(bm.format_targets(sweep["targets"]))
    print(f"wrote {out_dir}/sweep.json, sweep.md, time_vs_steps.png, memory_vs_steps.png "
          f"in {sweep['wall_s']:.0f} s")
    return sweep


def write_sweep(sweep: dict, out_dir: str, *, plots: bool = True) -> None:
    """Writes ``sweep.json`` and ``sweep.md`` (and, with ``plots``, the two figures) for a sweep."""
    from experiments.benchmark import pipeline as bm
    from jaxmeta.io import atomic_write_text, write_json

    results, peak, device = sweep["results"], sweep["matmul_peak"], sweep["device"]
    sweep["targets"] = bm.check_targets(results, sweep.get("torch"))
    write_json(os.path.join(out_dir, "sweep.json"), sweep)
    md = ["# jaxmeta benchmark sweep\n",
          (f"Device: {device['backend']} ({device['device_kind']}, {device['cpu_count']} CPU cores), "
           f"jax {device['jax']}; fp32 matmul peak {peak['peak_gflops']:.1f} GFLOP/s "
           f"(2048x2048, best of {len(peak['times_s'])}).\n"),
          ("ms/step (many/dispatch): meta-steps run in one compiled scan; 1/dispatch: one meta-step per call. "
           "Peak: XLA memory analysis (temp + arguments + outputs); step MiB excludes the image pool.\n")]
    if sweep.get("merged_from"):
        md.append("Merged from " + ", ".join(sweep["merged_from"]) + " (same device; first measurement of a "
                  "configuration kept; the matmul peak is the first sweep's).\n")
    md += [bm.format_table(results), "\n## Targets\n", bm.format_targets(sweep["targets"])]
    if sweep.get("torch"):
        md.append("\n## PyTorch comparison\n")
        md.append(torch_markdown(sweep["torch"]))
    atomic_write_text(os.path.join(out_dir, "sweep.md"), "\n".join(md))
    if plots:
        for name, metric in (("time_vs_steps.png", "time"), ("memory_vs_steps.png", "memory")):
            bm.plot_vs_steps(results, os.path.join(out_dir, name), metric=metric)


def _read_sweep(path: str) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            sweep = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read sweep {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSON: {e.msg} (line {e.lineno})") from None
    if (not isinstance(sweep, dict) or not {"results", "matmul_peak", "device"} <= sweep.keys()
            or not {"backend", "device_kind"} <= set(sweep["device"])
            or not all(isinstance(r, dict) and {"config", "ms_per_step"} <= r.keys() for r in sweep["results"])):
        raise ConfigError(f"{path} is not a sweep.json written by --sweep")
    return sweep


def run_merge(args) -> dict:
    """Merges sweeps measured on one device (e.g. a sweep cut short and its remainder) into one report."""
    from experiments.benchmark import pipeline as bm

    sweeps = [_read_sweep(path) for path in args.merge]
    device = sweeps[0]["device"]
    for path, sweep in zip(args.merge[1:], sweeps[1:]):
        if (sweep["device"]["backend"], sweep["device"]["device_kind"]) != (device["backend"], device["device_kind"]):
            raise ConfigError(f"{path} was measured on {sweep['device']['device_kind']}, "
                              f"not on {device['device_kind']} like {args.merge[0]}")
    seen, results = set(), []
    for sweep in sweeps:
        for result in sweep["results"]:
            key = tuple(sorted((k, str(v)) for k, v in result["config"].items()))
            if key not in seen:
                seen.add(key)
                results.append(result)
    order = {algo: i for i, algo in enumerate(ALGORITHMS)}
    settings = list(dict.fromkeys(bm.setting_name(r["config"]) for r in results))
    results.sort(key=lambda r: (settings.index(bm.setting_name(r["config"])), order.get(r["config"]["algo"], 99),
                                r["config"]["inner_steps"], bool(r["config"]["remat"])))
    merged = {"results": results, "matmul_peak": sweeps[0]["matmul_peak"], "device": device,
              "quick": any(s.get("quick") for s in sweeps), "merged_from": list(args.merge),
              "wall_s": sum(s.get("wall_s", 0.0) for s in sweeps),
              "torch": next((s["torch"] for s in sweeps if s.get("torch")), None)}
    out_dir = writable_dir(args.out)
    write_sweep(merged, out_dir)
    print(bm.format_table(results))
    print(bm.format_targets(merged["targets"]))
    print(f"merged {len(results)} configurations from {len(sweeps)} sweeps into {out_dir}/sweep.json, sweep.md, "
          "time_vs_steps.png, memory_vs_steps.png")
    return merged


def torch_markdown(report: dict) -> str:
    """The comparison as a Markdown table (JAX first, then each PyTorch style)."""
    lines = ["| contestant | ms / meta-step (median) | IQR | JAX speed-up (medians; per round) | gradient check |",
             "|---|---|---|---|---|"]
    described = {"jax": "jaxmeta, 1 meta-step per call", "jax_loop": "jaxmeta, the turn's meta-steps in one call "
                 "(the training loop's form)"}
    for name, row in report["jax"].items():
        lines.append(f"| {described.get(name, name)} | {row['ms_per_step']:.4g} | {row['iqr']:.3g} | — | reference |")
    for style, row in report["styles"].items():
        check = (row.get("grad_check") or {}).get("verdict", "not checked")
        speed = "; ".join(f"{j}: {row['speedup_by_jax'][j]:.2f}x, {row['paired_speedup_by_jax'][j]:.2f}x"
                          for j in report["jax"]) or "—"
        lines.append(f"| PyTorch {report.get('torch_version', '')} {style} | {row['ms_per_step']:.4g} | "
                     f"{row['iqr']:.3g} | {speed} | {check} |")
    return (f"{report['label']}, {report['threads']} threads each, {report['rounds']} rounds of "
            f"{report['steps_per_turn']} meta-steps per contestant.\n\n" + "\n".join(lines)
            + "\n\n" + report["method"] + ".\n")


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.matmul_ceiling and (args.merge or args.compare or args.sweep):
        raise ConfigError("--matmul-ceiling measures one configuration: drop --sweep, --compare and --merge")
    if args.merge:
        return run_merge(args)
    if args.compare:
        return run_compare(args)
    return run_sweep(args) if args.sweep else run_single(args)

