"""The README's API example runs as written and MAML learns in it."""

from __future__ import annotations

import contextlib
import io
import re

from conftest import REPO_ROOT


def test_readme_api_example_runs_and_learns():
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    losses = scope["result"].mean["loss"]
    assert float(losses[10]) < 0.6 * float(losses[0])  # adaptation from the learned init helps
    assert scope["grads"] is not None and out.getvalue().strip()
