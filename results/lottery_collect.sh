#!/usr/bin/env bash
# Copy the summaries of the lottery-ticket runs (runs/, git-ignored) into results/lottery/runs/
# and write results/lottery/report.md and figures/ from those copies, so the report can be
# regenerated from the repository alone: sparsebert report results/lottery/runs --out results/lottery
set -euo pipefail
cd "$(dirname "$0")/.."
dest=results/lottery/runs
rm -rf "$dest" && mkdir -p "$dest"
copy() {  # copy SUMMARY NAME
  [ -f "$1" ] && mkdir -p "$dest/$2" && cp "$1" "$dest/$2/summary.json" || true
}
for dir in runs/mrpc-seeds/seed_*; do copy "$dir/summary.json" "MRPC/$(basename "$dir")"; done
copy runs/mrpc-seeds/super/summary.json MRPC/super
copy runs/lottery-WNLI/summary.json WNLI/seed_42
.venv/bin/sparsebert report results/lottery/runs --out results/lottery
