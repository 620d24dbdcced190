"""``--torch``: the exact second-order MAML step of jaxmeta against PyTorch's, each contestant in its own process.

The contestants (:data:`CONTESTANTS`) run :mod:`experiments.contestant` from the
checkout, alternated and pinned to the same cores, on one episode written by
:func:`write_episode`; the PyTorch meta-gradients are first checked against
JAX's and a finite difference in float64.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from jaxmeta import profiling
from jaxmeta.distributed import cpu_count
from jaxmeta.errors import ConfigError

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The checkout holding ``experiments`` (not installed): where ``python -m experiments.contestant`` runs."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
