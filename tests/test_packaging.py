"""The package: ``python -m build`` makes an sdist and a wheel that ``twine check`` passes, the wheel
holds ``jaxmeta`` alone, and installed alone in a fresh virtual environment it runs the README's API
example; the experiments, run from the checkout, say in one line which extra they need.

The build and the install reach the package registries (what CI allows), so this is the slowest kind
of test that still needs no data: about a minute on the 2-core CPU with the wheels at hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from conftest import OMNIGLOT_DIR, REPO_ROOT

EXTRAS_ONLY = ("tensorflow", "tensorflow_datasets", "matplotlib", "sacrebleu", "PIL", "experiments")
"""Importable with the extras (or from the checkout), never from the core install."""


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple:
    """``(source, dist)``: a copy of the checkout and the sdist and wheel ``python -m build`` made from it."""
    root = tmp_path_factory.mktemp("dist")
    source = root / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", "_build"))
    out = root / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(source)], check=True, timeout=900,
                   stdout=subprocess.DEVNULL)
    return source, out


@pytest.fixture(scope="module")
def core(dist, tmp_path_factory) -> tuple:
    """``(python, source)``: a fresh virtual environment with the built wheel alone installed (and its core)."""
    source, out = dist
    root = tmp_path_factory.mktemp("core")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    (wheel,) = out.glob("jaxmeta-*.whl")
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)
    return python, source


def test_the_sdist_and_the_wheel_pass_twine_and_the_wheel_holds_jaxmeta_alone(dist):
    _, out = dist
    (wheel,) = out.glob("jaxmeta-*.whl")
    (sdist,) = out.glob("jaxmeta-*.tar.gz")
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    import jaxmeta

    assert wheel.name == f"jaxmeta-{jaxmeta.__version__}-py3-none-any.whl"  # the version's one place
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
        metadata = z.read(f"jaxmeta-{jaxmeta.__version__}.dist-info/METADATA").decode()
    assert tops == {"jaxmeta", f"jaxmeta-{jaxmeta.__version__}.dist-info"}
    assert "License-Expression: Apache-2.0" in metadata and "Description-Content-Type: text/markdown" in metadata
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, flags=re.M))
    assert extras == {"omniglot", "miniimagenet", "translation", "plots", "experiments", "docs", "test", "torch"}
    with tarfile.open(sdist) as t:
        names = {name.split("/", 1)[1] for name in t.getnames() if "/" in name}
    assert {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "jaxmeta/__init__.py"} <= names
    assert not any(name.startswith(("experiments/", "tests/", "results/")) for name in names)


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
