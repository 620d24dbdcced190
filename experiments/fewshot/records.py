"""Result records, and the results table (the papers' Table 1) generated from them.

A *record* is one small JSON file per cell and evaluation mode, written by
``evaluate`` the moment it finishes: the accuracy and its 95% CI, how the
model was trained (meta-steps against the paper's budget, preset, wall time,
ms per meta-step, machine, the code's commit) and the data's identity.
Records are committed (``results/omniglot/``); run directories and
checkpoints are not, so a result outlives its run.  :func:`results_table`
turns a folder of records into the Markdown table the docs show.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from jaxmeta.algorithms.registry import ALGORITHM_SPECS
from jaxmeta.errors import ConfigError
from jaxmeta.io import write_json

PaperResults = Mapping[tuple[str, int, int], Mapping[str, object]]
"""``{(algo, ways, shots): {"meta_steps": int, "transductive": str, "non-transductive": str}}``: a paper's
budget and figures (a mode it does not report is left out)."""

RECORD_FIELDS = ("dataset", "algorithm", "ways", "shots", "eval_mode", "ensemble", "accuracy", "ci95", "tasks",
                 "test_inner_steps", "meta_steps", "paper_meta_steps", "preset", "wall_s", "ms_per_meta_step",
                 "machine", "commit", "data")
"""The fields every record holds (``note`` and ``member_steps`` are optional)."""



def _title(algo: str) -> str:
    return ALGORITHM_SPECS[algo].title if algo in ALGORITHM_SPECS else algo


def make_record(config, evaluation: Mapping, training: Mapping, *, preset: str, data: Mapping | None,
                paper_meta_steps: int | None = None, note: str | None = None) -> dict:
    """One result record.

    Args:
      config: the run's :class:`~experiments.fewshot.pipeline.FewShotConfig`.
      evaluation: what ``evaluate`` measured (``accuracy``, ``ci95``, ``tasks``,
        ``inner_steps``, ``eval_mode``, ``meta_steps``, and for an ensemble
        ``ensemble`` and ``member_steps``).
      training: the run's ``train.json`` (wall time, speed, machine, commit).
      preset: the preset the run's configuration equals (``"custom"`` if none).
      data: the data's identity (``config.json``'s ``data``).
      paper_meta_steps: the paper's meta-step budget for this cell.
      note: one line on the result (e.g. why a cell stays below its paper).
    """
    record = {
        "dataset": config.dataset, "algorithm": config.algo, "ways": config.ways, "shots": config.shots,
        "eval_mode": evaluation["eval_mode"], "ensemble": int(evaluation.get("ensemble", 0)),
        "accuracy": float(evaluation["accuracy"]), "ci95": float(evaluation["ci95"]),
        "tasks": int(evaluation["tasks"]), "test_inner_steps": int(evaluation["inner_steps"]),
        "meta_steps": int(evaluation["meta_steps"]), "paper_meta_steps": paper_meta_steps, "preset": preset,
        "wall_s": training.get("train_seconds_total", training.get("train_seconds_this_call")),
        "ms_per_meta_step": training.get("ms_per_meta_step"),
        "machine": training.get("machine") or training.get("device"), "commit": training.get("commit"),
        "data": {k: data[k] for k in ("dataset", "digest") if k in data} if data else None,
    }
    if evaluation.get("member_steps"):
        record["member_steps"] = [int(s) for s in evaluation["member_steps"]]
    if note:
        record["note"] = note
    return record


def record_name(record: Mapping) -> str:
    """The record's file name: one per cell, preset, evaluation mode and ensemble size
    (``omniglot-5w1s-maml-cpu-transductive.json``)."""
    ensemble = f"-ensemble{record['ensemble']}" if record.get("ensemble") else ""
    return (f"{record['dataset']}-{record['ways']}w{record['shots']}s-{record['algorithm']}-{record['preset']}-"
            f"{record['eval_mode']}{ensemble}.json")


def write_record(record: Mapping, directory: str) -> str:
    """Writes ``record`` into ``directory`` (atomically; a newer evaluation of the same cell replaces
    the older); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, record_name(record))
    write_json(path, dict(record))
    return path


def read_records(directory: str) -> list[dict]:
    """Every record in ``directory`` (``*.json``); a missing folder or a malformed record is one
    :class:`~jaxmeta.errors.ConfigError` naming it."""
    if not os.path.isdir(directory):
        raise ConfigError(f"results folder {directory} does not exist")
    records = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not a readable result record: {e}") from None
        missing = [k for k in RECORD_FIELDS if not isinstance(record, dict) or k not in record]
        if missing:
            raise ConfigError(f"{path} is not a result record: it lacks {', '.join(missing)}")
        records.append(record)
    return records


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _budget(record: Mapping) -> str:
    steps, paper = record["meta_steps"], record.get("paper_meta_steps")
    if not paper:
        return f"{steps:,}"
    share = steps / paper
    return f"{steps:,} of {paper:,}" + (f" ({100 * share:.2g}%)" if share < 1 else "")


def results_table(records: Sequence[Mapping], paper: PaperResults | None = None) -> str:
    """A Markdown table of ``records``, sorted by setting, algorithm, preset and evaluation mode, with
    each record's ``note`` as a numbered line below it, then the cells of ``paper`` that no record
    fills yet (:func:`unrecorded_cells`).

    Examples:
      >>> results_table([]).splitlines()[0].split(" | ")[:4]
      ['| setting', 'algorithm', 'test accuracy', 'evaluation']
    """
    paper = paper or {}
    rows = sorted(records, key=lambda r: (
        r["ways"], r["shots"], _rank(r["algorithm"]),
        r["preset"] != "cpu", r["preset"], r["eval_mode"] != "transductive", r["ensemble"]))
    lines = ["| setting | algorithm | test accuracy | evaluation | meta-steps (paper's) | preset | training "
             "| ms / meta-step | machine | paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        ref = paper.get((r["algorithm"], r["ways"], r["shots"]), {})
        mode = r["eval_mode"] + (f", top-{r['ensemble']} ensemble" if r["ensemble"] else "")
        mode += f", {r['test_inner_steps']} steps"
        accuracy = f"**{100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}** ({r['tasks']} tasks)"
        if r.get("note"):
            if r["note"] not in notes:  # one line per distinct note
                notes.append(r["note"])
            accuracy += f" [{notes.index(r['note']) + 1}]"
        speed = "—" if r["ms_per_meta_step"] is None else f"{r['ms_per_meta_step']:.0f}"
        lines.append(
            f"| {r['ways']}-way {r['shots']}-shot | {_title(r['algorithm'])} | {accuracy} "
            f"| {mode} | {_budget(r)} | `{r['preset']}` | {_duration(r['wall_s'])} | {speed} "
            f"| {r['machine'] or '—'} | {ref.get(r['eval_mode'], '—')} |")
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)] if notes else []
    missing = unrecorded_cells(records, paper)
    if missing:
        settings: dict[tuple[int, int], list[str]] = {}
        for algo, ways, shots in missing:
            settings.setdefault((ways, shots), []).append(_title(algo))
        lines += ["", f"Without a record yet ({len(missing)} of {len(paper)} cells): " + "; ".join(
            f"{ways}-way {shots}-shot: {', '.join(algos)}" for (ways, shots), algos in settings.items()) + "."]
    return "\n".join(lines) + "\n"


def _rank(algo: str) -> int:
    """An algorithm's place in the table: the registry's order, unknown names last."""
    order = list(ALGORITHM_SPECS)
    return order.index(algo) if algo in order else len(order)


def unrecorded_cells(records: Sequence[Mapping], paper: PaperResults) -> list[tuple[str, int, int]]:
    """The cells ``(algo, ways, shots)`` of ``paper`` that no record fills, in table order.

    Examples:
      >>> paper = {("maml", 5, 1): {}, ("fomaml", 5, 1): {}, ("maml", 20, 1): {}}
      >>> unrecorded_cells([{"algorithm": "maml", "ways": 5, "shots": 1}], paper)
      [('fomaml', 5, 1), ('maml', 20, 1)]
    """
    recorded = {(r["algorithm"], r["ways"], r["shots"]) for r in records}
    return sorted((cell for cell in paper if cell not in recorded), key=lambda c: (c[1], c[2], _rank(c[0])))
