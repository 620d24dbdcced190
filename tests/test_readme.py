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
    """docs/results/omniglot.md is `table --results results/omniglot`'s output, and the Omniglot page shows that file."""
    from experiments.fewshot.records import read_records, results_table
    from experiments.omniglot import PAPER_RESULTS

    records = read_records(str(REPO_ROOT / "results" / "omniglot"))
    assert records, "no committed Omniglot result record"
    table = results_table(records, PAPER_RESULTS)
    assert (REPO_ROOT / "docs" / "results" / "omniglot.md").read_text() == table
    page = (REPO_ROOT / "docs" / "omniglot.md").read_text()
    assert "```{include} results/omniglot.md\n```" in page  # shown as generated, never copied by hand
    assert "| setting | algorithm | test accuracy |" not in page
    for record in records:  # every record names the data it was measured on and how long it trained
        assert record["data"]["digest"] and record["meta_steps"] > 0 and record["tasks"] >= 100


def test_the_cpu_preset_docstring_says_what_its_records_measured():
    """The cost table in ``preset``'s docstring (a cell: the ``cpu`` preset's meta-steps at its record's ms per
    meta-step) agrees with the committed ``cpu`` records, and a cell it calls unrecorded has no ``cpu`` record:
    rerunning or adding a record without updating the docstring fails here."""
    from experiments.fewshot.records import read_records
    from experiments.omniglot import preset

    records = {(r["algorithm"], r["ways"], r["shots"]): r for r in read_records(str(REPO_ROOT / "results" / "omniglot"))
               if r["preset"] == "cpu" and not r["ensemble"]}
    rows = re.findall(r"^ *(\d+)-way (\d+)-shot {2,}(.+)$", preset.__doc__, flags=re.M)
    assert len(rows) == 4
    checked = 0
    for ways, shots, cells in rows:
        ways, shots = int(ways), int(shots)
        for algo, cell in zip(("maml", "fomaml", "pretrain"), re.split(r" {2,}", cells.strip()), strict=True):
            record = records.get((algo, ways, shots))
            cost = re.fullmatch(r"(\d+) min \((\d+) ms\)", cell)
            if cost is None:  # "no record yet", or measured elsewhere ("docs")
                assert record is None, f"{algo} {ways}-way {shots}-shot has a cpu record; the docstring says {cell!r}"
                continue
            assert record is not None, f"no cpu record for {algo} {ways}-way {shots}-shot, docstring says {cell!r}"
            ms = record["ms_per_meta_step"]
            minutes = preset("cpu", ways, shots, algo)["meta_steps"] * ms / 60_000
            assert int(cost[2]) == round(ms) and abs(int(cost[1]) - minutes) <= 0.51, (algo, ways, shots, cell, ms)
            checked += 1
    assert checked >= 9


def test_the_front_page_is_short_and_keeps_its_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert f"```bash\n{test_command.replace(' -q -e', ' -e')}\n```" in text  # what CI runs (its pip is quiet)
    assert "experiments.omniglot train --ways 5 --shots 1 --algo maml --preset cpu" in text


def test_every_number_on_the_front_page_links_to_where_it_was_measured():
    """Outside code, the command table and the install table, a figure with a decimal point, a %, a ×
    or a unit is the text of a link into docs/ (the anchors themselves are checked by tests/test_docs.py)."""
    text = (REPO_ROOT / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    prose = re.sub(r"\[arXiv:[^\]]*\]\(https?://[^)]*\)", "", prose)  # the papers
    prose = prose.replace("95% CI", "").replace("Apache-2.0", "")  # a definition and a name, not measurements
    unlinked = re.sub(r"\[[^\]]*\]\((?:docs/|CHANGELOG|LICENSE)[^)]*\)", "", prose)
    measured = re.compile(r"\d+(?:\.\d+)?\s*(?:%|×|ms|MB|GB|s\b|minutes)|\d+\.\d+")
    allowed = {"98.7 ± 0.4", "98.90 ± 0.10", "98.8", "99.07", "2.2–2.4",  # the papers' figures, cited
               "98.3 ± 0.5", "95.93 ± 0.38", "99.47 ± 0.05", "99.50 ± 0.26",
               "0.67 / 0.38 / 0.35"}
    for figure in allowed:
        unlinked = unlinked.replace(figure, "")
    assert not measured.findall(unlinked), measured.findall(unlinked)
