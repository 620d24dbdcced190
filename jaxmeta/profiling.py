"""Measuring compiled JAX programs: FLOPs from the jaxpr, the matmul peak, step times, HLO profiles, memory.

Library pieces that :mod:`experiments.benchmark` composes into its reports,
usable on any jitted function:

* **FLOPs** of a program, counted on its jaxpr with every ``scan``
  multiplied by its length (XLA's ``cost_analysis`` counts a loop body once,
  whatever its trip count, so it under-reports multi-step inner loops);
* the **fp32 matmul peak** of the machine (:func:`matmul_peak_gflops`) and the
  rate of a program's own matrix products alone (:func:`matmul_ceiling`);
* **timing** (:func:`timed_calls`, :func:`spread`) with every call blocked on;
* an **op-by-op profile** of a compiled program (:func:`profile_step`);
* **peak memory** from XLA's memory analysis (:func:`memory_summary`).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------- FLOPs

_ELEMENTWISE = frozenset(
    [
        "abs", "add", "add_any", "atan2", "cbrt", "ceil", "clamp", "cos", "div", "erf", "erf_inv", "exp",
        "exp2", "expm1", "floor", "integer_pow", "log", "log1p", "logistic", "max", "min", "mul", "neg",
        "nextafter", "pow", "reciprocal", "rem", "round", "rsqrt", "select_n", "sign", "sin", "sqrt",
        "square", "sub", "tan", "tanh"
    ]
)
_REDUCTIONS = frozenset(
    [
        "argmax", "argmin", "cumlogsumexp", "cummax", "cummin", "cumprod", "cumsum", "reduce_max",
        "reduce_min", "reduce_prod", "reduce_sum"
    ]
)


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _sub_jaxprs(value):
    """Jaxprs held by an equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


_MATMULS = ("dot_general", "conv_general_dilated")


def _walk(jaxpr) -> tuple[list[tuple[Any, float]], int]:
    """The leaf equations of a (closed) jaxpr with how often each runs, and the count of ``while`` loops.

    Nested jaxprs are followed: a ``scan`` body runs ``length`` times, a
    ``cond`` counts only its most expensive branch (by :func:`_eqn_flops`), a
    ``while`` loop (trip count unknown) counts its body once.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    leaves: list[tuple[Any, float]] = []
    unknown = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        subs = [] if name in _MATMULS else [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            leaves.append((eqn, 1.0))
            continue
        walked = [_walk(j) for j in subs]
        if name == "cond":
            walked = [max(walked, key=lambda w: sum(_eqn_flops(e)[0] * t for e, t in w[0]))]
        times = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
        unknown += name == "while"
        for inner, loops in walked:
            leaves.extend((e, times * t) for e, t in inner)
            unknown += loops
    return leaves, unknown


def _eqn_flops(eqn) -> tuple[float, float]:
    """``(total, matmul)`` FLOPs of one leaf equation (see :func:`count_flops`)."""
    name = eqn.primitive.name
    if name == "dot_general":
        f = _dot_flops(_dot_key(eqn))
        return f, f
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
        k = rhs.shape[rhs_spec[1]] * math.prod(rhs.shape[d] for d in rhs_spec[2:])
        f = 2.0 * _size(eqn.outvars[0].aval) * k
        return f, f
    if name in _ELEMENTWISE:
        return float(_size(eqn.outvars[0].aval)), 0.0
    if name in _REDUCTIONS:
        return float(_size(eqn.invars[0].aval)), 0.0
    return 0.0, 0.0


def count_flops(jaxpr) -> dict[str, float]:
    """FLOPs of a (closed) jaxpr: ``{"total", "matmul", "unknown_loops"}``.

    ``matmul`` counts ``dot_general`` and convolutions (2 per multiply-add);
    ``total`` adds one FLOP per element of every arithmetic elementwise op and
    per input element of every reduction.  A ``scan`` body counts ``length``
    times; a ``cond`` counts its most expensive branch; a ``while`` loop (trip
    count unknown) counts its body once and is tallied in ``unknown_loops``.
    """
    leaves, unknown = _walk(jaxpr)
    total = matmul = 0.0
    for eqn, times in leaves:
        t, m = _eqn_flops(eqn)
        total += times * t
        matmul += times * m
    return {"total": total, "matmul": matmul, "unknown_loops": unknown}


def matmul_shapes(jaxpr) -> dict[tuple, float]:
    """The step's matrix products: ``{(lhs shape, rhs shape, dimension numbers, dtype): count}``.

    Every ``dot_general`` of the (closed) jaxpr, counted as :func:`count_flops`
    counts it (the same walk: a ``scan`` body ``length`` times, a ``cond``'s
    most expensive branch).  Convolutions are not included.
    """
    out: dict[tuple, float] = {}
    for eqn, times in _walk(jaxpr)[0]:
        if eqn.primitive.name == "dot_general":
            key = _dot_key(eqn)
            out[key] = out.get(key, 0.0) + times
    return out


def _dot_key(eqn) -> tuple:
    """A ``dot_general`` equation as ``(lhs shape, rhs shape, dimension numbers, dtype)``."""
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    dn = tuple(tuple(tuple(int(d) for d in ax) for ax in part) for part in eqn.params["dimension_numbers"])
    return tuple(lhs.shape), tuple(rhs.shape), dn, str(lhs.dtype)


def _dot_flops(key: tuple) -> float:
    """FLOPs of a product given by :func:`_dot_key`: 2 per multiply-add."""
    lhs, rhs, ((lc, rc), (lb, rb)), _ = key
    batch = math.prod(lhs[d] for d in lb)
    k = math.prod(lhs[d] for d in lc)
    m = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    n = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return 2.0 * batch * m * n * k


def matmul_ceiling(jaxpr, *, repeats: int = 5, log: Callable[[str], None] | None = None) -> dict:
    """Times every distinct matrix product of a step alone: the rate its matmuls can reach here.

    Each shape is compiled on its own and timed: rounds of about 20 ms of
    calls dispatched back to back, best of ``repeats`` rounds after a warm-up
    (the per-call dispatch cost, microseconds, is included: it dominates only
    for tiny products).  ``seconds`` sums best time × count over the step.  The step's
    matmul FLOPs over that time is what back-to-back matmuls of exactly these
    shapes achieve on this machine, an upper bound for a step whose time is
    all matmul: compare it with :func:`matmul_peak_gflops` (one large square
    product).

    Returns:
      ``{"gflops_per_s", "seconds", "matmul_flops", "shapes": [...]}``, shapes
      sorted by their share of the time.
    """
    log = log or (lambda _msg: None)
    shapes = matmul_shapes(jaxpr)
    rows, total_s, total_f = [], 0.0, 0.0
    key = jax.random.PRNGKey(0)
    for (lhs, rhs, dn, dtype), count in shapes.items():
        a = jax.random.normal(key, lhs, dtype)
        b = jax.random.normal(key, rhs, dtype)
        fn = jax.jit(lambda x, y, dn=dn: jax.lax.dot_general(x, y, dn))
        fn(a, b).block_until_ready()  # compiles
        t0 = time.perf_counter()
        out = fn(a, b).block_until_ready()
        # About 20 ms a round, holding at most 256 MiB of outputs at once.
        calls = min(1000, int(0.02 / max(time.perf_counter() - t0, 1e-6)), (256 << 20) // max(out.nbytes, 1))
        calls = max(1, calls)
        del out
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = [fn(a, b) for _ in range(calls)]  # dispatched back to back, as a step's ops run
            jax.block_until_ready(outs)
            times.append((time.perf_counter() - t0) / calls)
            del outs
        best = min(times)
        flops = _dot_flops((lhs, rhs, dn, dtype))
        rows.append({"lhs": list(lhs), "rhs": list(rhs), "dimension_numbers": dn, "count": count,
                     "gflop": flops / 1e9, "ms": 1e3 * best, "gflops_per_s": flops / best / 1e9})
        total_s += count * best
        total_f += count * flops
    for r in rows:
        r["time_share"] = r["count"] * r["ms"] / 1e3 / total_s if total_s else 0.0
    rows.sort(key=lambda r: -r["time_share"])
    log(f"{len(rows)} distinct matrix products, {total_f / 1e9:.3g} GFLOP in {1e3 * total_s:.4g} ms back to back")
    return {"gflops_per_s": total_f / total_s / 1e9 if total_s else None, "seconds": total_s,
            "matmul_flops": total_f, "shapes": rows}


# --------------------------------------------------------------------------- hardware


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> dict:
    """The fp32 GEMM throughput of the default device, measured now.

    A jitted ``n x n @ n x n`` matmul is run ``repeats`` times after a warm-up;
    the *best* time defines the peak (the quietest moment on a shared machine),
    the median is reported too.
    """
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), dtype)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t)
    flops = 2.0 * n**3
    return {
        "n": n,
        "peak_gflops": flops / min(times) / 1e9,
        "median_gflops": flops / statistics.median(times) / 1e9,
        "times_s": times,
    }


# --------------------------------------------------------------------------- timing helpers


def spread(values_ms: list[float]) -> dict:
    """Median, quartiles, IQR, min and max of a list of times (ms)."""
    v = np.asarray(values_ms, np.float64)
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return {
        "median": float(q50),
        "q25": float(q25),
        "q75": float(q75),
        "iqr": float(q75 - q25),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }


def timed_calls(fn, state, data, calls: int) -> tuple[Any, list[float]]:
    """Runs ``state = fn(state, data)[0]`` ``calls`` times; wall seconds of each, blocked."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        out = fn(state, data)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
        state = out[0]
    return state, times


_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")


def _hlo_ops(hlo_text: str) -> dict[str, dict]:
    """``instruction name -> {opcode, shape, where}`` from a compiled module's text (``where``: JAX's op name)."""
    ops = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        found = re.search(r'op_name="([^"]*)"', line)
        where = found.group(1) if found else ""
        if opcode == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            opcode = "matmul fusion" if "ynn_fusion" in name or "xnn_fusion" in name or (
                "__onednn" in line) else f"fusion ({kind.group(1) if kind else '?'})"
        ops[name] = {"opcode": opcode, "shape": shape, "where": where}
    return ops


def _op_category(op: dict) -> str:
    """A coarse cost category of a compiled op: matmul, im2col copy, batch norm, ReLU/pool, ... ."""
    opcode, where = op["opcode"], op["where"]
    if opcode in ("dot", "convolution") or opcode == "matmul fusion":
        return "matmul"
    if opcode == "concatenate" or "concatenate" in where or "pad" in where or "slice" in where:
        return "im2col copies (pad, slices, concatenate) and their transposes"
    if "/bn_" in where:
        return "batch norm"
    if "relu" in where or "max" in where:
        return "ReLU"
    if any(w in where for w in ("random", "threefry", "gather", "choice", "permutation", "sample")):
        return "task sampling"
    if opcode in ("copy", "transpose", "bitcast", "broadcast", "reshape"):
        return "layout copies"
    return "other (loss, optimiser, metrics, loop control)"


def profile_step(compiled, hlo_text: str, state, data, *, calls: int = 3, top: int = 15) -> dict:
    """Per-op times of a compiled step from a ``jax.profiler`` trace of ``calls`` calls.

    Returns the wall time of a call, the summed op time, the time by
    :func:`_op_category` and the ``top`` costliest ops (name, opcode, shape,
    JAX op name, ms per call, count per call).  The trace is XLA's own
    per-thunk timing of the CPU (or GPU) runtime.
    """
    import collections
    import glob
    import gzip
    import json
    import tempfile

    ops = _hlo_ops(hlo_text)
    jax.block_until_ready(compiled(state, data))
    with tempfile.TemporaryDirectory(prefix="jaxmeta-profile-") as tmp:
        started = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(compiled(state, data))
        wall = (time.perf_counter() - started) / calls
        found = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        if not found:
            return {"error": "the profiler wrote no trace"}
        with gzip.open(found[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            total[e["name"]] += e.get("dur", 0) / 1e3 / calls
            count[e["name"]] += 1 / calls
    by_category = collections.Counter()
    for name, ms in total.items():
        by_category[_op_category(ops[name])] += ms
    op_ms = sum(total.values())
    return {
        "wall_ms_per_call": 1e3 * wall,
        "op_ms_per_call": op_ms,
        "ops_per_call": sum(count.values()),
        "by_category_ms": dict(by_category.most_common()),
        "top_ops": [{"name": n, **ops[n], "ms": ms, "count": count[n]} for n, ms in total.most_common(top)],
    }


def format_profile(profile: dict) -> str:
    """The profile as lines: the time by category, then the costliest ops."""
    if "error" in profile:
        return profile["error"]
    lines = [f"{profile['wall_ms_per_call']:.1f} ms per call; {profile['op_ms_per_call']:.1f} ms in "
             f"{profile['ops_per_call']:.0f} ops (summed over threads)"]
    for cat, ms in profile["by_category_ms"].items():
        lines.append(f"  {ms:8.1f} ms  {100 * ms / profile['op_ms_per_call']:4.1f}%  {cat}")
    lines.append("  costliest ops:")
    for op in profile["top_ops"]:
        lines.append(f"  {op['ms']:8.2f} ms  {op['opcode']:<18} {op['shape']:<28} {op['where'][-70:]}")
    return "\n".join(lines)


def memory_summary(compiled) -> dict:
    """XLA's memory analysis of a compiled program: bytes by kind and the peak."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        ma = None
    if ma is None:
        return {"available": False}
    temp = int(ma.temp_size_in_bytes)
    arg = int(ma.argument_size_in_bytes)
    out = int(ma.output_size_in_bytes)
    alias = int(ma.alias_size_in_bytes)
    return {
        "available": True,
        "temp_bytes": temp,
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "peak_bytes": temp + arg + out - alias,
    }


def xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def compile_ahead(jitted, *args) -> tuple[Any, Any, dict]:
    """Traces, lowers and compiles ahead of time: ``(compiled, traced jaxpr, seconds by phase)``."""
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return compiled, traced.jaxpr, {"trace_s": t1 - t0, "lower_s": t2 - t1, "xla_compile_s": t3 - t2,
                                    "total_s": t3 - t0}
