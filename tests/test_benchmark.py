"""The benchmark launcher, its pipeline (:mod:`experiments.benchmark.pipeline`) and :mod:`jaxmeta.profiling`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmark import pipeline as bm
from jaxmeta import profiling

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.benchmark", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_sinusoid_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _cli("--task", "sinusoid", "--algo", "maml", "--inner-steps", "2", "--repeats", "10", "--warmup", "1",
                "--steps-per-dispatch", "4", "--dispatch-repeats", "3", "--matmul-ceiling", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    # The step's products alone: every matmul FLOP of the step is timed.
    assert result["matmul_ceiling"]["matmul_flops"] == pytest.approx(result["flops"]["matmul"])
    assert result["matmul_ceiling"]["gflops_per_s"] > 0 and "its matmuls alone" in proc.stdout
    for key in bm.RESULT_KEYS:
        assert key in result, key
    assert result["ms_per_step"] > 0
    assert result["ms_per_step_spread"]["min"] > 0
    assert result["ms_per_step_spread"]["max"] >= result["ms_per_step"] >= result["ms_per_step_spread"]["min"]
    assert result["ms_per_step_spread"]["iqr"] >= 0
    assert result["timing"]["one_per_dispatch"]["n"] == 10
    assert result["timing"]["one_per_dispatch"]["median"] > 0
    assert result["timing"]["many_per_dispatch"]["steps_per_dispatch"] == 4
    assert result["compile_s"] > 0
    assert result["peak_bytes"] > 0
    assert result["flops_per_step"] > 0
    assert result["gflops_per_s"] > 0
    assert result["matmul_peak_gflops"] > 0
    assert 0 < result["fraction_of_peak"] < 1.5
    assert result["config"]["task"] == "sinusoid" and result["config"]["inner_steps"] == 2
    assert result["device"]["backend"] == jax.default_backend()
    # Compile time is measured ahead of time, apart from the step: a sinusoid step takes
    # well under a millisecond, its compilation far longer.
    phases = result["compile"]["one_step"]
    assert phases["xla_compile_s"] > 0 and phases["total_s"] == pytest.approx(result["compile_s"])
    assert result["compile_s"] * 1e3 > 10 * result["timing"]["one_per_dispatch"]["max"]
    assert "ms/step" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--inner-steps", "0"], "--inner-steps"),
        (["--ways", "0"], "--ways"),
        (["--algo", "nope"], "--algo"),
    ],
)
def test_cli_bad_input_is_one_line(args, message):
    proc = _cli(*args, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "omniglot", "--shots", "10", "--queries", "15"], "20 examples"),
        (["--task", "volcano"], "--task"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--sweep", "--settings", "omniglot7"], "omniglot7"),
        (["--conv-impl", "fft"], "--conv-impl"),
        (["--compare", "maml"], "two or more"),
        (["--compare", "maml,anil", "--sweep"], "--compare runs alone"),
        (["--sweep", "--matmul-ceiling"], "--matmul-ceiling measures one configuration"),
        (["--compare", "maml,volcano"], "--compare"),
        (["--setting", "maml-7w1s"], "--setting"),
        (["--setting", "translation", "--torch"], "--torch compares exact second-order MAML on Omniglot"),
        (["--setting", "maml-5w1s", "--algo", "fomaml", "--torch"], "--torch compares"),
    ],
)
def test_bad_input_in_process(args, message, capsys):
    from experiments import benchmark
    from jaxmeta.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(benchmark.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_compare_times_algorithms_side_by_side(tmp_path):
    out = tmp_path / "compare.json"
    proc = _cli("--task", "sinusoid", "--compare", "maml,anil", "--inner-steps", "2", "--repeats", "3",
                "--steps-per-dispatch", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["baseline"] == "maml" and list(report["algos"]) == ["maml", "anil"]
    maml, anil = report["algos"]["maml"], report["algos"]["anil"]
    assert maml["ratio_to_baseline"] == 1.0 and maml["n"] == anil["n"] == 3
    assert anil["ratio_to_baseline"] == pytest.approx(anil["ms_per_step"] / maml["ms_per_step"])
    assert anil["speedup_vs_baseline"] == pytest.approx(1 / anil["ratio_to_baseline"])
    assert maml["paired_ratio_median"] == 1.0 and anil["paired_ratio_median"] > 0
    assert anil["compile_s"] > 0 and report["config"]["inner_steps"] == 2
    assert report["device"]["backend"] == jax.default_backend()
    assert proc.stdout.startswith("maml ") and "anil " in proc.stdout
    # which is faster is a measurement (a loaded machine may reverse it); the line says which, with the ratio
    pace = "faster" if anil["speedup_vs_baseline"] >= 1 else "slower"
    assert f"x {pace}" in proc.stdout


def test_anil_benchmark_problem_on_omniglot_splits_off_the_conv4_head():
    problem = bm.build_problem(bm.BenchConfig(task="omniglot", algo="anil", classes=10, meta_batch=2, queries=2))
    state = problem.learner.init(problem.params)
    tasks = problem.sample(jax.random.PRNGKey(0), problem.data)
    new, metrics = jax.eval_shape(problem.learner.step, state, tasks)  # traces the step, compiles nothing
    assert jax.tree.structure(new.params) == jax.tree.structure(problem.params)
    assert {"loss", "query_loss_post"} <= set(metrics)


@pytest.mark.parametrize("algo", ["fomaml", "maml"])
def test_translation_benchmark_problem_is_the_cpu_preset_transformer(algo):
    problem = bm.build_problem(bm.BenchConfig(task="translation", algo=algo, shots=3, queries=2, meta_batch=2,
                                              inner_steps=2))
    state = problem.learner.init(problem.params)
    tasks = problem.sample(jax.random.PRNGKey(0), problem.data)
    assert tasks.support[0].shape == (2, 3, 48) and tasks.query[1].shape == (2, 2, 49)
    new, metrics = jax.eval_shape(problem.learner.step, state, tasks)  # traces the step, compiles nothing
    assert jax.tree.structure(new.params) == jax.tree.structure(problem.params)
    assert {"loss", "query_loss_post", "query_accuracy_post"} <= set(metrics)


def test_count_flops_multiplies_scans():
    a = jnp.ones((8, 16))
    b = jnp.ones((16, 4))

    def f(a, b):
        return jax.lax.scan(lambda c, _: (c + (a @ b).sum(), None), 0.0, None, length=5)[0]

    flops = profiling.count_flops(jax.make_jaxpr(f)(a, b))
    assert flops["matmul"] == 5 * 2 * 8 * 16 * 4
    assert flops["total"] > flops["matmul"]


def test_matmul_ceiling_finds_every_product_of_a_vmapped_scan():
    a = jnp.ones((3, 8, 16))
    b = jnp.ones((3, 16, 4))

    def f(a, b):  # a batched product (vmap) run 5 times (scan), plus one plain product outside
        body = lambda c, _: (c + jax.vmap(jnp.matmul)(a, b).sum(), None)
        return jax.lax.scan(body, 0.0, None, length=5)[0] + (a[0] @ b[0]).sum()

    jaxpr = jax.make_jaxpr(f)(a, b)
    shapes = profiling.matmul_shapes(jaxpr)
    assert sorted(count for count in shapes.values()) == [1.0, 5.0]
    assert sum(profiling._dot_flops(k) * c for k, c in shapes.items()) == profiling.count_flops(jaxpr)["matmul"]
    ceiling = profiling.matmul_ceiling(jaxpr, repeats=2)
    assert ceiling["matmul_flops"] == profiling.count_flops(jaxpr)["matmul"]
    assert ceiling["gflops_per_s"] > 0 and ceiling["seconds"] > 0
    assert sum(r["time_share"] for r in ceiling["shapes"]) == pytest.approx(1.0)
    assert ceiling["shapes"][0]["lhs"] in ([3, 8, 16], [8, 16])


def test_count_flops_convolution():
    x = jnp.ones((2, 8, 8, 3))
    k = jnp.ones((3, 3, 3, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    flops = profiling.count_flops(jax.make_jaxpr(conv)(x, k))
    assert flops["matmul"] == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)


def test_sweep_grid_dedupes_identical_programs():
    configs = bm.sweep_configs(("omniglot5",), quick=True)
    steps = {c.inner_steps for c in configs}
    assert steps == {1, 5}
    assert [c for c in configs if c.algo == "pretrain"] and len([c for c in configs if c.algo == "pretrain"]) == 1
    assert not [c for c in configs if c.algo == "reptile" and c.remat]
    assert len([c for c in configs if c.algo == "maml"]) == 4
    full = bm.sweep_configs()
    assert {c.inner_steps for c in full} == {1, 5, 10, 25}
    assert {(c.ways, c.meta_batch) for c in full if c.task == "omniglot"} == {(5, 32), (20, 16)}


def _fake_result(algo, steps, remat, ms, mem, task="omniglot"):
    config = bm.BenchConfig(task=task, algo=algo, inner_steps=steps, remat=remat)
    single = profiling.spread([ms, ms * 1.1, ms * 0.9])
    many = {**profiling.spread([ms * 0.95]), "steps_per_dispatch": 5}
    return {
        "ms_per_step": many["median"], "ms_per_step_spread": many, "compile_s": 5.0, "peak_bytes": mem + 100,
        "flops_per_step": 1e9, "gflops_per_s": 10.0, "matmul_peak_gflops": 100.0, "fraction_of_peak": 0.1,
        "config": config.as_dict(), "device": bm.device_description(),
        "timing": {"one_per_dispatch": single, "many_per_dispatch": many},
        "memory": {"peak_bytes": mem + 100, "step_bytes": mem},
    }


def test_sweep_outputs(tmp_path):
    results = [
        _fake_result(algo, steps, remat, ms=steps * (2 if algo == "maml" else 1.0), mem=2**20 * (10 + steps))
        for algo in ("maml", "fomaml") for steps in (1, 5, 25) for remat in (False, True)
    ] + [_fake_result("pretrain", 1, False, 0.5, 2**20), _fake_result("reptile", 5, False, 2.0, 2**21)]
    table = bm.format_table(results)
    assert table.count("\n") == len(results) + 2
    assert "| omniglot 5-way 1-shot B32 | maml | 25 | on |" in table
    targets = bm.check_targets(results)
    by_name = {t["target"]: t for t in targets}
    fo = by_name["omniglot 5-way 1-shot B32: FOMAML <= 0.7x MAML time at 5 steps"]
    assert fo["met"] is True and fo["value"] == pytest.approx(0.5)
    mem = by_name["omniglot 5-way 1-shot B32: MAML+remat step memory at 25 steps <= 3x 1 step"]
    assert mem["value"] == pytest.approx(35 / 11)
    assert "NOT met" in bm.format_targets(targets)
    for metric in ("time", "memory"):
        path = tmp_path / f"{metric}.png"
        bm.plot_vs_steps(results, str(path), metric=metric)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_sweep(path, results, device=None):
    device = device or bm.device_description()
    peak = {"peak_gflops": 100.0, "median_gflops": 90.0, "times_s": [0.1, 0.2]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "matmul_peak": peak, "device": device, "quick": False,
                                "wall_s": 10.0}))
    return str(path)


def test_merge_joins_sweeps_of_one_device_keeping_first_measurements(tmp_path, capsys):
    from experiments import benchmark
    from jaxmeta.cli import run

    first = _write_sweep(tmp_path / "a" / "sweep.json",
                         [_fake_result("maml", s, False, 2.0 * s, 2**20 * (10 + s)) for s in (1, 5)]
                         + [_fake_result("fomaml", 1, False, 1.0, 2**20)])
    second = _write_sweep(tmp_path / "b" / "sweep.json",
                          [_fake_result("fomaml", s, False, 3.0 * s, 2**20) for s in (5, 1)]
                          + [_fake_result("maml", 25, True, 40.0, 2**21)])
    merged = benchmark.main(["--merge", first, second, "--out", str(tmp_path / "m")])
    keys = [(r["config"]["algo"], r["config"]["inner_steps"]) for r in merged["results"]]
    assert keys == [("maml", 1), ("maml", 5), ("maml", 25), ("fomaml", 1), ("fomaml", 5)]
    fomaml_1 = next(r for r in merged["results"] if r["config"]["algo"] == "fomaml" and r["config"]["inner_steps"] == 1)
    assert fomaml_1["ms_per_step"] == pytest.approx(0.95)  # the first sweep's measurement, not the second's 2.85
    by_name = {t["target"]: t for t in merged["targets"]}
    assert by_name["omniglot 5-way 1-shot B32: FOMAML <= 0.7x MAML time at 5 steps"]["value"] == pytest.approx(1.5)
    out = tmp_path / "m"
    assert json.loads((out / "sweep.json").read_text())["merged_from"] == [first, second]
    assert "Merged from" in (out / "sweep.md").read_text()
    for name in ("time_vs_steps.png", "memory_vs_steps.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    other = _write_sweep(tmp_path / "c" / "sweep.json", [_fake_result("maml", 1, False, 1.0, 2**20)],
                         device={**bm.device_description(), "backend": "gpu", "device_kind": "NVIDIA H200"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**json.loads(Path(first).read_text()), "results": [{"ms_per_step": 1.0}]}))
    capsys.readouterr()
    for args, message in (([first, other], "NVIDIA H200"), ([str(bad)], "is not JSON"),
                          ([str(tmp_path / "none.json")], "cannot read sweep"),
                          ([str(tmp_path / "m" / "sweep.md")], "is not JSON"),
                          ([str(broken)], "is not a sweep.json")):
        with pytest.raises(SystemExit) as exit_info:
            run(benchmark.main, ["--merge", *args, "--out", str(tmp_path / "x")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_benchmark_library_on_sinusoid():
    config = bm.BenchConfig(task="sinusoid", algo="fomaml", shots=5, queries=5, meta_batch=4, inner_steps=3,
                            repeats=3, warmup=1, steps_per_dispatch=3, dispatch_repeats=1)
    peak = {"peak_gflops": 100.0, "median_gflops": 90.0, "times_s": [0.1], "n": 2048}
    result = bm.benchmark(config, matmul_peak=peak, recheck_peak=False, many_per_dispatch=False)
    assert result["matmul_peak_gflops"] == 100.0
    assert result["flops"]["matmul"] > 0 and result["flops"]["unknown_loops"] == 0
    # The jaxpr count follows the inner scan's 3 steps; XLA's analysis is kept beside it.
    assert result["flops"]["xla_cost_analysis_flops"] is None or result["flops"]["xla_cost_analysis_flops"] > 0
    assert result["memory"]["temp_bytes"] >= 0 and result["memory"]["data_bytes"] == 0
    assert "many_per_dispatch" not in result["timing"]
    assert result["ms_per_step"] == result["timing"]["one_per_dispatch"]["median"]


def test_torch_reference_network_matches_jax():
    """The PyTorch Conv4 of ``--torch`` computes the JAX model's logits on the same weights (skips without torch)."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from experiments import torch_reference as tr
    from jaxmeta.models import conv4_omniglot

    model = conv4_omniglot(tr.WAYS)
    x = jax.random.uniform(jax.random.PRNGKey(3), (6, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(4), x)["params"]
    expected = np.asarray(model.apply({"params": params}, x))
    tparams = tr.params_from_jax(params)
    tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
    for plain_bn in (False, True):
        net = tr.Conv4(plain_bn=plain_bn)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(tparams[name])
            np.testing.assert_allclose(net(tx).numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tr.functional_forward(tparams, tx).detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_named_settings_are_the_papers_steps_and_flags_override_them():
    from experiments import benchmark

    parse = lambda *a: benchmark.config_from_args(benchmark.build_parser().parse_args(list(a)))  # noqa: E731
    c = parse("--setting", "maml-20w1s")
    assert (c.task, c.algo, c.ways, c.shots, c.queries, c.meta_batch, c.inner_steps, c.effective_inner_lr) == (
        "omniglot", "maml", 20, 1, 1, 16, 5, 0.1)
    assert c.classes == bm.OMNIGLOT_TRAIN_CLASSES == 4400
    c = parse("--setting", "maml-5w5s", "--meta-batch", "4", "--algo", "fomaml")
    assert (c.ways, c.shots, c.queries, c.meta_batch, c.algo, c.effective_inner_lr) == (5, 5, 5, 4, "fomaml", 0.4)
    c = parse("--setting", "translation")
    assert (c.task, c.algo, c.inner_steps, c.shots, c.queries, c.meta_batch) == ("translation", "fomaml", 3, 16, 16, 4)
    # Without a setting the old defaults hold (5-way 1-shot, 15 queries, B32, 1 step, a 1,200-class pool).
    c = parse()
    assert (c.ways, c.shots, c.queries, c.meta_batch, c.inner_steps, c.classes) == (5, 1, 15, 32, 1, 1200)
    # The named settings' problems are sweep settings too; the grid sets algorithm and inner steps.
    configs = bm.sweep_configs(("maml-5w1s",), ("maml",), (2,))
    assert [(x.ways, x.queries, x.meta_batch, x.inner_steps, x.classes) for x in configs] == [
        (5, 1, 32, 2, 4400), (5, 1, 32, 2, 4400)]


def test_torch_comparison_runs_each_contestant_in_its_own_process():
    """The orchestration of ``--torch`` (on the JAX contestant alone, so it runs without PyTorch)."""
    import argparse

    from experiments import benchmark

    config = bm.protocol_config("maml-5w1s", meta_batch=2)
    args = argparse.Namespace(setting="maml-5w1s", torch_threads=1, torch_repeats=3, torch_steps=2, torch_warmup=1)
    report = benchmark.torch_comparison(config, args, contestants=("jax", "jax_loop"))
    rows = report["jax"]
    assert set(rows) == {"jax", "jax_loop"} and report["headline_jax"] == "jax_loop"
    assert len({rows["jax"]["pid"], rows["jax_loop"]["pid"], os.getpid()}) == 3, "one process per contestant"
    for row in rows.values():
        assert row["n"] == 6 and row["ms_per_step"] > 0
        assert row["min"] <= row["ms_per_step"] <= row["max"]
    assert report["threads"] == 1 and report["config"]["meta_batch"] == 2 and report["config"]["inner_lr"] == 0.4
    assert "own process" in report["method"]
    assert "jaxmeta" in benchmark.torch_markdown(report)


def test_torch_styles_match_jax_and_finite_differences_on_a_multi_step_episode(tmp_path):
    """The PyTorch references at several inner steps: the gradient checks pass where they should and
    catch torch.func's F.batch_norm (skips without torch)."""
    pytest.importorskip("torch")
    import argparse  # noqa: F401

    from experiments import benchmark
    from experiments import torch_reference as tr

    config = bm.protocol_config("maml-20w1s", ways=5, meta_batch=3, inner_steps=2)
    episode = str(tmp_path / "episode.npz")
    benchmark.write_episode(config, episode)
    meta, params, data, jax_grads = tr.load_episode(episode)
    assert meta["inner_steps"] == 2 and data[0].shape == (3, 5, 1, 28, 28)
    checks = tr.gradient_checks(meta, params, data, jax_grads)
    assert checks["autograd_loop"]["ok"] and checks["torch_func_plain_bn"]["ok"], checks
    # In float64 PyTorch's loop and JAX give the same ReLU meta-gradient to rounding.
    assert checks["autograd_loop"]["rel_error_vs_jax_float64"] < 1e-8
    assert checks["torch_func_plain_bn"]["rel_error_vs_jax_float64"] < 1e-8
    assert not checks["torch_func"]["ok"], "torch.func through F.batch_norm should fail its check"
