"""Setting a method's finished results aside so that they are computed again (after an upgrade
that changed the method, say), keeping the fine-tuned full model and the other method's work.

In a search directory (see sparsebert.lottery.search):
    <search>/<method>/        moved to <aside>/<method>/ (search, masks, pruned, retrained)
    <search>/metrics.jsonl    the method's search-curve records dropped (the whole file is
                              copied to <aside>/metrics.jsonl first)
Anything moved aside keeps its files, except that a summary.json is renamed
summary.superseded.json, so that a report over the parent directory does not pick it up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sparsebert.atomic import atomic_write_text
from sparsebert.train.metrics_log import parse_records

SUMMARY = "summary.json"
SUPERSEDED_SUMMARY = "summary.superseded.json"


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
        shutil.copy2(log, aside / log.name)
        kept = [r for r in parse_records(log, log.read_text(encoding="utf-8").splitlines())
                if r.get("method") != method]
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
    move_aside(results, aside / method)
    return True
