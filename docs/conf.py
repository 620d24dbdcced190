"""Sphinx configuration: the API reference from the docstrings (autodoc + napoleon) and the
Markdown pages (MyST), as optax and Flax build theirs.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (``tests/test_docs.py`` runs it).
No network: no intersphinx, no notebooks.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's jaxmeta

import jaxmeta  # noqa: E402

project = "jaxmeta"
author = "jaxmeta contributors"
release = version = jaxmeta.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# docs/results/*.md are generated tables, included by the pages that show them
exclude_patterns = ["_build", "results/*", "Thumbs.db", ".DS_Store"]

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: autodoc documents NamedTuple fields itself

nitpicky = False
intersphinx_mapping: dict = {}  # CI reaches package registries only

html_theme = "alabaster"
html_title = f"jaxmeta {release}"
html_static_path: list[str] = []
