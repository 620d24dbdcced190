"""Shared fixtures: the offline Omniglot archives and a session-wide data cache."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = (REPO_ROOT / ".." / "shared" / "data" / "omniglot").resolve()
"""The offline Omniglot archives (``<repo>/../shared/data/omniglot``)."""


SESSION_CACHE_ENV = "JAXMETA_TEST_SESSION_CACHE"
"""The data cache the session's processes share (set by the first process, inherited by xdist's workers)."""


def pytest_configure(config: pytest.Config) -> None:
    """One XLA compilation cache for the whole session, this process and every subprocess it starts.

    Many tests compile the same programs again: a straight run and its
    resumed twin in two processes, the same learner built by several tests.
    JAX's persistent cache (``JAX_COMPILATION_CACHE_DIR``, read when jax is
    imported, so inherited by the CLI subprocesses) compiles each once.  A
    fresh directory per session (removed at exit) unless one is set: the
    suite's time is a cold start's.  Results are unchanged: a cached
    executable is the one XLA compiled.
    """
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_dir("xla")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    if SESSION_CACHE_ENV not in os.environ:  # pytest-xdist's workers inherit the controller's
        os.environ[SESSION_CACHE_ENV] = _session_dir("data")


SLOWEST_FIRST = ("test_translation.py", "test_omniglot_cli.py", "test_fault_tolerance.py",
                 "test_miniimagenet_cli.py", "test_packaging.py", "test_benchmark.py", "test_beyond_maml.py")
"""Modules with the longest fixtures and runs, longest first (measured with ``--durations``)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Runs the slowest modules first.

    xdist's workers take whole files (``--dist loadfile``) in collection
    order; the longest file started last would set the suite's time, as in
    longest-processing-time-first scheduling.  The sort is stable: tests keep
    their order within a file.
    """
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _session_dir(what: str) -> str:
    path = tempfile.mkdtemp(prefix=f"jaxmeta-test-{what}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The directory holding the four Omniglot ``.zip`` archives (skips if absent)."""
    if not (OMNIGLOT_DIR / "images_background.zip").is_file():
        if os.environ.get("CI"):  # CI always has the data: a missing copy is a failure there
            pytest.fail(f"Omniglot archives not found in {OMNIGLOT_DIR}")
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_DIR}")
    return OMNIGLOT_DIR


@pytest.fixture(scope="session")
def jaxmeta_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by the whole test session.

    ``$JAXMETA_CACHE_DIR`` when set (so a prepared cache is reused across runs),
    otherwise a fresh directory shared by the session's worker processes
    (the cache's file lock makes one of them prepare it).
    """
    env = os.environ.get("JAXMETA_CACHE_DIR") or os.environ.get(SESSION_CACHE_ENV)
    if env:
        path = Path(env).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("jaxmeta_cache")


@pytest.fixture(scope="session")
def omniglot_characters(omniglot_dir: Path, jaxmeta_cache_dir: Path):
    """All 1623 preprocessed characters, prepared through TFDS once per session.

    The first use prepares the real archives (tens of seconds) into
    ``jaxmeta_cache_dir``; later uses (and ``omniglot.load(cache_dir=...)`` calls with
    the same cache dir) read the cached ``.npz``.
    """
    from jaxmeta.data import omniglot

    return omniglot.load_characters(data_dir=omniglot_dir, cache_dir=jaxmeta_cache_dir)


def run_cli(module: str, *args: str, env: dict | None = None, timeout: float = 900):
    """Runs ``python -m module args`` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *fragments: str) -> None:
    """A clear failure: exit code 2, one line on stderr, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_in_process(main, argv, capsys, env: dict | None = None, monkeypatch=None):
    """Runs a CLI ``main`` through ``jaxmeta.cli.run`` in this process: ``(exit code, stderr, stdout)``."""
    from jaxmeta.cli import run

    if env and monkeypatch is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    capsys.readouterr()
    try:
        run(main, list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def assert_one_line_error_text(code, stderr: str, *fragments: str) -> None:
    """In-process twin of :func:`assert_one_line_error`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


TRANSLATION_DIR = (REPO_ROOT / ".." / "shared" / "data" / "translation").resolve()
"""The offline Tatoeba / FLORES-200 text (``<repo>/../shared/data/translation``)."""


@pytest.fixture(scope="session")
def translation_dir() -> Path:
    """The translation data directory (skips if absent; fails in CI)."""
    if not (TRANSLATION_DIR / "tatoeba" / "manifest.tsv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"translation data not found in {TRANSLATION_DIR}")
        pytest.skip(f"translation data not found in {TRANSLATION_DIR}")
    return TRANSLATION_DIR
