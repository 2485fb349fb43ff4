"""metrics.jsonl: one JSON record per line (train loss windows, dev metrics), append-only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sparsebert.atomic import atomic_write_text


class MetricsLog:
    """Append-only metrics.jsonl; on resume, drops records written after the checkpoint."""

    def __init__(self, path: Path, keep_until_step: int) -> None:
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        record = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                  for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
