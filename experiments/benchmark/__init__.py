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
PyTorch meta-gradients against JAX's and a finite difference in float64
(:mod:`experiments.benchmark.torch_comparison`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from experiments.benchmark.torch_comparison import (
    CONTESTANTS,
    TORCH_ALGORITHMS,
    _torch_module,
    check_torch_config,
    torch_comparison,
    torch_markdown,
    write_episode,
)
from jaxmeta import profiling
from jaxmeta.algorithms.registry import ALGORITHMS
from jaxmeta.cli import ArgumentParser, choice_list, int_list, positive_int, writable_dir
from jaxmeta.errors import ConfigError

__all__ = ["CONTESTANTS", "TORCH_ALGORITHMS", "build_parser", "check_torch_config", "main", "torch_comparison",
           "torch_markdown", "write_episode"]




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


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.matmul_ceiling and (args.merge or args.compare or args.sweep):
        raise ConfigError("--matmul-ceiling measures one configuration: drop --sweep, --compare and --merge")
    if args.merge:
        return run_merge(args)
    if args.compare:
        return run_compare(args)
    return run_sweep(args) if args.sweep else run_single(args)

