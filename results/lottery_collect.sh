#!/usr/bin/env bash
# Copy the summaries of the lottery-ticket runs (runs/, git-ignored), and their `sparsebert speed
# --run` results (speed/*.json), into results/lottery/runs/
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
copy_speed() {  # copy RUN_DIR NAME: the `sparsebert speed --run RUN_DIR` results, if any
  for f in "$1"/speed/*.json; do
    [ -f "$f" ] && mkdir -p "$dest/$2/speed" && cp "$f" "$dest/$2/speed/"
  done
  return 0
}
copy_speed runs/mrpc-seeds MRPC
copy_speed runs/lottery-WNLI WNLI/seed_42
.venv/bin/sparsebert report results/lottery/runs --out results/lottery
