"""Shared fixtures: the offline Omniglot archives and a session-wide data cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = (REPO_ROOT / ".." / "shared" / "data" / "omniglot").resolve()
"""The offline Omniglot archives (``<repo>/../shared/data/omniglot``)."""


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The directory holding the four Omniglot ``.zip`` archives (skips if absent)."""
    if not (OMNIGLOT_DIR / "images_background.zip").is_file():
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_DIR}")
    return OMNIGLOT_DIR


@pytest.fixture(scope="session")
def jaxmeta_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by the whole test session.

    ``$JAXMETA_CACHE_DIR`` when set (so a prepared cache is reused across runs),
    otherwise a fresh temporary directory.
    """
    env = os.environ.get("JAXMETA_CACHE_DIR")
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
