"""metrics.jsonl: one JSON record per line (train loss windows, dev metrics), append-only."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsebert.atomic import atomic_write_text, write_errors_named


def parse_records(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """The records in the lines of metrics.jsonl `path`. A line that is not UTF-8 text holding
    a JSON object (a write cut off by a power loss or a full disk, bytes damaged on the disk) is
    dropped with a warning naming the file and line."""
    records, damaged = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged.append(number)
    if damaged:
        lines = ", ".join(map(str, damaged))
        warnings.warn(f"{path}: dropped {len(damaged)} damaged line(s) ({lines}); the run itself "
                      "resumes from its checkpoint", stacklevel=2)
    return records


class MetricsLog:
    """Append-only metrics.jsonl; on resume, drops records written after the checkpoint (and
    damaged lines)."""

    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            lines = path.read_bytes().splitlines()  # (each line decoded on its own)
            self.records = [r for r in parse_records(path, lines)
                            if r.get("step", 0) <= keep_until_step]
            if len(self.records) != len(lines):  # rewritten only when something was dropped
                self._rewrite()

    def drop(self, unwanted: Callable[[dict[str, Any]], bool]) -> None:
        """Remove the records `unwanted` picks, from memory and from the file."""
        kept = [r for r in self.records if not unwanted(r)]
        if len(kept) != len(self.records):
            self.records = kept
            self._rewrite()

    def _rewrite(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    @staticmethod
    def _rounded(record: dict[str, Any]) -> dict[str, Any]:
        """Floats to 7 significant digits (a learning rate of 2e-5 keeps its schedule's steps;
        decimal places would flatten it)."""
        return {k: (float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in record.items()}

    def write(self, record: dict[str, Any]) -> None:
        record = self._rounded(record)
        with write_errors_named(self.path), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.records.append(record)

    def replace(self, records: list[dict[str, Any]]) -> None:
        """The file becomes `records`, all at once (an atomic rewrite: a kill leaves the old
        records or the new ones)."""
        self.records = [self._rounded(r) for r in records]
        self._rewrite()

