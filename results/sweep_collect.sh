#!/usr/bin/env bash
# Copy the summaries of a sweep directory (default runs/sweep-cpu, git-ignored) and the
# `sparsebert speed --run` results beside them (speed/*.json) into DEST/runs/ (default
# results/sweep), its sweep.json and per-unit times into DEST/, and write DEST/report.md and
# figures/ from the copies, so the report regenerates from the repository alone:
#   sparsebert report results/sweep/runs --out results/sweep
# Usage: bash results/sweep_collect.sh [SWEEP_DIR [DEST]]
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-runs/sweep-cpu}
dest=${2:-results/sweep}
sparsebert=${SPARSEBERT:-.venv/bin/sparsebert}
python=${PYTHON:-.venv/bin/python}
rm -rf "$dest/runs" "$dest/figures" && mkdir -p "$dest/runs"
(cd "$src" && find . \( -name summary.json -o -path "*/speed/*.json" \) -not -path "./.sweep/*") |
while read -r file; do
  mkdir -p "$dest/runs/$(dirname "$file")" && cp "$src/$file" "$dest/runs/$file"
done
cp "$src/sweep.json" "$dest/sweep.json"
"$python" - "$src" "$dest/units.json" <<'PY'
import json, sys
from pathlib import Path
markers = sorted(Path(sys.argv[1], ".sweep", "done").glob("*.json"))
units = [json.loads(m.read_text()) for m in markers]
Path(sys.argv[2]).write_text(json.dumps(sorted(units, key=lambda u: u["time"]), indent=1) + "\n")
PY
$sparsebert report "$dest/runs" --out "$dest"
