#!/usr/bin/env bash
# Write results/lottery/report.md and figures/ (the lottery-ticket study: MRPC and WNLI, the
# paper's table) from the summaries committed beside the two full-set sweeps, so the report
# regenerates from the repository alone. Run after sweep_collect.sh has refreshed them.
set -euo pipefail
cd "$(dirname "$0")/.."
sparsebert=${SPARSEBERT:-.venv/bin/sparsebert}
rm -rf results/lottery/figures
"$sparsebert" report results/sweep_mrpc_full/runs results/sweep_wnli_full/runs --out results/lottery
