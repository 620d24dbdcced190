"""Meta-step performance: compile time, step time, peak memory, FLOPs, fraction of the matmul peak.

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

``--torch`` (needs PyTorch) adds the PyTorch reference of the Omniglot 5-way
1-shot B32 Q15 one-step second-order MAML step (torch.func and an autograd
loop), checks its meta-gradient against JAX's, and reports JAX/torch ratios.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from jaxmeta.algorithms.registry import ALGORITHMS
from jaxmeta.cli import ArgumentParser, choice_list, int_list, positive_float, positive_int, run, writable_dir
from jaxmeta.errors import ConfigError

TORCH_CONFIG = {"task": "omniglot", "algo": "maml", "ways": 5, "shots": 1, "queries": 15, "meta_batch": 32,
                "inner_steps": 1, "remat": False, "chunk_size": None}
"""The configuration the PyTorch comparison is made on."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> ArgumentParser:
    from jaxmeta import benchmarking as bm
    from jaxmeta.models import CONV_IMPLS

    parser = ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=bm.TASKS, default="omniglot")
    parser.add_argument("--algo", choices=ALGORITHMS, default="maml")
    parser.add_argument("--ways", type=positive_int, default=5, help="classes per task (Omniglot)")
    parser.add_argument("--shots", type=positive_int, help="support examples per class (default 1; sinusoid 10)")
    parser.add_argument("--queries", type=positive_int,
                        help="query examples per class (default 15; sinusoid 10 points)")
    parser.add_argument("--meta-batch", type=positive_int, help="tasks per meta-step (default 32; sinusoid 25)")
    parser.add_argument("--inner-steps", type=positive_int, default=1)
    parser.add_argument("--inner-lr", type=positive_float, help="default 0.4 (Omniglot), 0.01 (sinusoid)")
    parser.add_argument("--outer-lr", type=positive_float, default=1e-3)
    parser.add_argument("--remat", action="store_true",
                        help="rematerialise inner steps (algorithms that differentiate through them)")
    parser.add_argument("--chunk-size", type=positive_int,
                        help="tasks per lax.map chunk (default: vmap over the whole meta-batch)")
    parser.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto")
    parser.add_argument("--classes", type=positive_int, default=1200,
                        help="classes in the random Omniglot image pool")
    parser.add_argument("--repeats", type=positive_int, help="timed one-step dispatches (default 10)")
    parser.add_argument("--warmup", type=positive_int, help="untimed dispatches before timing (default 2)")
    parser.add_argument("--steps-per-dispatch", type=positive_int,
                        help="meta-steps per dispatch in the many-steps timing (default 10; sweep 5)")
    parser.add_argument("--dispatch-repeats", type=positive_int,
                        help="timed many-step dispatches (default 3; sweep 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="write the result as JSON (atomically)")
    parser.add_argument("--matmul-ceiling", action="store_true",
                        help="also time each of the step's matrix products alone: the rate its matmuls reach here")
    parser.add_argument("--torch", action="store_true",
                        help="add the PyTorch comparison (5-way 1-shot B32 Q15, 1 step, second order)")
    parser.add_argument("--torch-repeats", type=positive_int, default=5, help="timed torch meta-steps per style")
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


def config_from_args(args):
    from jaxmeta.benchmarking import BenchConfig

    # Defaults per task: sinusoid K=10 B25; omniglot 1-shot, 15 queries, B32; translation 16+16 pairs, B4.
    shots, queries, meta_batch = {"sinusoid": (10, 10, 25), "translation": (16, 16, 4)}.get(args.task, (1, 15, 32))
    config = BenchConfig(
        task=args.task,
        algo=args.algo,
        ways=args.ways,
        shots=args.shots or shots,
        queries=args.queries or queries,
        meta_batch=args.meta_batch or meta_batch,
        inner_steps=args.inner_steps,
        remat=args.remat,
        chunk_size=args.chunk_size,
        conv_impl=args.conv_impl,
        inner_lr=args.inner_lr,
        outer_lr=args.outer_lr,
        classes=args.classes,
        seed=args.seed,
        **_timing_overrides(args),
    )
    config.validate()
    return config


def _torch_module():
    try:
        from experiments import torch_reference
    except ImportError as e:
        raise ConfigError(f"--torch needs PyTorch ({e}); install it with: pip install torch==2.13.0") from None
    return torch_reference


def _jax_contestants(steps_per_dispatch: int, log) -> dict:
    """The JAX meta-step of the torch configuration as ``name -> (run, steps per run)`` closures."""
    import jax

    from jaxmeta import benchmarking as bm
    from jaxmeta.training import init_train_state

    problem = bm.build_problem(bm.BenchConfig(**TORCH_CONFIG))
    state = [init_train_state(problem.learner, problem.params, jax.random.PRNGKey(1))]
    one, many = bm.step_programs(problem, steps_per_dispatch)
    log("compiling the JAX programs for the interleaved comparison")
    programs = {"jax_one_per_dispatch": (one.lower(state[0], problem.data).compile(), 1),
                f"jax_{steps_per_dispatch}_per_dispatch": (many.lower(state[0], problem.data).compile(),
                                                          steps_per_dispatch)}

    def runner(compiled):
        def run_once():
            out = compiled(state[0], problem.data)
            jax.block_until_ready(out)
            state[0] = out[0]
        return run_once

    return {name: (runner(c), n) for name, (c, n) in programs.items()}


def torch_comparison(jax_result: dict | None, args) -> dict:
    """Times the torch reference round-robin with the JAX step of the same configuration.

    The JAX/torch ratios come from these interleaved timings (the load of a
    shared machine hits every contestant alike); ``jax_result``, when it is
    the same configuration, is reported beside them.
    """
    torch_reference = _torch_module()
    steps = args.steps_per_dispatch or 5
    log = lambda m: _say(f"[torch] {m}")
    others = _jax_contestants(steps, log)
    report = torch_reference.compare(repeats=args.torch_repeats, log=log, others=others)
    jax_ms = {name: row["ms_per_step"] for name, row in report["others"].items() if "ms_per_step" in row}
    best_jax = min(jax_ms.values())
    report["jax_ms_per_step"] = jax_ms
    report["jax_best_ms_per_step"] = best_jax
    if jax_result is not None and all(jax_result["config"].get(k) == v for k, v in TORCH_CONFIG.items()):
        report["jax_benchmark_ms_per_step"] = jax_result["ms_per_step"]
    for style, row in report["styles"].items():
        if not row.get("ms_per_step"):
            continue
        row["speedup_jax_vs_torch"] = row["ms_per_step"] / best_jax
        row["speedup_by_jax_program"] = {name: row["ms_per_step"] / ms for name, ms in jax_ms.items()}
        row["ratio_jax_over_torch"] = best_jax / row["ms_per_step"]
        _say(f"[torch] {style}: {row['ms_per_step']:.4g} ms/step; JAX ({best_jax:.4g} ms/step) is "
             f"{row['speedup_jax_vs_torch']:.2f}x faster; gradient check: {row['grad_check']['verdict']}")
    return report


def run_single(args) -> dict:
    from jaxmeta import benchmarking as bm
    from jaxmeta.io import write_json

    config = config_from_args(args)
    if args.torch:
        _torch_module()  # fail early, before minutes of JAX measurements
    if args.json:
        writable_dir(os.path.dirname(os.path.abspath(args.json)))
    _say("measuring the fp32 matmul peak")
    peak = bm.matmul_peak_gflops()
    _say(f"  matmul peak {peak['peak_gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f})")
    _say(config.label())
    result = bm.benchmark(config, matmul_peak=peak, ceiling=args.matmul_ceiling, log=lambda m: _say(f"  {m}"))
    _say("  " + bm.summary_line(result))
    if args.matmul_ceiling:
        for row in result["matmul_ceiling"]["shapes"][:8]:
            _say(f"    {row['lhs']} x {row['rhs']} x{row['count']:g}: {row['gflops_per_s']:.4g} GFLOP/s, "
                 f"{100 * row['time_share']:.0f}% of the matmul time")
    if args.torch:
        result["torch"] = torch_comparison(result, args)
    if args.json:
        write_json(args.json, result)
        _say(f"wrote {args.json}")
    print(bm.summary_line(result))
    return result


def run_compare(args) -> dict:
    from jaxmeta import benchmarking as bm
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
    from jaxmeta import benchmarking as bm

    if args.torch:
        _torch_module()
    out_dir = writable_dir(args.out)
    overrides = {k: getattr(args, k) for k in ("conv_impl", "classes", "seed")}
    overrides.update(_timing_overrides(args))
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    configs = bm.sweep_configs(args.settings, args.algos, args.steps_list, quick=args.quick, **overrides)
    for c in configs:
        c.validate()
    started = time.perf_counter()
    _say("measuring the fp32 matmul peak")
    peak = bm.matmul_peak_gflops()
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
        base = next((r for r in results if all(r["config"].get(k) == v for k, v in TORCH_CONFIG.items())), None)
        sweep["torch"] = torch_comparison(base, args)
    save(plots=True)
    print(bm.format_table(results))
    print(bm.format_targets(sweep["targets"]))
    print(f"wrote {out_dir}/sweep.json, sweep.md, time_vs_steps.png, memory_vs_steps.png "
          f"in {sweep['wall_s']:.0f} s")
    return sweep


def write_sweep(sweep: dict, out_dir: str, *, plots: bool = True) -> None:
    """Writes ``sweep.json`` and ``sweep.md`` (and, with ``plots``, the two figures) for a sweep."""
    from jaxmeta import benchmarking as bm
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
        md.append("\n## PyTorch comparison (5-way 1-shot B32 Q15, 1 step, second order)\n")
        md.append(_torch_markdown(sweep["torch"]))
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
    from jaxmeta import benchmarking as bm

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


def _torch_markdown(report: dict) -> str:
    names = list(report["jax_ms_per_step"])
    head = "| style | ms/step | " + " | ".join(f"speed-up of {n}" for n in names) + " | gradient check |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        lines.append(f"| {name} | {report['jax_ms_per_step'][name]:.4g} (JAX) |" + " |" * len(names) + " |")
    for style, row in report["styles"].items():
        if not row.get("ms_per_step"):
            lines.append(f"| {style} | failed: {row.get('error', '?')} |" + " |" * len(names) + " |")
            continue
        ups = " | ".join(f"{row['speedup_by_jax_program'][n]:.2f}x" for n in names)
        lines.append(f"| {style} | {row['ms_per_step']:.4g} | {ups} | {row['grad_check']['verdict']} |")
    return "\n".join(lines) + "\n\nTimed round-robin in one process (same load for all); " + report["note"] + ".\n"


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.matmul_ceiling and (args.merge or args.compare or args.sweep):
        raise ConfigError("--matmul-ceiling measures one configuration: drop --sweep, --compare and --merge")
    if args.merge:
        return run_merge(args)
    if args.compare:
        return run_compare(args)
    return run_sweep(args) if args.sweep else run_single(args)


if __name__ == "__main__":
    run(main)
