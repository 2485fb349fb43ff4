"""Setting a method's finished results aside so that they are computed again (after an upgrade
that changed the method, say), keeping the fine-tuned full model and the other method's work.

In a search directory (see sparsebert.lottery.search):
    <search>/<method>/        moved to <aside>/<method>/ (search, masks, pruned, retrained)
    <search>/metrics.jsonl    the method's search-curve records dropped (the whole file is
                              copied to <aside>/metrics.jsonl first, once per set-aside)
    <search>/summary.json     moved to <aside>/ with report.md and figures/: they describe the
                              old results until the search ends and writes them again
Anything moved aside keeps its files, except that a summary.json is renamed
summary.superseded.json, so that a report over the parent directory does not pick it up.
`sparsebert search --redo` sets aside into <search>/.superseded/redo-<methods>-<time>/ (see
PendingRedo); `sparsebert sweep --redo` into OUT/.sweep/superseded/ (sparsebert.sweep.state).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from sparsebert.atomic import atomic_write_json
from sparsebert.train.metrics_log import MetricsLog

SUMMARY = "summary.json"
SUPERSEDED_SUMMARY = "summary.superseded.json"
SEARCH_REPORT = ("report.md", "figures")  # what a search writes beside its summary.json


def move_aside(src: Path, dest: Path) -> None:
    """Move `src` (a file or directory) to `dest` (replaced if there), hiding its summaries
    from reports."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        shutil.rmtree(dest)
    shutil.move(str(src), dest)
    found = [dest] if dest.name == SUMMARY else list(dest.rglob(SUMMARY)) if dest.is_dir() else []
    for summary in found:
        summary.rename(summary.with_name(SUPERSEDED_SUMMARY))


def unused(path: Path) -> Path:
    """`path`, or `path`-2, -3, ... when it exists (two redos within one second)."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def retire_method(search_dir: Path, method: str, aside: Path) -> bool:
    """Move `method`'s results in `search_dir` to `aside`/<method>/ and drop its curve from
    metrics.jsonl, so that the next run of the search redoes that method. Returns whether there
    was anything to move."""
    results = search_dir / method
    log = search_dir / "metrics.jsonl"
    if not results.exists():
        return False
    if log.is_file():
        aside.mkdir(parents=True, exist_ok=True)
        if not (aside / log.name).exists():  # the file before any method's records were dropped
            shutil.copy2(log, aside / log.name)
        MetricsLog(log, keep_until_step=10**9).drop(lambda r: r.get("method") == method)
    move_aside(results, aside / method)
    for name in (SUMMARY, *SEARCH_REPORT):  # (moved once: gone when a 2nd method is retired)
        if (search_dir / name).exists():
            move_aside(search_dir / name, aside / name)
    return True


def set_aside(root: Path, parents: Sequence[Path], searches: Sequence[Path],
              methods: Sequence[str], aside: Path) -> tuple[list[Path], list[Path]]:
    """Set `methods`' results in the search directories `searches` aside, and for structured
    what was built on its masks: the super-survivors (super/) of the multi-seed `parents` and
    the speed timings (speed/) of the parents and searches. Everything lands in `aside` at its
    path relative to `root`. Returns (searches that had results, other folders moved)."""
    moved = []
    for search in searches:
        found = [retire_method(search, m, aside / search.relative_to(root)) for m in methods]
        if any(found):  # (a list first: every method is set aside, not only the first found)
            moved.append(search)
    folders = []
    if "structured" in methods:
        built_on = [*(p / name for p in parents for name in ("super", "speed")),
                    *(search / "speed" for search in searches)]
        for folder in dict.fromkeys(built_on):
            if folder.exists():
                move_aside(folder, aside / folder.relative_to(root))
                folders.append(folder)
    return moved, folders


class PendingRedo:
    """A redo of `methods` in the search directory `root` under search settings `settings`,
    recorded in root/.superseded/redo.json from its start until the search runs to its end
    (finish_redo), so that the same redo rerun after an interruption resumes (sets nothing
    more aside) instead of starting over. It resumes only once its set-aside was complete
    (set_aside_done) and under the same settings: else it starts anew."""

    def __init__(self, root: Path, methods: tuple[str, ...], settings: dict) -> None:
        self.root, self.methods = Path(root), tuple(methods)
        self.settings = json.loads(json.dumps(settings))  # as read back (tuples as lists)
        self.record = self.root / ".superseded" / "redo.json"
        self.aside = self.root / ".superseded"
        self.started_at = ""

    def start(self) -> bool:
        """True for a new redo (the caller sets its results aside into self.aside, then calls
        set_aside_done), False when resuming an interrupted one of the same methods."""
        try:
            pending = json.loads(self.record.read_text()) if self.record.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pending = None  # a damaged record: start over, as if there were none
        if (isinstance(pending, dict) and set(self.methods) <= set(pending.get("methods", ()))
                and pending.get("set_aside", True)  # records before this flag: set aside
                and pending.get("settings", self.settings) == self.settings):
            self.aside, self.started_at = Path(pending["aside"]), pending.get("started_at", "")
            return False
        stamp = self.started_at = time.strftime("%Y-%m-%dT%H%M%S%z")
        self.aside = unused(self.root / ".superseded" / f"redo-{'-'.join(self.methods)}-{stamp}")
        self.aside.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record, self._entry(set_aside=False))
        return True

    def set_aside_done(self) -> None:
        """The redo's results are aside and its settings recorded: a rerun resumes it."""
        atomic_write_json(self.record, self._entry(set_aside=True))

    def _entry(self, set_aside: bool) -> dict:
        return {"methods": list(self.methods), "aside": str(self.aside),
                "settings": self.settings, "set_aside": set_aside,
                "started_at": self.started_at}


def finish_redo(root: Path) -> None:
    """The search in `root` ran to its end: any redo there is complete (also when the rerun
    that completed it was given no --redo), so a later --redo starts anew."""
    (Path(root) / ".superseded" / "redo.json").unlink(missing_ok=True)
