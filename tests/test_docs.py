"""The docs build warning-free (a broken docstring, cross-reference, link or anchor fails it), and every
link on the front page lands: its file exists, and its anchor is an id of the built page.

The build is Sphinx with autodoc, napoleon and MyST (``docs/conf.py``), no network: about 15 s.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    """The built HTML directory of ``sphinx-build -W --keep-going -b html docs``."""
    out = tmp_path_factory.mktemp("docs-html")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(REPO_ROOT / "docs"), str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "WARNING" not in done.stderr, done.stderr[-4000:]
    return out


def test_the_docs_build_without_warnings(html):
    assert (html / "index.html").exists()
    for page in ("sinusoid", "omniglot", "miniimagenet", "translation", "benchmark", "robustness", "devices",
                 "reproducibility", "api/index", "api/algorithms", "api/core"):
        assert (html / f"{page}.html").exists(), page
    api = (html / "api" / "algorithms.html").read_text()
    assert 'id="jaxmeta.algorithms.maml.maml"' in api  # autodoc rendered the docstrings
    omniglot = (html / "omniglot.html").read_text()
    generated = (REPO_ROOT / "docs" / "results" / "omniglot.md").read_text()
    first_row = generated.splitlines()[2].split("|")[3].strip().replace("**", "")
    assert first_row.split(" (")[0] in omniglot  # the generated table is on the page


def test_the_front_page_links_land(html):
    text = (REPO_ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?!https?://)[^)#]+)(?:#([^)]+))?\)", text)
    assert links
    for path, anchor in links:
        assert (REPO_ROOT / path).exists(), path
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), path
            page = (html / path.removeprefix("docs/")).with_suffix(".html").read_text()
            assert f'id="{anchor}"' in page, f"{path}#{anchor}"
