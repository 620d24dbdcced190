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


def test_the_omniglot_table_is_generated_from_the_committed_records():
    """docs/results/omniglot.md and the README's Omniglot table are `table --results results/omniglot`'s output."""
    from experiments.fewshot.records import read_records, results_table
    from experiments.omniglot import PAPER_RESULTS

    records = read_records(str(REPO_ROOT / "results" / "omniglot"))
    assert records, "no committed Omniglot result record"
    table = results_table(records, PAPER_RESULTS)
    assert (REPO_ROOT / "docs" / "results" / "omniglot.md").read_text() == table
    assert table in (REPO_ROOT / "README.md").read_text()
    for record in records:  # every record names the data it was measured on and how long it trained
        assert record["data"]["digest"] and record["meta_steps"] > 0 and record["tasks"] >= 100
