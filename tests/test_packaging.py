"""The light core: ``pip install jaxmeta`` alone runs the README's API example, and the experiments
say in one line which extra they need.

This installs the package into a fresh virtual environment from the package registries (what CI
allows), so it is the slowest kind of test that still needs no data: about 30 s on the 2-core CPU
with the wheels at hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import OMNIGLOT_DIR, REPO_ROOT

EXTRAS_ONLY = ("tensorflow", "tensorflow_datasets", "matplotlib", "sacrebleu", "PIL", "experiments")
"""Importable with the extras (or from the checkout), never from the core install."""


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> tuple:
    """``(python, source)``: a fresh virtual environment with the core alone installed from a copy of the checkout."""
    root = tmp_path_factory.mktemp("core")
    source = root / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)], check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)
    return python, source


def test_the_core_installs_alone_and_runs_the_readme_example(core, tmp_path):
    python, _ = core
    absent = subprocess.run(
        [str(python), "-c", "import importlib.util as u, sys; "
                            f"print(','.join(m for m in {EXTRAS_ONLY!r} if u.find_spec(m)))"],
        cwd=tmp_path, capture_output=True, text=True, check=True)
    assert absent.stdout.strip() == ""  # the 2.5 GB of TensorFlow & co. stay out, and so does `experiments`
    example = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)[0]
    ran = subprocess.run([str(python), "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", ran.stdout)]
    assert len(losses) == 4 and losses[2] < 0.6 * losses[0]  # loss after 0, 1, 10 steps, then a CI: it learned


def test_an_experiment_without_its_extra_is_one_line_naming_it(core, tmp_path):
    python, source = core
    run_dir = tmp_path / "run"
    done = subprocess.run([str(python), "-m", "experiments.omniglot", "train", "--preset", "quick",
                           "--data-dir", str(OMNIGLOT_DIR), "--out", str(run_dir)],
                          cwd=source, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: Omniglot through TFDS: tensorflow_datasets is not installed; pip install 'jaxmeta[omniglot]'"]
    assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing half-made


def test_figures_without_matplotlib_warn_and_the_numbers_are_kept(core, tmp_path):
    python, source = core
    out = tmp_path / "sinusoid"
    done = subprocess.run([str(python), "-m", "experiments.sinusoid", "--preset", "quick", "--algos", "maml,pretrain",
                           "--meta-steps", "500", "--test-tasks", "50", "--no-progress", "--out", str(out)], cwd=source, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: no figures drawn: matplotlib is not installed; pip install 'jaxmeta[plots]'"]
    assert (out / "results.json").exists() and not list(out.glob("*.png"))
