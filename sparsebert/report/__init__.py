"""The report layer: lottery-search run directories -> the paper's results table and figures.

    from sparsebert.report import report
    out = report(["runs/MRPC", "runs/RTE"], out_dir="runs/report")
    out["report"]   # runs/report/report.md: tables, embedded figures, how to regenerate it
    out["figures"]  # [runs/report/figures/surviving_heads.png, ...]

Modules: `collect` (find, validate, aggregate summary.json files), `paper` (the paper's numbers,
from PAPER.md §1.4, §4, §5.1), `table` (markdown tables), `speed` (`sparsebert speed --run`
measurements found beside the runs), `figures` (PNG figures).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsebert.atomic import atomic_write_text
from sparsebert.report import table
from sparsebert.report.collect import (
    ReportError,
    Stat,
    TaskResults,
    collect,
    path_list,
    task_models,
)
from sparsebert.report.figures import write_figures
from sparsebert.report.speed import SPEED_NOTE, SpeedEntry, collect_speed, speed_tables
from sparsebert.report.summaries import NoSummaryError, unfinished_searches

__all__ = ["ReportError", "Stat", "TaskResults", "collect", "render_markdown", "report"]


def _command(paths: Sequence[Path], out_dir: Path) -> str:
    """The shell command that writes this report again (`sparsebert report`)."""
    args = " ".join(shlex.quote(str(p)) for p in paths)
    return f"sparsebert report {args} --out {shlex.quote(str(out_dir))}"


# what --model default is (sparsebert.hf.loading), named in the report's data line
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2: 6 layers x 12 heads, hidden 384"


def _model_name(model: str | None) -> str | None:
    """--model as the report names it: the default model with its name and size."""
    return f"{model} ({DEFAULT_MODEL_NAME})" if model == "default" else model


def _data_line(results: dict[str, TaskResults]) -> str:
    """One paragraph on what the data are: runs, tasks, seeds and the search setting."""
    runs = [r for res in results.values() for r in res.runs]
    parts = [f"{t} (seed{'s' if res.n_seeds > 1 else ''} "
             f"{', '.join(str(s) for s in res.seeds)}"
             + (", + super-survivors" if res.super is not None else "") + ")"
             for t, res in results.items()]
    fields = (("model", "model"), ("search on", "search_data"),
              ("importance mode", "importance_mode"), ("threshold", "threshold"))
    described = []
    models = task_models(results)  # (a path recorded relative and absolute: one model)
    for label, attribute in fields:
        per_task = (models if attribute == "model" else
                    {task: getattr(res.runs[0], attribute) for task, res in results.items()})
        per_task = {task: _model_name(v) if attribute == "model" else v
                    for task, v in per_task.items()}
        values = {v for v in per_task.values() if v is not None}
        if len(values) == 1:
            described.append(f"{label} {values.pop()}")
        elif values:  # tasks run with different settings: say which had which
            described.append(f"{label} " + ", ".join(
                f"{value} ({', '.join(t for t, v in per_task.items() if v == value)})"
                for value in dict.fromkeys(v for v in per_task.values() if v is not None)))
    setting = ", ".join(described)
    n = f"{len(runs)} lottery-search run{'s' if len(runs) > 1 else ''}"
    return (f"Data: {n} (one task x one seed each): {'; '.join(parts)}. Setting: {setting}. "
            f"{_training_data(results)}{_code_line(results)}All scores are on the dev sets. "
            "The paper's values "
            "(Prasanna et al. 2020: BERT-base, 5 seeds; transcribed in "
            "sparsebert/report/paper.py) are not comparable one to one when the model differs.")


def _short_sha(sha: str | None) -> str | None:
    """A recorded commit as the report prints it: 7 hex digits, "-dirty" kept."""
    if sha is None:
        return None
    return sha[:7] + ("-dirty" if sha.endswith("-dirty") else "")


def _code_line(results: dict[str, TaskResults]) -> str:
    """'Code: ...': the commits of the code that wrote the summaries, each with the tasks (or a
    task's seeds) it wrote; '' when no summary records one."""
    groups: dict[str | None, list[str]] = {}
    for task, res in results.items():
        shas = [(run.seed, _short_sha(run.git_sha)) for run in res.runs]
        distinct = list(dict.fromkeys(sha for _, sha in shas))
        for sha in distinct:
            seeds = [str(seed) for seed, s in shas if s == sha]
            groups.setdefault(sha, []).append(
                task if len(distinct) == 1 else
                f"{task} seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}")
    if set(groups) <= {None}:
        return ""
    if len(groups) == 1:
        return f"Code: every summary written at commit {next(iter(groups))}. "
    items = [f"{sha or 'not recorded'} ({', '.join(names)})"  # the unrecorded last
             for sha, names in sorted(groups.items(), key=lambda item: item[0] is None)]
    return ("Code: summaries written at commits " + "; ".join(items) + " (results of different "
            "commits are comparable only where the code between them did not change the "
            "method). ")


def _training_data(results: dict[str, TaskResults]) -> str:
    """'Fine-tuned on: ...' per task (full training set or a cap on examples), '' when no
    summary records its training config."""
    groups: dict[str, list[str]] = {}
    for task, res in results.items():
        known = [r for r in res.runs if r.train_data_known]
        if not known:
            continue
        cap, size = known[0].max_train_examples, known[0].train_set_examples
        # a cap at or above the set's size trains on all of it (older summaries: size unknown)
        whole = cap is None or (size is not None and cap >= size)
        label = ("the full training set" if whole else
                 f"{cap} training examples per fine-tune (a seeded subset)")
        groups.setdefault(label, []).append(task)
    if not groups:
        return ""
    return "Fine-tuned on: " + "; ".join(f"{', '.join(tasks)}: {label}"
                                         for label, tasks in groups.items()) + ". "


def _unfinished_line(unfinished: Sequence[Path]) -> str:
    """'Left out: ...': the search directories among the inputs without a summary.json yet."""
    def name(folder: Path) -> str:
        try:
            train = json.loads((folder / "config.json").read_text())["train"]
            return f"{folder} ({train['task']} seed {train['seed']})"
        except (OSError, ValueError, KeyError, TypeError):
            return str(folder)

    shown = [name(folder) for folder in unfinished[:10]]
    more = f" and {len(unfinished) - 10} more" if len(unfinished) > 10 else ""
    them = "them" if len(unfinished) > 1 else "it"
    return (f"Left out: {len(unfinished)} search{'es' if len(unfinished) > 1 else ''} without a "
            f"summary.json yet (still running, or cut short: finish {them} by rerunning the "
            f"search or sweep that started {them}, then this report): {', '.join(shown)}{more}.")


def render_markdown(results: dict[str, TaskResults], figures: Sequence[Path], out_dir: Path,
                    command: str, speed: Sequence[SpeedEntry] = (),
                    unfinished: Sequence[Path] = ()) -> str:
    """The report.md text: tables, figures linked relative to out_dir, the regenerating
    command and a line on what the data are; `speed`: the runs' speed measurements;
    `unfinished`: search directories among the inputs that have no summary yet."""
    parts = ["# Lottery-ticket search report", "", _data_line(results), "",
             *([_unfinished_line(unfinished), ""] if unfinished else []),
             "Regenerate with:", "", "```", command, "```", "",
             "## Results (paper §4 layout)", "", table.results_table(results), "",
             table.results_notes(results), "",
             "## Subnetwork sizes", "", table.sizes_table(results), "", table.SIZES_NOTE, ""]
    stab = table.stability_table(results)
    if stab is not None:
        parts += ["## Stability across seeds", "", stab, ""]
        if not stab.startswith("Stability statistics unavailable"):
            parts += [table.STABILITY_NOTE, ""]
    if speed:
        parts += ["## Speed of the subnetworks", "", speed_tables(results, speed), "",
                  SPEED_NOTE, ""]
    if figures:
        parts += ["## Figures", ""]
        for fig in figures:
            rel = Path(os.path.relpath(fig, out_dir)).as_posix()
            parts += [f"![{fig.stem.replace('_', ' ')}]({rel})", ""]
    return "\n".join(parts)


def report(paths: str | os.PathLike | Sequence[str | os.PathLike],
           out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Collect every summary.json under `paths` and write report.md and figures/*.png.

    paths: run directories, parents of many, or summary.json files. out_dir: defaults to the
    first path if it is a directory (else the folder holding that file). Returns {"report":
    path of report.md, "figures": [paths], "tasks": [task names], "table": the results table
    as markdown, "unfinished": [search directories left out for want of a summary.json]}.
    Raises ReportError when no summary is found or a summary is malformed.
    """
    paths = [Path(p) for p in path_list("report", paths)]
    if not paths:
        raise ReportError("report() needs at least one path (a search run directory or parent)")
    if out_dir is not None:
        out_dir = Path(out_dir).expanduser()
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir}: exists and is a file (expected a directory for "
                          "report.md and figures/)")
    unfinished = unfinished_searches(paths)
    try:
        results = collect(paths)
    except NoSummaryError as error:
        if not unfinished:
            raise
        raise NoSummaryError(f"{error}. {_unfinished_line(unfinished)}") from None
    if out_dir is None:
        out_dir = paths[0] if paths[0].is_dir() else paths[0].parent
    out = Path(out_dir)
    try:  # (a file on the way, a read-only folder: named here, not as an OS error)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"--out {out}: cannot create it ({error.strerror or error})") from None
    speed = collect_speed(results)
    figures = write_figures(results, out / "figures", [e for e in speed if not e.mismatch])
    command = _command(paths, out)  # as given: relative paths stay relative
    text = render_markdown(results, figures, out, command, speed, unfinished)
    report_path = out / "report.md"
    atomic_write_text(report_path, text)
    return {"report": report_path, "figures": figures, "tasks": list(results),
            "table": table.results_table(results), "unfinished": unfinished}
