#!/usr/bin/env bash
# Every CPU run behind results/*.md, in the order they were made, then the tables.
# Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint.
# About 3 hours on 2 CPU cores (1 torch thread per run, as recorded).
#
#   GLUE_DIR=../shared/data/glue bash results/reproduce.sh [main|sweep|ablation|tables|lottery ...]
set -euo pipefail
: "${GLUE_DIR:?point GLUE_DIR at a GLUE download (<TASK>/train.tsv, dev.tsv)}"
export GLUE_DIR
cd "$(dirname "$0")/.."
PATH=$PWD/.venv/bin:$PATH
steps=("${@:-main sweep ablation tables}")
read -r -a steps <<< "${steps[*]}"
ft() { sparsebert finetune --threads 1 "$@"; }

for step in "${steps[@]}"; do
  case $step in
    main)  # glue_finetune: five tasks, seed 42, preset minilm (lr 1e-4), bucketed batches
      python bench/bench_train_throughput.py --task RTE --steps 30 --rounds 5 --threads 1
      for task in RTE MRPC CoLA STS-B; do ft --task $task --seed 42 --out runs/glue-minilm-s42/$task; done
      ft --task SST-2 --seed 42 --max-train-examples 8000 --epochs 1 --out runs/glue-minilm-s42/SST-2 ;;
    sweep)  # lr_sweep: RTE and MRPC at lr 2e-5, 5e-5, 2e-4 (1e-4 is the main run)
      for lr in 5e-05 0.0002 2e-05; do
        for task in RTE MRPC; do ft --task $task --seed 42 --lr $lr --out runs/lr-sweep/$task-lr$lr; done
      done ;;
    ablation)  # bucket_ablation: seeds 42-44, bucketed vs shuffled; one run with stock AdamW settings
      for seed in 42 43 44; do
        for mode in shuffled bucketed; do
          flag=--bucket; [ $mode = shuffled ] && flag=--no-bucket
          dir=runs/ablation; [ $mode = bucketed ] && [ $seed = 42 ] && dir=runs/glue-minilm-s42
          sst=$dir/SST-2-$mode-s$seed mrpc=$dir/MRPC-$mode-s$seed
          [ $dir = runs/glue-minilm-s42 ] && sst=$dir/SST-2 mrpc=$dir/MRPC
          ft --task SST-2 --seed $seed $flag --max-train-examples 8000 --epochs 1 --out $sst
          ft --task MRPC --seed $seed $flag --out $mrpc
        done
      done
      ft --task MRPC --seed 42 --no-bucket --weight-decay 0.01 --grad-clip 0 \
        --out runs/ablation-recipe/MRPC-wd0.01-noclip-s42 ;;
    lottery)  # the lottery-ticket study (results/lottery/): MRPC and WNLI on their full training
              # sets, 3 seeds, both methods, super-survivors (the two full-set sweeps), then the
              # s-pruning subnetworks timed at MRPC's dev lengths and the report over both
              # (about 2 h 45 min on 2 cores)
      for task in MRPC WNLI; do
        lower=$(tr '[:upper:]' '[:lower:]' <<< "$task")
        sparsebert sweep --tasks $task --seeds 1337,42,86 --methods structured,magnitude \
          --out runs/sweep-$lower-full --workers 2 --devices cpu --threads 1 --epochs 3
      done
      sparsebert speed --run runs/sweep-mrpc-full/MRPC --lengths glue:MRPC --batch 16 --seq 128 \
        --threads 1 --device cpu
      bash results/sweep_collect.sh runs/sweep-mrpc-full results/sweep_mrpc_full
      bash results/sweep_collect.sh runs/sweep-wnli-full results/sweep_wnli_full
      bash results/lottery_collect.sh ;;
    tables)
      python results/collect.py runs/glue-minilm-s42
      python results/collect.py runs/lr-sweep runs/glue-minilm-s42/RTE runs/glue-minilm-s42/MRPC \
        --out results/lr_sweep
      python results/collect.py runs/ablation runs/glue-minilm-s42/SST-2 runs/glue-minilm-s42/MRPC \
        runs/ablation-recipe --out results/bucket_ablation ;;
    *) echo "unknown step $step (expected main, sweep, ablation, tables, lottery)" >&2; exit 2 ;;
  esac
done
